"""The SRAI peers (the `peers` extra) on the Kotka sample: their inputs are our tiles and entities, the masked
setting removes the label tags from them, GeoVeX's square grid puts each neighbour where its hexagonal kernels
expect it, and a missing extra is a clear skip."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from geojepa.encoding.shards import token_index
from geojepa.evaluate import peers
from geojepa.evaluate.labels import TASKS

needs_srai = pytest.mark.skipif(peers.missing() is not None, reason=f"SRAI peers: {peers.missing()}")


@pytest.fixture(scope="module")
def kotka(tokenised):
    w, _ = tokenised
    tok = token_index(w / "tokens")
    region = peers.load_region(w / "tiles.parquet", w / "tile_entities.parquet", tok.ids, tok.split.astype(str), 512)
    return w, tok, region


@needs_srai
def test_count_is_the_tiles_own_entity_count_per_tag(kotka):
    w, tok, region = kotka
    fitted = peers.fit(region, ("count",), epochs=1, seed=0)
    x = fitted.embed(region)["count"]
    assert x.shape == (tok.n, len(region.names))
    col = region.names.index("building_yes")
    te = pq.read_table(w / "tile_entities.parquet", columns=["tile_id", "entity_id", "tags"]).to_pylist()
    want = Counter(
        t for t, _ in {(r["tile_id"], r["entity_id"]) for r in te if dict(r["tags"]).get("building") == "yes"}
    )
    assert np.expm1(x[:, col]).round(4).tolist() == [float(want.get(t, 0)) for t in tok.ids]  # log(1 + count)
    assert x[:, col].sum() > 0


@needs_srai
def test_every_peer_embeds_every_tile_and_masked_tags_never_reach_them(kotka):
    _, tok, region = kotka
    fitted = peers.fit(region, peers.PEERS, epochs=1, seed=0)
    plain = fitted.embed(region)
    task = TASKS["building_count"]
    masked = region.masked(task.defines)
    assert not any(task.defines(k, v) for k in masked.features.columns if k != "geometry"
                   for v in masked.features[k].dropna().unique())
    assert any(task.defines(k, v) for k in region.features.columns if k != "geometry"
               for v in region.features[k].dropna().unique())  # the unmasked features had them
    got = fitted.embed(masked)
    width = {"count": len(region.names), "contextual_count": len(region.names), "hex2vec": 50, "geovex": 32}
    building = [i for i, n in enumerate(region.names) if n.startswith("building_")]
    has_building = plain["count"][:, building].sum(1) > 0
    assert has_building.any() and (~has_building).any()
    for name in peers.PEERS:
        assert got[name].shape == plain[name].shape == (tok.n, width[name]), name
        assert np.isfinite(got[name]).all()
        assert fitted.stats[name].transform_s > 0 and (name in ("count", "contextual_count")
                                                        or fitted.stats[name].fit_s > 0)
    assert (got["count"][:, building] == 0).all() and (got["contextual_count"][:, building] == 0).all()
    # A tile's own vector changes exactly when its own tags changed (Count, Hex2Vec: no neighbours in them).
    for name in ("count", "hex2vec"):
        same = np.isclose(got[name], plain[name]).all(1)
        assert (same == ~has_building).all(), name
    # Hex2Vec and GeoVeX learnt something: tiles differ from one another.
    assert plain["hex2vec"].std(0).mean() > 0 and plain["geovex"].std(0).mean() > 0
    assert set(region.train) == {t for t, s in zip(tok.ids, tok.split, strict=True) if s == "train"}


@needs_srai
def test_hex2vec_and_geovex_are_fitted_on_the_training_tiles_only(kotka):
    """Fitting on the whole region and on its training tiles alone gives the same weights (seeded): the
    validation and test tiles never reach a fit."""
    _, _, region = kotka
    whole = peers.fit(region, ("hex2vec", "geovex"), epochs=1, seed=3)
    alone = peers.fit(region.subset(region.train), ("hex2vec", "geovex"), epochs=1, seed=3)
    for name in ("hex2vec", "geovex"):
        a, b = whole.models[name]._model.state_dict(), alone.models[name]._model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert len(region.train) < len(region.regions)


@needs_srai
def test_geovex_trains_its_hexagonal_kernels_and_keeps_them_hexagonal(kotka):
    """SRAI 0.10.2 swaps each hexagonal convolution's weight for a new tensor at every call, so training never
    moves it; with the fix the kernels are trained and their two masked corners stay zero."""
    from srai.embedders.geovex.model import HexagonalConv2d

    _, _, region = kotka
    train = region.subset(region.train)
    m = peers._SquareGeoVex(region.names, 2)
    m._prepare_model(m._get_raw_counts(train.regions, train.features, train.joint), 0.001)
    convs = [c for c in m._model.modules() if isinstance(c, HexagonalConv2d)]
    before = [(c.conv.weight * c.hexagonal_mask).detach().clone() for c in convs]  # the masked initial kernels
    m.fit_grid(train, {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                       "enable_progress_bar": False, "enable_model_summary": False})
    assert len(convs) >= 3
    for c, w0 in zip(convs, before, strict=True):
        w = c.conv.weight.detach()
        assert not torch.allclose(w, w0), "a hexagonal convolution was not trained"
        assert (w[..., 0, 0] == 0).all() and (w[..., 2, 2] == 0).all()


@needs_srai
def test_geovex_square_grid_puts_neighbours_where_the_hexagonal_kernels_expect_them():
    import pandas as pd
    from srai.embedders.geovex.model import build_mask_funcs

    # A 7 x 7 grid whose tile (c, r) holds the one-hot feature c * 7 + r; (3, 3) at the centre, radius 2.
    ids = [f"{c},{r}" for c in range(7) for r in range(7)]
    counts = pd.DataFrame(np.eye(49, dtype=np.float32), index=ids)
    grid = {t: tuple(map(int, t.split(","))) for t in ids}
    ds = peers.square_grid_dataset(counts, grid, radius=2, centres=["3,3", "0,0"])
    x = ds[0].numpy()  # (features, 6, 6)
    assert x.shape == (49, 6, 6)
    w_dist, _ = build_mask_funcs(2)

    def place(c, r):
        hit = np.argwhere(x[c * 7 + r] == 1)
        return tuple(hit[0]) if len(hit) else None

    assert place(3, 3) == (2, 2)
    # The six hexagonal neighbours: the four sides and the (+1 column, -1 row) diagonal and its opposite...
    for c, r in ((4, 3), (2, 3), (3, 4), (3, 2), (4, 2), (2, 4)):
        a, b = place(c, r)
        assert w_dist(a, b) == pytest.approx(1 / 2), (c, r)  # GeoVeX's ring-1 weight
    # ...the other diagonal is two rings out, and ring-3 tiles are left out.
    assert w_dist(*place(4, 4)) == pytest.approx(1 / 3) and place(5, 5) is None
    assert int(x.sum()) == 1 + 6 + 12  # a full hexagon of radius 2
    # At the grid's corner the missing neighbours stay zero; the tile itself is still there.
    corner = ds[1].numpy()
    assert corner[0, 2, 2] == 1 and 1 < corner.sum() < 19


@needs_srai
def test_a_tag_valued_null_does_not_collide_with_srais_empty_cells(tokenised, tmp_path):
    """London has ``type=null``: SRAI's dummy of an empty ``type`` cell has the same name, ``type_null``."""
    import pyarrow as pa

    from data_contracts import TILE_ENTITIES

    w, _ = tokenised
    tok = token_index(w / "tokens")
    te = pq.read_table(w / "tile_entities.parquet")
    rows = te.to_pylist()
    train = [r for r in rows if r["tile_id"] in {t for t, s in zip(tok.ids, tok.split, strict=True) if s == "train"}]
    for r in train[:40]:
        r["tags"] = [*r["tags"], ("type", "null")]
    for r in train[40:80]:
        r["tags"] = [*r["tags"], ("type", "multipolygon")]
    pq.write_table(pa.Table.from_pylist(rows, schema=TILE_ENTITIES.schema), tmp_path / "tile_entities.parquet")
    region = peers.load_region(w / "tiles.parquet", tmp_path / "tile_entities.parquet", tok.ids,
                               tok.split.astype(str), 512)
    assert "type_multipolygon" in region.names and "type_null" not in region.names
    x = peers.fit(region, ("count",), epochs=1, seed=0).embed(region)["count"]
    assert x[:, region.names.index("type_multipolygon")].sum() > 0


def test_a_missing_extra_is_a_clear_skip_not_a_failure(monkeypatch, tmp_path):
    from geojepa.config import load_config
    from geojepa.evaluate.baselines import peer_vectors
    from geojepa.evaluate.cache import Cache
    from geojepa.evaluate.report import _peers as report_lines

    monkeypatch.setitem(sys.modules, "srai", None)  # import srai -> ImportError, as without the extra
    why = peers.missing()
    assert why.startswith("srai is not installed: pip install 'geojepa[peers]'")
    section = load_config().evaluate
    def _peers(paths, tok, sets, section):
        return peer_vectors(paths, tok, sets, section, Cache(None), {}, contextlib.nullcontext())

    every, per_task, notes = _peers({}, None, {}, section)
    assert every == {} and per_task == {} and notes == {"skipped": why}
    assert f"Skipped: {why}." in report_lines(notes)
    off = section.model_copy(update={"peers": ()})
    assert _peers({}, None, {}, off)[2] == {"skipped": "none asked (evaluate.peers is empty)"}


@needs_srai
def test_srais_progress_bars_stay_out_of_the_logs(kotka, capfd):
    """ContextualCount draws a tqdm bar per tile batch; inside the evaluation it draws nothing, and SRAI's own
    tqdm is back afterwards."""
    import srai.embedders.contextual_count_embedder as ccm

    _, _, region = kotka
    before = ccm.tqdm
    capfd.readouterr()
    peers.fit(region, ("contextual_count",), epochs=1, seed=0).embed(region)
    err = capfd.readouterr().err
    assert "it/s" not in err and "\r" not in err, err[-300:]
    assert ccm.tqdm is before
