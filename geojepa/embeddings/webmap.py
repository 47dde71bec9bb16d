"""``geojepa map OUT``: one self-contained HTML page of a region's tile embeddings.

Tiles are filled with the colour of their embedding's first three principal components (red, green, blue),
over a base of the tiles' own entities (their pieces from ``entity_embeddings.parquet``, grey lines; left
out above ``BASE_COORDINATES`` coordinates to keep the page light). Clicking a tile (or opening the page
with ``#tile=ID``) outlines it and its k nearest tiles by cosine similarity, listed with their similarity
beside the map. Everything is inline (data, script, style): the page needs no network, no server and no
library. Its neighbours are computed here, exactly (``topk_cosine``), not in the browser.

The page reports itself for tests: ``<body data-drawn=N data-errors=M data-selected=ID>``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_contracts import atomic_path, embedding_dim, entity_embeddings, read_table
from geojepa.embeddings.similar import load_tiles
from geojepa.encoding.neighbours import topk_cosine
from geojepa.errors import GeoJepaError
from geojepa.evaluate.figures import bulk_extent, pc_colours
from geojepa.workdir import EmbeddingsDir

BASE_COORDINATES = 400_000


def _rings(footprints) -> list[list[float]]:
    import shapely

    out = []
    for g in footprints:
        ring = shapely.get_coordinates(g.exterior if hasattr(g, "exterior") else g.convex_hull.exterior)
        out.append(np.round(ring.ravel(), 6).tolist())
    return out


def _view(footprints) -> list[float]:
    """The first view: the bulk of the tiles (``bulk_extent``); the "all tiles" button frames every one."""
    import shapely

    centres = shapely.get_coordinates(shapely.centroid(np.asarray(footprints, dtype=object)))
    bounds = shapely.bounds(np.asarray(footprints, dtype=object))
    size = float(np.median(bounds[:, 2] - bounds[:, 0]))
    return [round(v, 6) for v in bulk_extent(centres[:, 0], centres[:, 1], size)]


def _base(path: Path) -> tuple[list[list[float]], int]:
    """The entity pieces' outlines and lines as flat lon/lat lists (points left out), and the coordinate count;
    ([], n) when the region has more than ``BASE_COORDINATES``."""
    import shapely

    if not path.is_file():
        return [], 0
    read_table(path, entity_embeddings(embedding_dim(path)), columns=[])  # the contract check
    parts, total = [], 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["geometry"], batch_size=65_536):
        geoms = shapely.from_wkb(batch.column(0).to_numpy(zero_copy_only=False))
        lines = shapely.get_parts(shapely.boundary(geoms[shapely.get_type_id(geoms) >= 3]))
        lines = np.concatenate([lines, shapely.get_parts(geoms[np.isin(shapely.get_type_id(geoms), (1, 5))])])
        for g in shapely.get_parts(lines):
            c = shapely.get_coordinates(g)
            total += len(c)
            if total > BASE_COORDINATES:
                return [], total
            parts.append(np.round(c.ravel(), 6).tolist())
    return parts, total


def write_map(out: Path | str, k: int = 10, title: str | None = None) -> dict:
    """Write ``OUT/map.html`` (see the module docstring); returns its path and what it holds."""
    out = EmbeddingsDir(out)
    if k < 1:
        raise GeoJepaError(f"-k {k}: ask for one neighbour or more")
    ids, x, footprints = load_tiles(out)
    if len(ids) < 2:
        raise GeoJepaError(f"{out.tile_embeddings}: {len(ids)} tile(s); a map needs two or more")
    rgb = pc_colours(x) * 255
    view = _view(footprints)
    sims, nn = topk_cosine(x, x, min(k, len(ids) - 1), exclude=np.arange(len(ids)))
    base, coordinates = _base(out.entity_embeddings)
    data = {"ids": ids, "rings": _rings(footprints), "rgb": np.round(rgb).astype(int).tolist(),
            "nn": nn.tolist(), "sims": np.round(sims, 4).tolist(), "base": base, "view": view,
            "base_note": "" if base or not coordinates else
            f"base left out: {coordinates:,}+ coordinates (more than {BASE_COORDINATES:,})"}
    title = title or f"GeoJEPA tile embeddings: {out.path.name}"
    page = PAGE.replace("__TITLE__", html.escape(title)).replace(
        "__DATA__", json.dumps(data, separators=(",", ":")).replace("</", "<\\/"))
    try:
        with atomic_path(out.map) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except OSError as e:
        raise GeoJepaError(f"{out.map}: cannot be written ({e.strerror or e})") from None
    return {"map": str(out.map), "tiles": len(ids), "k": int(nn.shape[1]), "base_lines": len(base),
            "base": data["base_note"] or "drawn", "bytes": out.map.stat().st_size}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{margin:0;font:13px system-ui,sans-serif;display:flex;height:100vh;background:#f4f4f2}
 #map{flex:1;position:relative} canvas{width:100%;height:100%;display:block;cursor:crosshair}
 #side{width:300px;overflow:auto;padding:10px;background:#fff;border-left:1px solid #ccc}
 h1{font-size:14px;margin:0 0 6px} td{padding:1px 6px} .sw{display:inline-block;width:10px;height:10px}
 tr.nb:hover{background:#eef}
</style></head>
<body data-drawn="0" data-errors="0" data-selected="">
<div id="map"><canvas id="c"></canvas></div>
<div id="side"><h1>__TITLE__</h1>
<p>Colour: the first three principal components of the tile embeddings (red, green, blue): similar colours,
similar embeddings. Grey: the tiles' entities. Blank squares: tiles with fewer than 5 entities, which are not
embedded. Click a tile for its nearest tiles (cosine similarity). Wheel: zoom; drag: pan.</p><p id="note"></p>
<p><button id="bulk">first view</button> <button id="all"></button></p>
<div id="info"></div><pre id="errors"></pre></div>
<script>
"use strict";
const D = __DATA__;
const body = document.body, errs = [];
window.addEventListener("error", e => { errs.push(String(e.message)); body.dataset.errors = errs.length;
  document.getElementById("errors").textContent = errs.join("\\n"); });
const cv = document.getElementById("c"), ctx = cv.getContext("2d");
let ax0 = Infinity, ay0 = Infinity, ax1 = -Infinity, ay1 = -Infinity;  // every tile
for (const r of D.rings) for (let i = 0; i < r.length; i += 2) {
  ax0 = Math.min(ax0, r[i]); ax1 = Math.max(ax1, r[i]); ay0 = Math.min(ay0, r[i + 1]); ay1 = Math.max(ay1, r[i + 1]); }
const [x0, y0, x1, y1] = D.view;  // the bulk of the tiles: the first view
const kx = Math.cos((y0 + y1) / 2 * Math.PI / 180);  // equirectangular, true to scale at the region's latitude
let scale = 1, ox = 0, oy = 0, selected = -1, framed = D.view;
function fit(box) {
  framed = box || framed;
  const [bx0, by0, bx1, by1] = framed, w = cv.clientWidth, h = cv.clientHeight;
  cv.width = w * devicePixelRatio; cv.height = h * devicePixelRatio;
  scale = 0.95 * Math.min(w / ((bx1 - bx0) * kx || 1e-9), h / ((by1 - by0) || 1e-9));
  ox = (w - (bx1 - bx0) * kx * scale) / 2 - (bx0 - x0) * kx * scale;
  oy = (h - (by1 - by0) * scale) / 2 - (y1 - by1) * scale;
}
const px = (lon, lat) => [ox + (lon - x0) * kx * scale, oy + (y1 - lat) * scale];
function path(flat, close) {
  ctx.beginPath();
  for (let i = 0; i < flat.length; i += 2) { const [a, b] = px(flat[i], flat[i + 1]);
    if (i) ctx.lineTo(a, b); else ctx.moveTo(a, b); }
  if (close) ctx.closePath();
}
function draw() {
  ctx.setTransform(devicePixelRatio, 0, 0, devicePixelRatio, 0, 0);
  ctx.clearRect(0, 0, cv.width, cv.height);
  let drawn = 0;
  D.rings.forEach((r, i) => { const c = D.rgb[i]; path(r, true);
    ctx.fillStyle = `rgba(${c[0]},${c[1]},${c[2]},0.85)`; ctx.fill(); drawn++; });
  ctx.strokeStyle = "rgba(40,40,40,0.45)"; ctx.lineWidth = 0.6;
  for (const b of D.base) { path(b, false); ctx.stroke(); }
  if (selected >= 0) {
    D.nn[selected].forEach((j, n) => { path(D.rings[j], true); ctx.lineWidth = 2.5; ctx.strokeStyle = "#ffe600";
      ctx.stroke(); const [a, b] = px(D.rings[j][0], D.rings[j][1]); ctx.fillStyle = "#000";
      ctx.fillText(String(n + 1), a + 3, b - 3); });
    path(D.rings[selected], true); ctx.lineWidth = 3; ctx.strokeStyle = "#000"; ctx.stroke();
  }
  body.dataset.drawn = drawn;
}
function inside(r, lon, lat) {
  let hit = false;
  for (let i = 0, j = r.length - 2; i < r.length; j = i, i += 2) {
    const xi = r[i], yi = r[i + 1], xj = r[j], yj = r[j + 1];
    if ((yi > lat) !== (yj > lat) && lon < (xj - xi) * (lat - yi) / (yj - yi) + xi) hit = !hit; }
  return hit;
}
const esc = t => String(t).replace(/[&<>"']/g, ch => `&#${ch.charCodeAt(0)};`);
function select(i) {
  selected = i; body.dataset.selected = i >= 0 ? D.ids[i] : "";
  const info = document.getElementById("info");
  if (i < 0) { info.textContent = ""; draw(); return; }
  const rows = D.nn[i].map((j, n) => { const c = D.rgb[j];
    return `<tr class="nb" data-j="${j}"><td>${n + 1}</td><td><span class="sw" style="background:rgb(${c})"></span>
      ${esc(D.ids[j])}</td><td>${D.sims[i][n].toFixed(3)}</td></tr>`; }).join("");
  info.innerHTML = `<b>${esc(D.ids[i])}</b><table id="neighbours">` +
    `<tr><th>#</th><th>tile</th><th>cosine</th></tr>${rows}</table>`;
  info.querySelectorAll("tr.nb").forEach(tr => tr.onclick = () => select(+tr.dataset.j));
  draw();
}
cv.addEventListener("click", e => {
  if (moved) return;
  const lon = x0 + (e.offsetX - ox) / (kx * scale), lat = y1 - (e.offsetY - oy) / scale;
  select(D.rings.findIndex(r => inside(r, lon, lat)));
});
let drag = null, start = null, moved = false;  // a press that travels more than 3 px is a pan, not a click
cv.addEventListener("mousedown", e => { drag = start = [e.offsetX, e.offsetY]; moved = false; });
cv.addEventListener("mousemove", e => { if (!drag) return; const dx = e.offsetX - drag[0], dy = e.offsetY - drag[1];
  if (Math.abs(e.offsetX - start[0]) + Math.abs(e.offsetY - start[1]) > 3) moved = true;
  ox += dx; oy += dy; drag = [e.offsetX, e.offsetY]; draw(); });
window.addEventListener("mouseup", () => { drag = null; });
cv.addEventListener("wheel", e => { e.preventDefault(); const f = Math.exp(-e.deltaY * 0.0015);
  ox = e.offsetX - (e.offsetX - ox) * f; oy = e.offsetY - (e.offsetY - oy) * f; scale *= f; draw(); },
  {passive: false});
window.addEventListener("resize", () => { fit(); draw(); });
document.getElementById("note").textContent = D.base_note;
const centre = r => [0, 1].map(k => r.filter((_, i) => i % 2 === k).reduce((a, b) => a + b) / (r.length / 2));
const outlying = D.rings.map(centre).filter(([cx, cy]) => cx < x0 || cx > x1 || cy < y0 || cy > y1).length;
const allBtn = document.getElementById("all"), bulkBtn = document.getElementById("bulk");
allBtn.textContent = `all tiles (${outlying} outside the first view)`;
allBtn.hidden = bulkBtn.hidden = !outlying;
allBtn.onclick = () => { fit([ax0, ay0, ax1, ay1]); draw(); };
bulkBtn.onclick = () => { fit(D.view); draw(); };
fit();
function fromHash() {
  let want = "";
  try { want = decodeURIComponent((location.hash.match(/tile=([^&]+)/) || [])[1] || ""); } catch (e) { want = ""; }
  select(want ? D.ids.indexOf(want) : -1);
}
window.addEventListener("hashchange", fromHash);
fromHash();
draw();
</script></body></html>
"""
