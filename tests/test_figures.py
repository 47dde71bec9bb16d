"""Pictures that read at a glance: region maps framed on the bulk of the tiles, in colours that show on white."""

from __future__ import annotations

import numpy as np
import shapely

from geojepa.evaluate.figures import bulk_extent, pc_colours, region_map


def _town(rng, n=400, size=0.003):
    """A town of n tiles on a grid near (10, 50), and two stray tiles 30 km off."""
    side = int(np.ceil(np.sqrt(n)))
    xy = np.array([(10 + i % side * size, 50 + i // side * size) for i in range(n)])
    xy = np.r_[xy, [[10.4, 50.0], [9.6, 50.3]]]
    return [shapely.box(x, y, x + size, y + size).wkb for x, y in xy], xy + size / 2


def test_the_frame_is_the_bulk_of_the_tiles_not_a_stray_one():
    rng = np.random.default_rng(0)
    _, centres = _town(rng)
    x0, y0, x1, y1 = bulk_extent(centres[:, 0], centres[:, 1], pad=0.003)
    inside = (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
    assert inside[:400].all() and not inside[400:].any()
    assert x1 - x0 < 0.1  # the town's ~6 km, not the strays' 80 km
    few = centres[[0, 1, 2, 400]]  # a handful of tiles: all of them framed
    fx0, _, fx1, _ = bulk_extent(few[:, 0], few[:, 1], pad=0.003)
    assert fx0 < 10.0 and fx1 > 10.4


def test_colours_are_strong_despite_extreme_tiles():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 16))
    emb[:3] *= 200  # three extreme tiles would squeeze a min-max stretch into the middle
    rgb = pc_colours(emb)
    assert rgb.min() >= 0 and rgb.max() <= 1
    spread = rgb[3:].std(0)
    assert (spread > 0.2).all()  # min-max scaling gives ~0.01 here


def test_the_region_map_frames_the_town_and_counts_the_strays(tmp_path):
    rng = np.random.default_rng(0)
    footprints, _ = _town(rng)
    path = tmp_path / "region.png"
    assert region_map(footprints, rng.normal(size=(len(footprints), 8)), path, "town") == 2
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    saturated = (img.max(2) - img.min(2)) > 40
    assert saturated.mean() > 0.25  # the tiles fill the picture, not a sliver of it
