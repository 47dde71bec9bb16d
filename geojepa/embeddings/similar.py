"""``geojepa similar OUT QUERY -k 10``: the tiles nearest a tile by cosine similarity of their embeddings.

Exact search (``topk_cosine``: one matrix product per chunk of queries against the whole gallery; a query
against a million 256-wide tiles is one 1 GB pass, well under a second, so an approximate index buys nothing
for single queries). QUERY is a tile id or ``lon,lat`` (the tile that contains the point). Writes a gallery,
``OUT/similar/<query>.png`` and ``.html``, drawing each tile's entities from ``entity_embeddings.parquet``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts import embedding_dim, entity_embeddings, read_table, tile_embeddings
from geojepa.encoding.neighbours import topk_cosine
from geojepa.errors import GeoJepaError
from geojepa.workdir import EmbeddingsDir


def load_tiles(out: Path) -> tuple[list[str], np.ndarray, object]:
    """(tile ids, (tiles, dim) float32 embeddings, shapely footprints) of ``OUT/tile_embeddings.parquet``."""
    import shapely

    path = EmbeddingsDir(out).tile_embeddings
    if not path.is_file():
        raise GeoJepaError(f"{path}: missing; run `geojepa embed SOURCE {out} --model M` first")
    t = read_table(path, tile_embeddings(embedding_dim(path)), columns=["tile_id", "embedding", "geometry"])
    emb = t["embedding"].combine_chunks()
    x = emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), emb.type.list_size).astype(np.float32)
    return t["tile_id"].to_pylist(), x, shapely.from_wkb(t["geometry"].to_numpy(zero_copy_only=False))


def find_tile(query: str, ids: list[str], footprints, path: Path) -> int:
    """The row of ``query``: a tile id, or ``lon,lat`` inside a tile footprint."""
    import shapely

    if point := _point(query):
        lon, lat = point
        inside = np.flatnonzero(shapely.intersects_xy(footprints, lon, lat))  # a shared edge: the first tile
        if not len(inside):
            b = shapely.total_bounds(footprints)
            hint = ""
            if -90 <= lon <= 90 and shapely.intersects_xy(footprints, lat, lon).any():
                hint = f"; did you mean {lat},{lon}? (longitude first)"
            elif b[0] <= lon <= b[2] and b[1] <= lat <= b[3]:
                hint = ("; it lies within their extent, in a tile that was not embedded: tiles with fewer than "
                        "5 entities (gaps) are left out by the tile stage")
            raise GeoJepaError(f"{query}: the point ({lon}, {lat}) is in none of the {len(ids)} tiles of {path} "
                               f"(their extent: lon {b[0]:.4f}..{b[2]:.4f}, lat {b[1]:.4f}..{b[3]:.4f}){hint}")
        return int(inside[0])
    try:
        return ids.index(query)
    except ValueError:
        example = f"tile ids look like {ids[0]!r}; " if ids else "it holds no tiles; "
        raise GeoJepaError(f"{query}: no such tile in {path} ({example}or pass lon,lat)") from None


def _point(query: str) -> tuple[float, float] | None:
    """``lon,lat`` as two finite numbers in range, else None (then the query is a tile id)."""
    parts = query.split(",")
    if len(parts) != 2:
        return None
    try:
        lon, lat = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    if not (np.isfinite(lon) and np.isfinite(lat)):
        return None
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise GeoJepaError(f"{query}: not a lon,lat in degrees (lon -180..180, lat -90..90)")
    return lon, lat


def similar(out: Path | str, query: str, k: int = 10, gallery: bool = True) -> dict:
    """The ``k`` nearest tiles of ``query`` (rank, tile id, cosine, centre lon/lat) and the gallery files."""
    import shapely

    out = EmbeddingsDir(out)
    if k < 1:
        raise GeoJepaError(f"-k {k}: ask for one neighbour or more")
    ids, x, footprints = load_tiles(out)
    q = find_tile(query, ids, footprints, out.tile_embeddings)
    sims, nn = topk_cosine(x[q : q + 1], x, k, exclude=np.array([q]))
    centres = shapely.get_coordinates(shapely.centroid(footprints))
    rows = [{"rank": r + 1, "tile_id": ids[i], "cosine": round(float(s), 4), "lon": round(float(centres[i, 0]), 6),
             "lat": round(float(centres[i, 1]), 6)} for r, (s, i) in enumerate(zip(sims[0], nn[0], strict=True))]
    result = {"query": ids[q], "neighbours": rows}
    if k > len(ids) - 1:
        result["note"] = f"-k {k}: the region has {len(ids) - 1} other tiles; all are listed"
    if gallery:
        shown = min(len(rows), GALLERY_MAX)
        try:
            result["gallery"] = _gallery(out, q, nn[0][:shown], sims[0][:shown], ids, footprints)
        except OSError as e:
            result["gallery_error"] = f"{out.similar}: the gallery could not be written ({e.strerror or e})"
        if shown < len(rows):
            result["gallery_note"] = f"the gallery draws the {shown} nearest"
    return result


GALLERY_MAX = 20  # neighbours drawn in a gallery (the table lists all k)


def table(result: dict) -> str:
    """The neighbours as a text table."""
    lines = [f"tiles nearest {result['query']} (cosine similarity of the tile embeddings)",
             f"{'rank':>4}  {'tile_id':<28} {'cosine':>7}  {'lon':>11} {'lat':>10}"]
    lines += [f"{r['rank']:>4}  {r['tile_id']:<28} {r['cosine']:>7.4f}  {r['lon']:>11.6f} {r['lat']:>10.6f}"
              for r in result["neighbours"]]
    for key in ("note", "gallery_note", "gallery_error"):
        if key in result:
            lines.append(result[key])
    if "gallery" in result:
        lines.append(f"gallery: {result['gallery']['html']}")
    return "\n".join(lines)


def _gallery(out: EmbeddingsDir, q: int, nn: np.ndarray, sims: np.ndarray, ids: list[str], footprints) -> dict:
    """The query and its neighbours drawn from their entities (lon/lat pieces scaled into each tile's box)."""
    import shapely

    from geojepa.evaluate.figures import gallery

    tiles = [q, *nn.tolist()]
    path = out.entity_embeddings
    want = [ids[i] for i in tiles]
    drawings = {i: {"geometries": [], "classes": []} for i in tiles}
    if path.is_file():
        read_table(path, entity_embeddings(embedding_dim(path)), columns=[])  # the contract check
        t = pq.read_table(path, columns=["tile_id", "class", "geometry"], filters=pc.field("tile_id").isin(want))
        at = {tid: i for i, tid in zip(tiles, want, strict=True)}
        geoms = shapely.from_wkb(t["geometry"].to_numpy(zero_copy_only=False))
        for tid, cls, g in zip(t["tile_id"].to_pylist(), t["class"].to_pylist(), geoms, strict=True):
            i = at[tid]
            x0, y0, x1, y1 = shapely.bounds(footprints[i])
            unit = shapely.transform(g, lambda c, x0=x0, y0=y0, x1=x1, y1=y1: (c - [x0, y0]) / [x1 - x0, y1 - y0])
            drawings[i]["geometries"].append(shapely.to_wkb(unit))
            drawings[i]["classes"].append(cls)
    row = [(ids[q], 1.0, drawings[q])] + [(ids[i], float(s), drawings[i]) for i, s in zip(nn, sims, strict=True)]
    folder = out.similar
    folder.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ids[q])
    png, page = folder / f"{name}.png", folder / f"{name}.html"
    gallery(png, page, f"tiles nearest {ids[q]} (cosine similarity)", [row])
    return {"png": str(png), "html": str(page)}
