"""The compact tokens that travel to a GPU host (geojepa/train/compact.py) on the Kotka sample: they hold the
shards' tiles and, to fp16/int8 precision, their tokens' principal coordinates; training reads them directly
(with a wall-clock budget); a model trained on them exports to a checkpoint that takes the full tokens and
computes what the compact model computed; a bad file is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_contracts import ContractError
from geojepa.model.jepa import GeoJEPA, ModelConfig, encoder_from_checkpoint
from geojepa.model.sizes import ModelSizes
from geojepa.train.compact import Compact, CompactDataset, build, export, fold
from geojepa.train.data import ShardDataset
from geojepa.train.settings import TrainRun, TrainSettings
from geojepa.train.train import train

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ("tags", "geometry")
TINY = ModelSizes(width=32, depth=1, heads=4, mlp=64, pred_width=16, pred_depth=1, pred_heads=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenised):
    src, _ = tokenised
    out = tmp_path_factory.mktemp("compact") / "kotka.npz"
    meta = build([src / "tokens"], out, ("train", "val"), tag_dim=16, geometry_dim=8)
    return src, out, meta


def test_the_compact_file_holds_every_tile_and_the_tokens_principal_coordinates(corpus):
    src, path, meta = corpus
    assert meta["regions"] == [src.name] and meta["dims"] == {"tags": 16, "geometry": 8}
    assert 0 < meta["retained_variance"]["tags"] <= 1 and meta["bytes"] == path.stat().st_size
    c = Compact(path)
    maps = c.maps()
    for split in ("train", "val"):
        shards, compact = ShardDataset(src / "tokens", split, MODALITIES), CompactDataset(path, split, MODALITIES)
        assert len(compact) == len(shards) and np.array_equal(compact.lengths, shards.lengths)
        for i in (0, len(shards) - 1):
            full, small = shards[i], compact[i]
            np.testing.assert_allclose(small["epos"], full["epos"], atol=1e-3)
            for m in MODALITIES:
                axes, mean = maps[m]
                want = (full[m] - mean) @ axes.T
                scale = np.abs(want).max() + 1e-6  # fp16 (tags) and int8 per axis (geometry) rounding
                assert np.abs(small[m] - want).max() <= scale * (1e-2 if m == "geometry" else 2e-3), m
    with pytest.raises(ContractError, match="holds the \\['train', 'val'\\] splits, not 'test'"):
        CompactDataset(path, "test", MODALITIES)


def test_folding_gives_a_model_of_the_full_tokens_that_computes_the_same(corpus, tmp_path):
    src, path, _ = corpus
    c = Compact(path)
    torch.manual_seed(0)
    model = GeoJEPA(ModelConfig(dims=(16, 8, 0), **vars(TINY)))
    ckpt = tmp_path / "step-00000001.pt"
    torch.save({"step": 1, "model": model.state_dict(), "config": {**vars(TINY), "modalities": list(MODALITIES)}},
               ckpt)
    out = export(ckpt, c, tmp_path / "model.pt", half=False)
    full = ShardDataset(src / "tokens", "train", MODALITIES)[0]
    for which, trained in (("target", model.target_encoder), ("context", model.encoder)):
        folded, config = encoder_from_checkpoint(out, which=which)
        assert config["tokenizer_digest"] == c.meta["tokenizer_digest"]
        for i, m in enumerate(MODALITIES):
            axes, mean = c.maps()[m]
            x = torch.from_numpy(full[m].copy())
            want = trained.proj[i](torch.from_numpy((full[m] - mean) @ axes.T))
            torch.testing.assert_close(folded.proj[i](x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(folded.blocks[0].state_dict(), trained.blocks[0].state_dict())
    from geojepa.info import info

    about = info(out)  # geojepa info reads a model file back from the GPU
    assert about["kind"] == "checkpoint" and about["encoders"] == ["encoder", "target_encoder"]
    assert about["tokenizer_digest"] == c.meta["tokenizer_digest"] and about["size"]["width"] == TINY.width
    assert info(path)["kind"] == "compact tokens" and info(path)["regions"] == [src.name]
    half = export(ckpt, c, tmp_path / "half.pt")
    assert half.stat().st_size < out.stat().st_size * 0.6  # fp16, and no predictor or optimiser state
    assert fold({}, c.maps()) == {}  # a state without the projections is left as it is


def test_training_reads_the_compact_file_and_stops_at_its_time_limit(corpus, tmp_path):
    src, path, _ = corpus
    settings = TrainSettings(batch_tiles=8, max_steps=50, num_workers=0, log_every=1, checkpoint_every=1000,
                             device="cpu", modalities=MODALITIES)
    run = TrainRun(model=TINY, settings=settings, out_dir=str(tmp_path / "m"), data=(str(path),),
                   time_limit_s=0.01)
    last = train(run)
    assert last["step"] == 1  # the limit passed during the first step: checkpointed and stopped
    ckpts = sorted((tmp_path / "m" / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000001.pt"]
    history = json.loads((tmp_path / "m" / "checkpoints" / "history.json").read_text())
    assert "val.mean_cos.target" in history[-1]  # the collapse monitor read the compact file's val tiles
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["model"]["encoder.proj.0.weight"].shape == (32, 16)
    assert state["config"]["regions"] == [src.name]


def test_the_time_limit_cuts_the_run_after_ten_steps_and_the_schedules_follow(corpus, tmp_path, monkeypatch):
    _, path, _ = corpus
    import geojepa.train.train as loop

    class Clock:  # each reading one second later: a step costs one reading, so the run sees 1 s a step
        now = 0.0

        def perf_counter(self):
            self.now += 1.0
            return self.now

    monkeypatch.setattr(loop, "time", Clock())
    settings = TrainSettings(batch_tiles=8, max_steps=400, num_workers=0, log_every=1000, checkpoint_every=1000,
                             device="cpu", modalities=MODALITIES)
    run = TrainRun(model=TINY, settings=settings, out_dir=str(tmp_path / "m"), data=(str(path),), time_limit_s=30)
    train(run)
    history = json.loads((tmp_path / "m" / "checkpoints" / "history.json").read_text())
    # the start, one reading before the loop, then one a step: at step 10, 11 s after the start, the 19 s left
    # at 1 s a step fit int(19 x 0.95) = 18 more steps
    assert len(history) == 10 + 18
    assert history[-1]["lr"] < 0.01 * settings.lr  # the cosine reached its end at the cut length, not at 400
    assert [p.name for p in (tmp_path / "m" / "checkpoints").glob("step-*.pt")] == ["step-00000028.pt"]
    with pytest.raises(ValueError, match="time_limit_s and resume"):
        TrainRun(model=TINY, settings=settings, out_dir=str(tmp_path / "m"), data=(str(path),), time_limit_s=30,
                 resume=True)


def test_training_refuses_a_compact_file_that_holds_a_holdout_region(corpus, tmp_path):
    src, _, _ = corpus
    path = tmp_path / "with-holdout.npz"
    build([src / "tokens"], path, tag_dim=8, geometry_dim=4, holdouts=[src.name, "elsewhere"])
    assert Compact(path).holdouts == [src.name]
    settings = TrainSettings(batch_tiles=8, max_steps=2, num_workers=0, device="cpu", modalities=MODALITIES)
    with pytest.raises(ValueError, match=f"holds the holdout region\\(s\\) {src.name}; training must never"):
        train(TrainRun(model=TINY, settings=settings, out_dir=str(tmp_path / "m"), data=(str(path),)))


def test_a_bad_compact_file_is_named(corpus, tmp_path):
    _, good, _ = corpus
    bad = tmp_path / "corpus.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ContractError, match="corpus.npz: not a readable compact tokens file"):
        Compact(bad)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    with pytest.raises(ContractError, match="corpus.npz: not a readable compact tokens file"):
        Compact(bad)
    model = GeoJEPA(ModelConfig(dims=(5, 8, 0), **vars(TINY)))  # not trained on these 16 tag coordinates
    torch.save({"step": 1, "model": model.state_dict(), "config": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: its tags projection takes 5 inputs, the compact coordinates"):
        export(tmp_path / "other.pt", good, tmp_path / "out.pt")
    assert not list(tmp_path.glob("*out.pt*"))
    np.savez(bad, meta=np.frombuffer(json.dumps({"format": "other/9"}).encode(), np.uint8))
    with pytest.raises(ContractError, match="format 'other/9', expected"):
        Compact(bad)
    with pytest.raises(ContractError, match="must end in .npz"):
        build([tmp_path], tmp_path / "corpus.bin")
    with pytest.raises(ContractError, match="no train/val token shards"):
        build([tmp_path], tmp_path / "new.npz")
    from geojepa.config import load_config
    from geojepa.errors import GeoJepaError
    from geojepa.launch import train as launch_train

    with pytest.raises(GeoJepaError, match="corpus.npz: a compact tokens file; `geojepa train` takes regions"):
        launch_train(tmp_path / "m", load_config(overrides=["tracking.enabled=false"]), data=[bad])
    assert not (tmp_path / "new.npz").exists()


@pytest.mark.slow  # two tiny arms through real torchrun jobs and an evaluation: about 2 min on this 2-core machine
def test_the_gpu_sweep_runs_end_to_end_on_the_cpu_with_tiny_arms_and_its_models_evaluate_here(corpus, tmp_path, cfg):
    import shutil

    from data_contracts import EVAL_RESULTS, read_table
    from geojepa.evaluate import evaluate
    from geojepa.workdir import WorkDir

    src, path, _ = corpus
    out = tmp_path / "sweep"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_sweep.py"), str(path), str(out), "--tiny",
                    "--minutes", "1", "--arms", "vicreg", "fourier"], check=True, cwd=ROOT)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == ["vicreg", "fourier"] and all(r["steps"] > 0 for r in rows)
    for r in rows:
        encoder, config = encoder_from_checkpoint(out / r["arm"] / "model.pt")
        full = Compact(path).meta["full_dims"]
        assert (encoder.proj[0].in_features, encoder.proj[1].in_features) == (full["tags"], full["geometry"])
        assert config["regulariser"] == ("target" if r["arm"] == "fourier" else "vicreg")
        fourier = 6 if r["arm"] == "fourier" else 0  # the architecture travels in the exported config
        assert config["pos_fourier"] == fourier and encoder.pos.net[0].in_features == 8 * (1 + 2 * fourier)
    # a model back from the sweep is evaluated here on the full tokens, like any checkpoint
    w = tmp_path / src.name
    w.mkdir()
    for name in ("entities.parquet", "tiles.parquet", "tile_entities.parquet", "tile_images.parquet",
                 "tag_vocab.parquet", "tokens", "manifests", "region.json"):
        if (src / name).exists():
            (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, w / name)
    ecfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "tasks": ("building_count",), "probes": ("ridge",), "peers": (), "twin_seeds": 1, "unmasked": False,
        "map": "pca"}), "tracking": cfg.tracking.model_copy(update={"enabled": False})})
    evaluate(w, ecfg, model=out / "fourier" / "model.pt")  # its Fourier positions and twins, here too
    results = read_table(WorkDir(w).eval.results, EVAL_RESULTS).to_pylist()
    assert {r["model"] for r in results if r["task"] == "building_count"} >= {"geojepa", "geojepa_context"}
