#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages, npm dependencies, sharp's native
# binary, build. Each step is skipped when its result is already in place, so `npm start` and
# `npm test` can both call this every time at almost no cost.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v nats-server >/dev/null 2>&1 || need_apt+=(nats-server)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# Headless Chromium renders report.html in test/report.test.ts (the screenshot check).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  # Debian starts services on install; ctrain starts its own nats-server and Prometheus instances.
fi

# npm dependencies. The native TensorFlow backends are optionalDependencies whose install downloads
# libtensorflow; this machine class has no internet, so they are omitted (users with internet can
# run `npm install @tensorflow/tfjs-node-gpu`). A stamp of the lockfile's hash avoids reinstalling.
stamp=node_modules/.ctrain-lock-stamp
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_hash" ]; then
  echo "setup: npm ci --omit=optional"
  # --loglevel=error: nsfwjs (its weights are all we use) and kubernetes-models (tests only) declare
  # Node 22 in "engines" and npm warns EBADENGINE on Node 20, which ctrain supports and is tested on
  # (test/node_version.test.ts checks that no runtime dependency needs more). Errors still show.
  npm ci --omit=optional --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > "$stamp"
fi

# sharp ships libvips as per-platform optional packages, which --omit=optional leaves out; install
# the one for this platform explicitly (without touching package.json or the lockfile).
if ! node -e "require('sharp')" >/dev/null 2>&1; then
  node scripts/sharp_platform.cjs | xargs npm install --no-save --omit=optional --no-audit --no-fund --loglevel=error
  node -e "require('sharp')"
fi

# Build when any source is newer than the last build.
if [ ! -f dist/.build-stamp ] || [ -n "$(find cli core coordinator worker proto test bench tsconfig.json package.json -newer dist/.build-stamp -type f -print -quit 2>/dev/null)" ]; then
  echo "setup: building (tsc)"
  npm run --silent build
fi
