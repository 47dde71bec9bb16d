"""Benchmark: `geojepa tile` against a straightforward geopandas clip per tile, in one run.

On synthetic cities (`geojepa synth`, labelled synthetic) of 10 and 100 km2:
tiles per second and pieces per second of the tile stage (vector only), its
peak memory (to show it stays flat as the region grows), imagery clipping
tiles per second from a GeoTIFF mosaic of the region (2 x 2 files in
EPSG:3857, 1 m pixels), and the baseline: `geopandas.clip` of the projected
entities to each tile box, then normalising the coordinates, timed over a
sample of tiles (the entities already loaded and projected, to the baseline's
advantage). Each of ours runs in its own child process.

    python bench/tile.py                # 10 and 100 km2
    python bench/tile.py --sizes 2 --baseline-tiles 20   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, run_child, synth_pbf  # noqa: E402

EXTRACT = """
import json, sys
from geojepa.config import load_config
from geojepa.extract import extract
s = extract(sys.argv[1], sys.argv[2], load_config(overrides=["tracking.enabled=false"]))
print(json.dumps({"entities": s.get("entities")}))
"""

TILE = """
import json, sys
from geojepa.config import load_config
from geojepa.tile import tile
imagery = sys.argv[2] if len(sys.argv) > 2 else None
s = tile(sys.argv[1], load_config(overrides=["tracking.enabled=false"]), imagery=imagery, force=True)
print(json.dumps({k: s[k] for k in ("tiles", "tiles_with_entities", "pieces", "seconds", "partitions")}))
"""

MOSAIC = """
import json, sys
from pathlib import Path
import numpy as np, rasterio
from rasterio.transform import from_bounds
from rasterio.warp import transform_bounds
import pyarrow.parquet as pq, json as j
w, out = Path(sys.argv[1]), Path(sys.argv[2])
geo = j.loads(pq.read_metadata(w / "entities.parquet").metadata[b"geo"])
x0, y0, x1, y1 = transform_bounds("EPSG:4326", "EPSG:3857", *geo["columns"]["geometry"]["bbox"])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
res = 1.3  # EPSG:3857 units per pixel: about 1 m on the ground at 40 degrees latitude
xs, ys = np.linspace(x0, x1, 3), np.linspace(y0, y1, 3)
for i in range(2):
    for k in range(2):
        b = (xs[i], ys[k], xs[i + 1], ys[k + 1])
        wpx, hpx = int((b[2] - b[0]) / res), int((b[3] - b[1]) / res)
        with rasterio.open(out / f"mosaic_{i}_{k}.tif", "w", driver="GTiff", width=wpx, height=hpx, count=3,
                           dtype="uint8", crs="EPSG:3857", transform=from_bounds(*b, wpx, hpx), tiled=True,
                           blockxsize=256, blockysize=256) as dst:
            for _, win in dst.block_windows(1):
                dst.write(rng.integers(0, 255, (3, win.height, win.width), dtype=np.uint8), window=win)
print(json.dumps({"files": 4}))
"""

BASELINE = """
import json, sys, time
import geopandas as gpd, numpy as np, pyarrow.parquet as pq, shapely
w, n = sys.argv[1], int(sys.argv[2])
tiles = pq.read_table(f"{w}/tiles.parquet").to_pylist()
gdf = gpd.read_parquet(f"{w}/entities.parquet").to_crs(tiles[0]["crs"])
step = max(1, len(tiles) // n)
sample = tiles[::step][:n]
t0 = time.perf_counter()
pieces = 0
for t in sample:
    x0, y0, s = t["origin_x"], t["origin_y"], t["size_m"]
    clipped = gpd.clip(gdf, shapely.box(x0, y0, x0 + s, y0 + s))
    norm = clipped.geometry.translate(-x0, -y0).scale(1 / s, 1 / s, origin=(0, 0))
    pieces += len(norm)
seconds = time.perf_counter() - t0
print(json.dumps({"tiles": len(sample), "pieces": pieces, "seconds_loop": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--imagery-sizes", type=float, nargs="*", default=[10, 100],
                    help="sizes that also get a GeoTIFF mosaic (1 m pixels: 1,000 km2 would be 3 GB)")
    ap.add_argument("--baseline-tiles", type=int, default=100)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    results = []
    for km2 in args.sizes:
        w = DATA / f"tile-{km2:g}km2"
        run_child(EXTRACT, synth_pbf(km2), w)
        plain = run_child(TILE, w)
        imaged = None
        if km2 in args.imagery_sizes:
            mosaic = DATA / f"mosaic-{km2:g}km2"
            if not mosaic.exists():
                run_child(MOSAIC, w, mosaic)
            imaged = run_child(TILE, w, mosaic)
        base = run_child(BASELINE, w, args.baseline_tiles)
        ours_rate = plain["tiles_with_entities"] / plain["seconds"]
        base_rate = base["tiles"] / base["seconds_loop"]
        print(f"synthetic {km2:g} km2: {plain['tiles_with_entities']} occupied tiles ({plain['tiles']} kept), "
              f"{plain['pieces']:,} pieces, {plain['partitions']} partitions")
        print(f"  geojepa tile      {plain['seconds']:7.2f} s  {ours_rate:8.1f} tiles/s  "
              f"{plain['pieces'] / plain['seconds']:9,.0f} pieces/s  peak {plain['peak_rss_mb']:5.0f} MB")
        if imaged:
            img_rate = imaged["tiles"] / max(imaged["seconds"] - plain["seconds"], 1e-9)
            print(f"  + imagery         {imaged['seconds']:7.2f} s  {img_rate:8.1f} image tiles/s (224 px from the "
                  f"mosaic)  peak {imaged['peak_rss_mb']:5.0f} MB")
        print(f"  geopandas clip    {base['seconds_loop']:7.2f} s  {base_rate:8.1f} tiles/s  (sample of {base['tiles']} tiles)"
              f"  peak {base['peak_rss_mb']:5.0f} MB")
        print(f"  ratio geojepa/geopandas: x{ours_rate / base_rate:.1f} tiles/s", flush=True)
        results.append({"km2": km2, "ours": plain, "imagery": imaged, "baseline": base})
    (DATA / "tile_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
