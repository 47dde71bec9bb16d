"""Nearest shapes under the trained shape encoder: a few query pieces and their 5 nearest neighbours.

    python bench/shapes.py work/helsinki        # after `make demo`; writes work/helsinki/nearest_shapes.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely
import torch
from PIL import Image, ImageDraw

from geojepa.tokens import geometry as G


def draw(geom, size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    minx, miny, maxx, maxy = geom.bounds
    scale = (size - 8) / max(maxx - minx, maxy - miny, 1e-9)

    def px(c):
        return [(4 + (x - minx) * scale, size - 4 - (y - miny) * scale) for x, y in c]

    for part in shapely.get_parts(geom):
        if part.geom_type == "Polygon":
            d.polygon(px(part.exterior.coords), fill=(170, 140, 130), outline="black")
        elif part.geom_type == "LineString":
            d.line(px(part.coords), fill="black", width=2)
        else:
            (x, y), = px(part.coords)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill="black")
    return img


def main(w: Path) -> None:
    te = pq.read_table(w / "tile_entities.parquet", columns=["entity_id", "kind", "tags", "geometry"])
    geoms = shapely.transform(shapely.from_wkb(te["geometry"].to_numpy(zero_copy_only=False)), lambda c: c * 300)
    state = torch.load(w / "geometry_encoder.pt", map_location="cpu", weights_only=True)
    enc = G.ShapeEncoder(state["dim"])
    enc.load_state_dict(state["model"])
    z = G.encode(enc, geoms)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    area, n = shapely.area(geoms), shapely.get_num_coordinates(geoms)
    kinds = np.array(te["kind"].to_pylist())
    queries = [int(np.argmax(np.where(kinds == "polygon", area, 0))),  # the largest polygon
               int(np.flatnonzero((kinds == "polygon") & (n > 12))[0]),  # a detailed polygon
               int(np.flatnonzero(kinds == "line")[len(np.flatnonzero(kinds == "line")) // 2])]  # a line
    rows = []
    for q in queries:
        sim = z @ z[q]
        sim[q] = -np.inf
        near = np.argsort(-sim)[:5]
        tags = lambda i: ",".join(f"{k}={v}" for k, v in te["tags"][i].as_py()[:2])  # noqa: E731
        print(f"query {te['entity_id'][q]} ({kinds[q]}, {area[q]:.0f} m2, {n[q]} vertices, {tags(q)})")
        for i in near:
            print(f"   {sim[i]:.3f} {te['entity_id'][i]} ({kinds[i]}, {area[i]:.0f} m2, {n[i]} vertices, {tags(i)})")
        rows.append([draw(geoms[q])] + [draw(geoms[i]) for i in near])
    sheet = Image.new("RGB", (6 * 100, len(rows) * 100), (230, 230, 230))
    for r, imgs in enumerate(rows):
        for c, img in enumerate(imgs):
            sheet.paste(img, (c * 100 + 2, r * 100 + 2))
    sheet.save(w / "nearest_shapes.png")
    print(f"gallery: {w / 'nearest_shapes.png'} (first column: queries)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
