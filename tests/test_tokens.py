"""Tokens on the real Kotka sample: vocabulary sums, image-patch locality, caching, shards, the shape encoder."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import TAG_VOCAB, TILE_IMAGES, TILES, TOKENS, ContractError, read_table, write_table
from geojepa.errors import GeoJepaError
from geojepa.tokens import text as text_backends
from geojepa.tokens import tokens
from geojepa.tokens.fitting import build_vocab
from geojepa.tokens.image import ViTB16, patch_positions, pixel_patches
from geojepa.tokens.vocab import Vocab, entry_text, value_token
from tests.conftest import small_tokens as _cfg


def test_tag_vector_is_the_sum_of_its_tags_vectors(tokenised):
    w, _ = tokenised
    vocab = read_table(w / "tag_vocab.parquet", TAG_VOCAB).to_pylist()
    vec = {(r["key"], r["value"]): np.asarray(r["embedding"]) for r in vocab}
    te = pq.read_table(w / "tile_entities.parquet")
    row = read_table(w / "tokens", TOKENS).to_pylist()[0]
    tags = dict(zip(te["entity_id"].to_pylist(), te["tags"].to_pylist(), strict=False))
    dim = len(next(iter(vec.values())))
    got = np.asarray(row["tag"]).reshape(-1, dim)
    fallbacks = 0
    for i, eid in enumerate(row["entity_id"]):
        expected = np.zeros(dim)
        for k, v in tags[eid]:
            key = (k, value_token(k, v))
            if key not in vec:
                key, fallbacks = (k, None), fallbacks + 1
            expected += vec[key]
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-5)
    assert {r["text"] for r in vocab} >= {entry_text("building", "yes"), "building"}


def test_entity_without_tags_gets_a_zero_vector():
    v = Vocab(["a", "a"], [None, "x"], np.eye(2, dtype=np.float32))
    out = v.tag_vectors([[("a", "x")], [], [("a", "unseen")], [("b", "y")]])
    np.testing.assert_array_equal(out, [[0, 1], [0, 0], [1, 0], [0, 0]])


def test_numeric_tags_are_bucketed_and_free_text_falls_back_to_the_key():
    assert value_token("maxspeed", "50") == value_token("maxspeed", "55") == "50-59 km/h"
    assert value_token("maxspeed", "35 mph") == "50-59 km/h"  # x1.6
    assert value_token("maxspeed", "walk") == "walk"
    assert value_token("name", "Kotkan kirkko") is None and value_token("addr:housenumber", "12") is None


def test_image_patch_tokens_are_local():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    a = pixel_patches(img)
    img2 = img.copy()
    img2[16:32, 48:64] = 0  # patch row 1, col 3
    b = pixel_patches(img2)
    changed = np.flatnonzero(np.any(a != b, axis=1))
    assert a.shape == (196, 768) and changed.tolist() == [1 * 14 + 3]
    pos = patch_positions(14)
    assert pos[0].tolist() == pytest.approx([0, 13 / 14, 1 / 14, 13 / 14, 1 / 14, 1, 0, 1])


def test_shards_round_trip_sorted_by_length_and_follow_the_split(tokenised):
    w, summary = tokenised
    files = sorted((w / "tokens").glob("*.parquet"))
    assert files and all(f.name.split("-")[0] in {"train", "val", "test"} for f in files)
    tiles = read_table(w / "tiles.parquet", TILES).to_pylist()
    split = {t["tile_id"]: t["split"] for t in tiles}
    rows = 0
    for f in files:
        t = read_table(f, TOKENS)
        meta = pq.read_schema(f).metadata
        tag_dim, geo_dim, img_dim = (int(meta[k]) for k in (b"tag_dim", b"geometry_dim", b"image_dim"))
        lengths = t["length"].to_pylist()
        assert lengths == sorted(lengths)
        for r in t.to_pylist():
            n, p = len(r["entity_id"]), len(r["patch_position"]) // 8
            assert r["length"] == n + p and p == 196
            assert len(r["tag"]) == n * tag_dim and len(r["geometry"]) == n * geo_dim
            assert len(r["entity_position"]) == n * 8 and len(r["image"]) == p * img_dim
            assert split[r["tile_id"]] == f.name.split("-")[0]
        rows += t.num_rows
    assert rows == sum(s != "gap" for s in split.values()) == summary.summary.tiles


def test_rerun_on_unchanged_input_embeds_and_retokenises_nothing(tokenised, cfg):
    w, first = tokenised
    first, again = first.as_dict(), tokens(w, _cfg(cfg), force=True).as_dict()
    assert first["vocab_embedded"] > 0 and first["tiles_tokenised"] == first["tiles"]
    assert again["vocab_embedded"] == 0 and again["tiles_tokenised"] == 0 and again["tiles_reused"] == first["tiles"]


def test_shape_encoder_learned(tokenised):
    s = tokenised[1].as_dict()
    # Against an untrained copy of the encoder whose heads were trained the same way (2 short epochs here).
    assert s["geometry_val_loss"] < 0.8 * s["geometry_val_loss_untrained"]
    assert s["knn_descriptor_distance"] < 0.5 * s["random_descriptor_distance"]


def test_corrupt_image_is_named(tokenised, tmp_path, cfg):
    w, _ = tokenised
    bad = tmp_path / "w"
    shutil.copytree(w, bad)
    images = read_table(bad / "tile_images.parquet", TILE_IMAGES)
    broken = images.set_column(1, "pixels", pa.array([b"\x00" * 10] * images.num_rows, pa.binary()))
    shutil.rmtree(bad / "tile_images.parquet")
    (bad / "tile_images.parquet").mkdir()
    write_table(broken, bad / "tile_images.parquet" / "part-0.parquet", TILE_IMAGES)
    with pytest.raises(GeoJepaError, match=r"tile_images.parquet: tile EPSG\d+-300m-c\d+-r\d+: image has 10 bytes"):
        tokens(bad, _cfg(cfg), force=True)


def test_wrong_tile_artifact_schema(tokenised, tmp_path, cfg):
    w, _ = tokenised
    bad = tmp_path / "w"
    shutil.copytree(w, bad)
    shutil.copy(bad / "tag_vocab.parquet", bad / "tiles.parquet")
    with pytest.raises(ContractError, match="tiles.parquet: is a 'tag_vocab' artifact, expected 'tiles'"):
        tokens(bad, _cfg(cfg), force=True)


class _Hashing:
    """A deterministic stand-in for the remote API in the resume test (the logic under test is ours)."""

    name, dim, batch_size = "test-hash", 8, 3

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def embed(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise GeoJepaError("network down")
        return np.array([np.random.default_rng(abs(hash(t)) % 2**32).random(8) for t in texts], np.float32)


def test_vocabulary_resumes_after_an_interruption(tmp_path, cfg, monkeypatch, caplog):
    tags = [[("amenity", "cafe"), ("building", "yes")], [("shop", "bakery"), ("name", "X")], [("highway", "primary")]]
    path = tmp_path / "vocab.parquet"
    monkeypatch.setattr("geojepa.tokens.fitting.open_embedder", lambda name: _Hashing(fail_after=1))
    with pytest.raises(GeoJepaError, match="network down"):
        build_vocab(path, tags, cfg.tokens)
    saved = read_table(path, TAG_VOCAB).num_rows
    assert saved == 3  # the first request's entries survived
    done = _Hashing()
    monkeypatch.setattr("geojepa.tokens.fitting.open_embedder", lambda name: done)
    with caplog.at_level("INFO", logger="geojepa"):
        vocab, embedded = build_vocab(path, tags, cfg.tokens)
    assert f"vocabulary {embedded}/{embedded} texts embedded" in caplog.text  # progress, request by request
    assert embedded == len(vocab.index) - saved and done.calls == -(-embedded // 3)
    assert build_vocab(path, tags, cfg.tokens)[1] == 0


def test_voyage_needs_a_key_and_says_how_to_go_offline(monkeypatch):
    monkeypatch.delenv("VOYAGE_API_KEY", raising=False)
    with pytest.raises(GeoJepaError, match="VOYAGE_API_KEY.*tokens.text_model=minilm"):
        text_backends.open_embedder("voyage")
    assert text_backends.Voyage.batch_size <= 128


def test_retries_with_backoff_then_gives_up_clearly():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert text_backends.with_retries(flaky, retries=3, backoff=0.001) == "ok" and len(calls) == 3
    with pytest.raises(GeoJepaError, match="failed after 2 attempts.*minilm"):
        text_backends.with_retries(lambda: 1 / 0, retries=1, backoff=0.001)


def test_vit_refuses_random_weights_unless_asked():
    with pytest.raises(GeoJepaError, match="vit_weights"):
        ViTB16(None)
    tokens_ = ViTB16(None, allow_random=True).tokens([np.zeros((224, 224, 3), np.uint8)])
    assert tokens_.shape == (1, 197, 768)


def test_retiling_with_another_seed_rewrites_every_split_in_the_shards(tokenised, tmp_path, cfg):
    """The per-tile hash covers the split: rows reused from the previous shards never keep their old split
    (before, 52 tiles in test-* shards carried 'train' after re-tiling with tile.seed=7)."""
    from geojepa.tile import tile

    src, _ = tokenised
    w = tmp_path / "w"
    shutil.copytree(src, w)
    reseeded = cfg.model_copy(update={"tile": cfg.tile.model_copy(update={"seed": 7})})
    tile(w, reseeded, imagery="render")
    tokens(w, _cfg(reseeded))
    split = dict(zip(*read_table(w / "tiles.parquet", TILES, columns=["tile_id", "split"]).to_pydict().values(),
                     strict=True))
    for shard in sorted((w / "tokens").glob("*.parquet")):
        rows = read_table(shard, TOKENS, columns=["tile_id", "split"]).to_pydict()
        assert all(
            s == shard.name.split("-")[0] == split[t] for t, s in zip(rows["tile_id"], rows["split"], strict=True)
        )
