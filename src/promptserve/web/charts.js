// Plain canvas line charts: no library, no network. lineChart(canvas, series, options) draws
// every series ({name, points: [[x, y], ...]}) on shared axes and returns the points drawn;
// the count is also left on canvas.dataset.points so a test can read what was drawn.
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

function lineChart(canvas, series, options = {}) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const pad = {l: 52, r: 10, t: 30 + 12 * Math.ceil(series.length / 4), b: 30};
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  const pts = series.flatMap(s => s.points.filter(p => Number.isFinite(p[1])));
  const hline = options.hline;
  const ys = pts.map(p => p[1]).concat(hline ? [hline.y] : []);
  const xs = pts.map(p => p[0]);
  const x0 = xs.length ? Math.min(...xs) : 0, x1 = xs.length ? Math.max(...xs) : 1;
  let y0 = options.yMin ?? (ys.length ? Math.min(0, ...ys) : 0);
  let y1 = options.yMax ?? (ys.length ? Math.max(...ys) : 1);
  if (y1 <= y0) y1 = y0 + 1;
  const sx = x => pad.l + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (w - pad.l - pad.r);
  const sy = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#999"; ctx.fillStyle = "#333"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(pad.l, pad.t); ctx.lineTo(pad.l, h - pad.b); ctx.lineTo(w - pad.r, h - pad.b); ctx.stroke();
  for (const t of [y0, (y0 + y1) / 2, y1]) ctx.fillText(fmt(t), 4, sy(t) + 4);
  ctx.fillText(fmt(x0), pad.l, h - 10);
  ctx.fillText(fmt(x1) + (options.xlabel ? " " + options.xlabel : ""), w - pad.r - 90, h - 10);
  ctx.font = "bold 12px sans-serif";
  ctx.fillText(options.title || "", pad.l, 14);
  ctx.font = "11px sans-serif";
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
    ctx.fillText(s.name, pad.l + (i % 4) * 105, 28 + 12 * Math.floor(i / 4));
  });
  if (hline) {
    ctx.strokeStyle = "#000"; ctx.setLineDash([5, 4]); ctx.beginPath();
    ctx.moveTo(pad.l, sy(hline.y)); ctx.lineTo(w - pad.r, sy(hline.y)); ctx.stroke(); ctx.setLineDash([]);
    ctx.fillStyle = "#000"; ctx.fillText(hline.label, pad.l + 4, sy(hline.y) - 4);
  }
  canvas.dataset.points = String(drawn);
  return drawn;
}

function fmt(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(1) : v.toFixed(3);
}
