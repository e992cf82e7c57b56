// Prints the sharp platform packages (name@version) this machine needs, read from sharp's own
// optionalDependencies so the versions always match the installed sharp.
const path = require("node:path");
const fs = require("node:fs");
const pkgFile = path.join(__dirname, "..", "node_modules", "sharp", "package.json");
const { optionalDependencies: deps } = JSON.parse(fs.readFileSync(pkgFile, "utf8"));
const libc = process.platform === "linux" && !process.report?.getReport().header.glibcVersionRuntime ? "musl" : "";
const plat = `${process.platform}${libc}-${process.arch}`;
const wanted = [`@img/sharp-${plat}`, `@img/sharp-libvips-${plat}`];
console.log(wanted.filter((n) => deps[n]).map((n) => `${n}@${deps[n]}`).join(" "));
