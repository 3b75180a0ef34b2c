// Plain canvas line charts: no library, no network. lineChart(canvas, series, options) draws
// every series ({name, points: [[x, y], ...]}) on shared axes and returns the points drawn;
// the count is also left on canvas.dataset.points so a test can read what was drawn.
// options: title, xlabel, yMin, yMax, hline ({y, label}: a dashed reference line, named in the
// legend rather than on the plot, so its label never covers a line).
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

function lineChart(canvas, series, options = {}) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const hline = options.hline;
  const legend = series.length + (hline ? 1 : 0);
  const pad = {l: 52, r: 12, t: 30 + 12 * Math.ceil(legend / 4), b: 30};
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  const pts = series.flatMap(s => s.points.filter(p => Number.isFinite(p[1])));
  const ys = pts.map(p => p[1]).concat(hline ? [hline.y] : []);
  const xs = pts.map(p => p[0]);
  const x0 = xs.length ? Math.min(...xs) : 0, x1 = xs.length ? Math.max(...xs) : 1;
  let y0 = options.yMin ?? (ys.length ? Math.min(0, ...ys) : 0);
  let y1 = options.yMax ?? (ys.length ? Math.max(...ys) : 1);
  if (y1 <= y0) y1 = y0 + 1;
  const sx = x => pad.l + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (w - pad.l - pad.r);
  const sy = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  // ticks at round steps, with faint grid lines
  ctx.lineWidth = 1;
  for (const t of ticks(y0, y1, 5)) {
    ctx.strokeStyle = "#eee"; ctx.beginPath(); ctx.moveTo(pad.l, sy(t)); ctx.lineTo(w - pad.r, sy(t)); ctx.stroke();
    ctx.fillStyle = "#333"; ctx.textAlign = "right"; ctx.fillText(fmt(t), pad.l - 6, sy(t) + 4);
  }
  ctx.textAlign = "center";
  for (const t of x1 > x0 ? ticks(x0, x1, 6) : [x0]) {
    ctx.strokeStyle = "#999"; ctx.beginPath(); ctx.moveTo(sx(t), h - pad.b); ctx.lineTo(sx(t), h - pad.b + 4); ctx.stroke();
    ctx.fillText(fmt(t), sx(t), h - pad.b + 15);
  }
  ctx.textAlign = "right";
  if (options.xlabel) ctx.fillText(options.xlabel, w - pad.r, h - 2);
  ctx.textAlign = "left";
  ctx.strokeStyle = "#999";
  ctx.beginPath(); ctx.moveTo(pad.l, pad.t); ctx.lineTo(pad.l, h - pad.b); ctx.lineTo(w - pad.r, h - pad.b); ctx.stroke();
  ctx.fillStyle = "#333";
  ctx.font = "bold 12px sans-serif";
  ctx.fillText(options.title || "", pad.l, 14);
  ctx.font = "11px sans-serif";
  const legendAt = i => [pad.l + (i % 4) * 105, 28 + 12 * Math.floor(i / 4)];
  let drawn = 0;
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
    let pen = false;
    for (const [x, y] of s.points) {
      if (!Number.isFinite(y)) { pen = false; continue; }
      pen ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y));
      pen = true; drawn += 1;
    }
    ctx.stroke();
    ctx.fillStyle = color;
    ctx.fillText(s.name, ...legendAt(i));
  });
  if (hline) {
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.setLineDash([5, 4]); ctx.beginPath();
    ctx.moveTo(pad.l, sy(hline.y)); ctx.lineTo(w - pad.r, sy(hline.y)); ctx.stroke();
    const [lx, ly] = legendAt(series.length);
    ctx.beginPath(); ctx.moveTo(lx, ly - 4); ctx.lineTo(lx + 14, ly - 4); ctx.stroke(); ctx.setLineDash([]);
    ctx.fillStyle = "#000"; ctx.fillText(hline.label, lx + 18, ly);
  }
  canvas.dataset.points = String(drawn);
  return drawn;
}

// about n round values (steps of 1, 2 or 5 times a power of ten) from lo to hi
function ticks(lo, hi, n) {
  const raw = (hi - lo) / Math.max(1, n - 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Math.round(t / step) * step);
  return out;
}

// numbers for people: 0 not 0.000, 97.7 not 97.7411, 1304 not 1304.2
function fmt(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  const digits = a >= 100 || a === 0 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3;
  return String(Number(v.toFixed(digits)));
}
