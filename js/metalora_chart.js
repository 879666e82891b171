// Pure drawing and bookkeeping for the Meta-LoRA front-end (no ComfyUI imports: unit-tested under node).

export const TRAIN_NODE = "MetaLoRATrainIdentity";
export const SCORE_NODE = "MetaLoRAFaceSimilarity";
export const PROGRESS_EVENT = "metalora.train_progress";
export const CHART_HEIGHT = 120;

// Per-node training history fed by metalora.train_progress events
// ({node, step, total, loss, lr, eta_s}); a step that does not follow the last one starts a new run.
export class ProgressStore {
  constructor() {
    this.runs = new Map();
  }
  add(detail) {
    if (!detail || detail.node === undefined || detail.node === null) return null;
    const key = String(detail.node);
    const step = Number(detail.step);
    const loss = Number(detail.loss);
    let run = this.runs.get(key);
    if (!run || step <= run.lastStep) {
      run = { points: [], total: Number(detail.total) || 0, lastStep: -Infinity };
      this.runs.set(key, run);
    }
    if (Number.isFinite(loss)) run.points.push([step, loss]);
    run.lastStep = step;
    run.total = Number(detail.total) || run.total;
    run.lr = detail.lr;
    run.eta = detail.eta_s;
    return run;
  }
  get(nodeId) {
    return this.runs.get(String(nodeId));
  }
}

export function formatEta(seconds) {
  const s = Math.max(0, Math.round(Number(seconds) || 0));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

// Map loss points into a box {x, y, w, h}: returns [[px, py], ...] (x by step over total, y min..max).
export function chartPoints(run, box) {
  const pts = run.points;
  if (!pts.length) return [];
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, l] of pts) {
    lo = Math.min(lo, l);
    hi = Math.max(hi, l);
  }
  const span = hi - lo || 1;
  const total = Math.max(run.total || 0, pts[pts.length - 1][0], 1);
  return pts.map(([s, l]) => [box.x + (s / total) * box.w, box.y + box.h - ((l - lo) / span) * box.h]);
}

export function drawLossChart(ctx, run, box) {
  ctx.save();
  ctx.fillStyle = "#1b1b1f";
  ctx.fillRect(box.x, box.y, box.w, box.h);
  ctx.strokeStyle = "#555";
  ctx.strokeRect(box.x, box.y, box.w, box.h);
  const inner = { x: box.x + 4, y: box.y + 16, w: box.w - 8, h: box.h - 22 };
  const pts = chartPoints(run, inner);
  if (pts.length > 1) {
    ctx.strokeStyle = "#4fc3f7";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(pts[0][0], pts[0][1]);
    for (const [x, y] of pts.slice(1)) ctx.lineTo(x, y);
    ctx.stroke();
  }
  const last = run.points[run.points.length - 1];
  ctx.fillStyle = "#ddd";
  ctx.font = "11px sans-serif";
  const text = last
    ? `step ${last[0]}/${run.total}  loss ${last[1].toFixed(4)}  eta ${formatEta(run.eta)}`
    : "waiting for the first step";
  ctx.fillText(text, box.x + 4, box.y + 12);
  ctx.restore();
  return pts.length;
}

const VERDICT_COLOURS = { "same person": "#2e7d32", "different person": "#c62828", "no face": "#6d6d6d" };

export function badgeText(score) {
  if (!score) return "";
  const faces = `${score.total - score.no_face}/${score.total} faces`;
  if (score.score === null || score.score === undefined) return `R-FaceSim: no face (${faces})`;
  const pct = score.percent === null || score.percent === undefined ? "" : ` ${Math.round(score.percent)}%`;
  return `R-FaceSim ${Number(score.score).toFixed(3)}${pct} · ${score.verdict} (${faces})`;
}

export function drawBadge(ctx, score, nodeWidth) {
  const text = badgeText(score);
  if (!text) return null;
  ctx.save();
  ctx.font = "bold 11px sans-serif";
  const w = Math.min(nodeWidth, ctx.measureText(text).width + 12);
  const x = nodeWidth - w;
  const y = -LiteGraphTitleHeight() - 22;
  ctx.fillStyle = VERDICT_COLOURS[score.verdict] || "#37474f";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, 18, 6);
  else ctx.rect(x, y, w, 18);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.fillText(text, x + 6, y + 13);
  ctx.restore();
  return { x, y, w, text };
}

function LiteGraphTitleHeight() {
  return globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
}
