/**
 * report.html of a run: a headline (accuracy per phase, data, skipped inputs, wall time, options),
 * loss and accuracy curves per phase (train and validation) and the test confusion matrix, as
 * inline SVG in one self-contained file (no scripts, no network).
 */
import type { EpochStats } from "../core/training/train_loop.js";

export interface ReportInput {
  job: string;
  summary: Record<string, unknown>;
  phases: { name: string; history: EpochStats[] }[];
  classes: string[];
  /** confusion[true][predicted] on the test split of the final model. */
  confusion: number[][];
}

const esc = (s: string): string => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);

function lineChart(title: string, series: { name: string; color: string; points: [number, number][] }[], yLabel: string): string {
  const W = 460, H = 260, L = 50, R = 110, T = 28, B = 36;
  const all = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y));
  if (all.length === 0) return `<svg width="${W}" height="${H}"><text x="10" y="20">${esc(title)}: no data</text></svg>`;
  const xs = all.map(([x]) => x), ys = all.map(([, y]) => y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const px = (x: number) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y: number) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => y0 + f * (y1 - y0));
  const grid = ticks.map((v) => `<line x1="${L}" x2="${W - R}" y1="${py(v)}" y2="${py(v)}" stroke="#ddd"/><text x="${L - 6}" y="${py(v) + 4}" text-anchor="end" font-size="10">${v.toFixed(3)}</text>`).join("");
  const xticks = [...new Set(xs)].filter((_, i, a) => a.length <= 12 || i % Math.ceil(a.length / 12) === 0)
    .map((x) => `<text x="${px(x)}" y="${H - B + 14}" text-anchor="middle" font-size="10">${x}</text>`).join("");
  const lines = series.map((s, i) => {
    const pts = s.points.filter(([, y]) => Number.isFinite(y));
    const path = pts.map(([x, y], j) => `${j ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    const dots = pts.map(([x, y]) => `<circle cx="${px(x).toFixed(1)}" cy="${py(y).toFixed(1)}" r="2.5" fill="${s.color}"/>`).join("");
    return `<path d="${path}" fill="none" stroke="${s.color}" stroke-width="2"/>${dots}<rect x="${W - R + 10}" y="${T + i * 18}" width="10" height="10" fill="${s.color}"/><text x="${W - R + 24}" y="${T + i * 18 + 9}" font-size="11">${esc(s.name)}</text>`;
  }).join("");
  return `<svg width="${W}" height="${H}" role="img" aria-label="${esc(title)}"><text x="${L}" y="16" font-weight="bold">${esc(title)}</text>${grid}${xticks}<text x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle" font-size="11">epoch</text><text x="12" y="${(T + H - B) / 2}" font-size="11" transform="rotate(-90 12 ${(T + H - B) / 2})" text-anchor="middle">${esc(yLabel)}</text>${lines}</svg>`;
}

function confusionTable(classes: string[], m: number[][]): string {
  const max = Math.max(1, ...m.flat());
  const head = `<tr><th>true \\ predicted</th>${classes.map((c) => `<th>${esc(c)}</th>`).join("")}<th>recall</th></tr>`;
  const rows = m.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0);
    const cells = row.map((v, j) => {
      const a = v / max;
      const bg = i === j ? `rgba(40,130,60,${0.15 + 0.85 * a})` : `rgba(200,50,50,${a})`;
      return `<td style="background:${bg}">${v}</td>`;
    }).join("");
    return `<tr><th>${esc(classes[i])}</th>${cells}<td>${total ? ((row[i] / total) * 100).toFixed(1) + "%" : "-"}</td></tr>`;
  }).join("");
  return `<table class="cm">${head}${rows}</table>`;
}

/** Where the work ran: the engine of the frozen forward passes and the backend that trained. */
function computeLine(summary: Record<string, unknown>): string {
  const e = summary["engine"] as { name?: string; version?: string; threads?: number; provider?: string; fallback?: string } | undefined;
  if (!e?.name) return "";
  const engine = e.name === "onnx" ? `onnxruntime ${e.version ?? ""} (${e.provider ?? "cpu"}, ${e.threads ?? 1} thread${e.threads === 1 ? "" : "s"})` : `tfjs ${e.version ?? ""}`;
  return `<p class="compute">Frozen forward passes: <b>${esc(engine)}</b>${e.fallback ? ` (onnx not used: ${esc(e.fallback)})` : ""}; training: <b>${esc(String(summary["backend"] ?? "?"))}</b>.</p>`;
}

/** What the headline reads from summary.json (coordinator/job.ts JobSummary); every field may be missing. */
interface HeadlineSummary {
  seconds?: number;
  workers?: number;
  data?: string;
  classes?: string[];
  samples?: { train: number; val: number; test: number };
  extraction?: { images: number; seconds: number; images_per_second: number; cache_hit: boolean };
  fine_tune?: { activation_cache?: { cache_hit: boolean; images: number; seconds: number } };
  phases?: Record<string, { epochs: number; epochs_asked: number; best_epoch?: number; val_accuracy: number; test_accuracy: number; test_loss: number; seconds: number }>;
  skipped_inputs?: { reason: string }[];
  options?: Record<string, string | number | boolean>;
}

const pct = (x: number | undefined): string => (x === undefined || !Number.isFinite(x) ? "-" : `${(x * 100).toFixed(1)}%`);
const secs = (x: number | undefined): string => (x === undefined || !Number.isFinite(x) ? "-" : `${x.toFixed(1)} s`);

/**
 * The top of the report: final accuracies per phase and which model was saved, data set counts and
 * skipped inputs by reason, wall time per phase, and the options that shaped the run.
 */
function headline(raw: Record<string, unknown>): string {
  const s = raw as HeadlineSummary;
  const phases = Object.entries(s.phases ?? {});
  const rows = phases.map(([name, p]) => `<tr><th>${esc(name === "fine_tune" ? "fine-tune" : name)}</th><td class="big">${pct(p.test_accuracy)}</td><td>${pct(p.val_accuracy)}</td><td>${Number.isFinite(p.test_loss) ? p.test_loss.toFixed(4) : "-"}</td><td>${p.epochs}/${p.epochs_asked}${p.best_epoch !== undefined ? ` (best ${p.best_epoch})` : ""}</td><td>${secs(p.seconds)}</td></tr>`).join("");
  const saved = phases.some(([n]) => n === "fine_tune") ? "model/ is the fine-tuned classifier; model-head/ the head-only one" : "model/ is the head's classifier";
  const x = s.extraction;
  const extraction = x ? (x.cache_hit ? "features from the cache" : `${x.images} images extracted at ${x.images_per_second} img/s`) : "";
  const skipped = s.skipped_inputs ?? [];
  const byReason = Object.entries(skipped.reduce<Record<string, number>>((a, k) => ({ ...a, [k.reason]: (a[k.reason] ?? 0) + 1 }), {})).map(([k, n]) => `${esc(k)} ${n}`).join(", ");
  const times = [["extraction", x?.seconds], ["activation cache", s.fine_tune?.activation_cache?.seconds], ...phases.map(([n, p]) => [n === "fine_tune" ? "fine-tune" : n, p.seconds] as const), ["whole run", s.seconds]]
    .filter(([, v]) => v !== undefined).map(([n, v]) => `${esc(String(n))} ${secs(v as number)}`).join(" &middot; ");
  const options = Object.entries(s.options ?? {}).map(([k, v]) => `<code>--${esc(k)} ${esc(String(v))}</code>`).join(" ");
  const n = s.samples;
  return `<section class="headline">
<table class="acc"><tr><th>phase</th><th>test accuracy</th><th>val accuracy</th><th>test loss</th><th>epochs</th><th>time</th></tr>${rows}</table>
<p>${esc(saved)}.</p>
<p><b>Data</b> ${esc(String(s.data ?? "?"))}: ${s.classes?.length ?? "?"} classes, ${n ? `${n.train} train / ${n.val} val / ${n.test} test samples` : "?"}; ${esc(extraction)}; <b>${skipped.length} inputs skipped</b>${byReason ? ` (${byReason})` : ""}.</p>
<p><b>Wall time</b> ${times}${s.workers !== undefined ? ` &middot; ${s.workers === 0 ? "no worker started" : `${s.workers} worker(s)`}` : ""}.</p>
<p class="options"><b>Options</b> ${options}</p>
</section>`;
}

export function renderReport(r: ReportInput): string {
  const colors = { train: "#1f77b4", val: "#ff7f0e" };
  const charts = r.phases.filter((p) => p.history.length > 0).map((p) => {
    const pts = (k: keyof EpochStats) => p.history.map((h) => [h.epoch, Number(h[k] ?? NaN)] as [number, number]);
    return `<h2>Phase: ${esc(p.name)}</h2><div class="row">${lineChart(`${p.name}: loss`, [{ name: "train", color: colors.train, points: pts("loss") }, { name: "validation", color: colors.val, points: pts("val_loss") }], "loss")}${lineChart(`${p.name}: accuracy`, [{ name: "train", color: colors.train, points: pts("accuracy") }, { name: "validation", color: colors.val, points: pts("val_accuracy") }], "accuracy")}</div>`;
  }).join("");
  return `<!doctype html><html><head><meta charset="utf-8"><title>ctrain report: ${esc(r.job)}</title>
<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}.row{display:flex;gap:24px;flex-wrap:wrap}
table.cm{border-collapse:collapse;font-size:12px}table.cm td,table.cm th{border:1px solid #ccc;padding:4px 6px;text-align:right}
pre{background:#f6f6f6;padding:12px;overflow:auto;font-size:12px}
table.acc{border-collapse:collapse;margin-bottom:8px}table.acc td,table.acc th{border-bottom:1px solid #ddd;padding:4px 12px;text-align:right}
td.big{font-size:20px;font-weight:bold}.options code{white-space:nowrap;background:#f2f2f2;padding:1px 4px;margin-right:4px;font-size:12px;line-height:1.9}</style></head><body>
<h1>ctrain report: ${esc(r.job)}</h1>${headline(r.summary)}${computeLine(r.summary)}${charts}
<h2>Confusion matrix (test split, final model)</h2>${confusionTable(r.classes, r.confusion)}
<h2>Summary</h2><pre>${esc(JSON.stringify(r.summary, null, 2))}</pre></body></html>\n`;
}
