"""GeoJEPA model and training on the Kotka token shards: packing, DDP over gloo, exact resume, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from geojepa.launch import train as launch_train
from geojepa.model.jepa import Encoder, GeoJEPA, ModelConfig
from geojepa.model.layers import Packing
from geojepa.train.data import Collator, ShardDataset
from geojepa.train.train import NonFiniteLoss, train

TINY = {"width": 32, "depth": 2, "heads": 4, "mlp": 64, "pred_width": 16, "pred_depth": 1, "pred_heads": 2,
        "batch_tiles": 8, "epochs": 1, "max_steps": 4, "num_workers": 0, "log_every": 1, "checkpoint_every": 100,
        "keep_last": 2, "modalities": ("tags", "geometry", "image"), "device": "cpu"}


def _cfg(cfg, **updates):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={**TINY, **updates})})


def _resolved(cfg, w, **updates) -> dict:
    return {**_cfg(cfg, **updates).train.model_dump(mode="json"), "work_dir": str(w)}


@pytest.fixture()
def w(tmp_path, tokenised):
    src, _ = tokenised
    shutil.copytree(src / "tokens", tmp_path / "tokens")
    return tmp_path


def test_a_tile_packed_with_others_encodes_as_alone(w):
    torch.manual_seed(0)
    data = ShardDataset(w / "tokens", "train", ("tags", "geometry", "image"))
    enc = Encoder(ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], data.dims["image"]), width=32, depth=2,
                              heads=4, mlp=64)).eval()
    collate = Collator(("tags", "geometry", "image"), data.dims, seed=0)
    together = collate([data[0], data[1], data[2]])
    alone = collate([data[1]])
    with torch.no_grad():
        out_together = enc(enc.embed(together), Packing(together.doc, 3))[together.doc == 1]
        out_alone = enc(enc.embed(alone), Packing(alone.doc, 1))
    torch.testing.assert_close(out_together, out_alone, atol=1e-5, rtol=1e-5)


def test_loss_parts_and_ema(w):
    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    model = GeoJEPA(ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], 0), width=32, depth=1, heads=4,
                                mlp=64, pred_width=16, pred_depth=1, pred_heads=2))
    batch = Collator(("tags", "geometry"), data.dims, seed=0)([data[i] for i in range(4)])
    out = model(batch)
    assert set(out) >= {"loss", "jepa", "var", "cov"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    before = [p.clone() for p in model.target_encoder.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_target(0.9)
    for b, t, s in zip(before, model.target_encoder.parameters(), model.encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, w, cfg):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(w / "tokens", d / "tokens")
    off = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    launch_train(one, _cfg(off, accumulate=2, max_steps=3), nproc=1)
    launch_train(two, _cfg(off, max_steps=3), nproc=2)
    a = torch.load(one / "checkpoints" / "step-00000003.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints" / "step-00000003.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ha = json.loads((one / "checkpoints" / "history.json").read_text())
    hb = json.loads((two / "checkpoints" / "history.json").read_text())
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], rel=1e-5)


def test_resume_continues_the_loss_curve_exactly(tmp_path, w, cfg):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for d in (whole, cut):
        shutil.copytree(w / "tokens", d / "tokens")
    train(_resolved(cfg, whole, max_steps=6, epochs=2))
    train({**_resolved(cfg, cut, max_steps=6, epochs=2), "stop_after": 3})
    assert sorted(p.name for p in (cut / "checkpoints").glob("*.pt")) == ["step-00000003.pt"]
    train({**_resolved(cfg, cut, max_steps=6, epochs=2), "resume": True})
    a = [h["loss"] for h in json.loads((whole / "checkpoints" / "history.json").read_text())]
    b = [h["loss"] for h in json.loads((cut / "checkpoints" / "history.json").read_text())]
    assert len(a) == 6 and a == pytest.approx(b, rel=1e-6)
    # resuming into another model is named, before any step, and the checkpoints are kept
    kept = sorted((cut / "checkpoints").glob("*.pt"))
    for change, says in (({"tile_head": 1.0}, "tile_head 0.0 -> 1.0"), ({"pos_fourier": 2}, "pos_fourier 0 -> 2"),
                         ({"width": 64}, "width 32 -> 64")):
        with pytest.raises(ValueError, match=f"--resume with another model \\({says}\\)"):
            train({**_resolved(cfg, cut, max_steps=8, epochs=2, **change), "resume": True})
    assert sorted((cut / "checkpoints").glob("*.pt")) == kept


def test_resume_passes_over_a_damaged_last_checkpoint_and_names_it(tmp_path, w, cfg, caplog):
    import logging

    from geojepa.model.jepa import load_checkpoint

    d = tmp_path / "cut"
    shutil.copytree(w / "tokens", d / "tokens")
    train({**_resolved(cfg, d, max_steps=6, epochs=2, checkpoint_every=2, keep_last=3), "stop_after": 4})
    last = d / "checkpoints" / "step-00000004.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk or a killed copy
    with pytest.raises(ValueError, match="step-00000004.pt: damaged"):
        load_checkpoint(last)
    caplog.set_level(logging.WARNING)
    train({**_resolved(cfg, d, max_steps=6, epochs=2, checkpoint_every=2, keep_last=3), "resume": True})
    assert "step-00000004.pt: damaged" in caplog.text and "falling back" in caplog.text
    history = json.loads((d / "checkpoints" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # resumed at step 2, redid 3 and 4


def test_a_run_killed_after_a_checkpoint_resumes_with_its_whole_history(tmp_path, w, cfg, monkeypatch):
    import geojepa.train.train as tt

    d = tmp_path / "killed"
    shutil.copytree(w / "tokens", d / "tokens")
    real = tt.schedules

    def killed_at_step_3(step, *a):
        if step == 3:
            raise KeyboardInterrupt  # as a kill between checkpoints: no end-of-run write
        return real(step, *a)

    monkeypatch.setattr(tt, "schedules", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_resolved(cfg, d, max_steps=6, epochs=2, checkpoint_every=2, keep_last=3))
    history = json.loads((d / "checkpoints" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]  # written with the checkpoint
    monkeypatch.setattr(tt, "schedules", real)
    train({**_resolved(cfg, d, max_steps=6, epochs=2, checkpoint_every=2, keep_last=3), "resume": True})
    history = json.loads((d / "checkpoints" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_a_failed_check_leaves_the_previous_checkpoints_where_evaluate_finds_them(w, cfg):
    launch_train(w, _cfg(cfg))
    before = sorted(p.name for p in (w / "checkpoints").glob("step-*.pt"))
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        launch_train(w, _cfg(cfg, device="cpu"), nproc=3)
    assert sorted(p.name for p in (w / "checkpoints").glob("step-*.pt")) == before and before


def test_checkpoints_load_as_data_only_so_a_pickled_payload_never_runs(tmp_path):
    import pickle

    from geojepa.model.jepa import load_checkpoint

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    bad = tmp_path / "step-00000001.pt"
    torch.save({"model": {}, "config": {}, "step": 1, "x": Payload()}, bad, pickle_module=pickle)
    with pytest.raises(ValueError, match="damaged or not a GeoJEPA checkpoint"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_schedules_follow_the_reference():
    from geojepa.train.train import schedules

    c = {"lr": 1e-3, "warmup": 0.1, "warmup_start": 0.1, "final_lr": 1e-6, "wd": 0.04, "final_wd": 0.4,
         "ema": 0.997, "final_ema": 0.99999, "ema_turnover": 5.0}
    total = 4000  # about the reference's run (300 epochs of ~14,000 tiles in batches of 960): its ramp, as is
    assert schedules(0, total, c) == pytest.approx((1e-4, 0.04, 0.997))
    assert schedules(400, total, c)[0] == pytest.approx(1e-3)
    lr, wd, m = schedules(total, total, c)
    assert lr == pytest.approx(1e-6) and wd == pytest.approx(0.4) and m == pytest.approx(0.99999)


@pytest.mark.parametrize("total", [25, 600, 4000])
def test_the_ema_target_keeps_under_one_percent_of_its_initial_weights_in_a_run_of_any_length(total):
    """With the plain ramp a 600-step run kept 40% of the target's initial weights (and the untrained twin
    is exactly that initial state); tied to the run's length, every run turns the target over."""
    from geojepa.train.train import schedules

    c = {"lr": 1e-3, "warmup": 0.1, "warmup_start": 0.1, "final_lr": 1e-6, "wd": 0.04, "final_wd": 0.4,
         "ema": 0.997, "final_ema": 0.99999}
    kept = lambda c: math.prod(schedules(s, total, c)[2] for s in range(total))  # noqa: E731
    assert kept({**c, "ema_turnover": 5.0}) < 0.01
    if total == 600:
        assert kept({**c, "ema_turnover": 0.0}) > 0.35  # the plain ramp: the failure this fixes


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(w, cfg):
    train(_resolved(cfg, w, max_steps=2, checkpoint_every=1))
    good = sorted(p.name for p in (w / "checkpoints").glob("*.pt"))
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step"):
        train({**_resolved(cfg, w, max_steps=8, checkpoint_every=1, lr=1e12, clip=1e30), "resume": True})
    assert good[-1] in {p.name for p in (w / "checkpoints").glob("*.pt")}


@pytest.mark.parametrize("case,needle", [
    ("missing", "no train-\\*.parquet token shards"),
    ("empty", "token shard holds no tiles"),
    ("version", "tokens schema_version 0, expected 1"),
    ("modality", "asks for 'image', but the shards have no image tokens"),
    ("gpu", "train.device=cuda, but no GPU is visible"),
])
def test_bad_input_fails_before_any_work(w, cfg, case, needle):
    shard = sorted((w / "tokens").glob("train-*.parquet"))[0]
    t = pq.read_table(shard)
    meta = dict(t.schema.metadata)
    if case == "missing":
        shutil.rmtree(w / "tokens")
    elif case == "empty":
        pq.write_table(t.slice(0, 0), shard)
    elif case == "version":
        pq.write_table(t.replace_schema_metadata({**meta, b"geojepa:schema_version": b"0"}), shard)
    elif case == "modality":
        pq.write_table(t.replace_schema_metadata({**meta, b"image_dim": b"0"}), shard)
    c = _cfg(cfg, device="cuda") if case == "gpu" and not torch.cuda.is_available() else _cfg(cfg)
    with pytest.raises(ValueError, match=needle):
        launch_train(w, c)
    assert not (w / "checkpoints").exists() or not list((w / "checkpoints").glob("*.pt"))


def test_model_has_the_reference_size():
    model = GeoJEPA(ModelConfig(dims=(384, 256, 768)))
    n = sum(p.numel() for p in model.encoder.blocks.parameters())
    assert 21e6 < n < 22e6  # 12 x 384, MLP 1536: about 21M parameters




def test_launcher_logs_to_mlflow_and_registers_the_encoder(tmp_path, w, cfg, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    region = tmp_path / "region"
    shutil.copytree(w / "tokens", region / "tokens")
    on = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": True})})
    summary = launch_train(region, _cfg(on, max_steps=2, modalities=("tags", "geometry")))
    assert summary.summary.steps == 2
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["geojepa"], output_format="list")
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert {"loss", "jepa", "var", "cov", "std", "lr", "wd", "momentum", "tokens_per_s"} <= set(
            runs[0].data.metrics
        )
        assert [m.name for m in mlflow.MlflowClient().search_registered_models()] == ["geojepa-encoder"]
        # the registered version is a pyfunc: token shards in, tile embeddings out, as `geojepa embed` makes them
        import pandas as pd

        from geojepa.embeddings.embed import embedded_batches
        from geojepa.encoding.shards import token_index
        from geojepa.model.jepa import encoder_from_checkpoint

        model = mlflow.pyfunc.load_model("models:/geojepa-encoder/1")
        assert [c.name for c in model.metadata.get_input_schema().inputs] == ["work_dir"]
        got = model.predict(pd.DataFrame({"work_dir": [str(region)]}))
        tok = token_index(region / "tokens")
        encoder, _ = encoder_from_checkpoint(summary.summary.checkpoint)
        want = np.concatenate([v for _, v, _ in embedded_batches(tok, encoder, ("tags", "geometry"), 64)])
        assert got["tile_id"].tolist() == list(tok.ids) and len(got) == tok.n
        np.testing.assert_allclose(np.stack(got["embedding"].to_numpy()), want, rtol=0, atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)


def test_a_fresh_run_sets_the_previous_checkpoints_aside(w, cfg):
    first = launch_train(w, _cfg(cfg, max_steps=3, modalities=("tags", "geometry")))
    second = launch_train(w, _cfg(cfg, max_steps=2, modalities=("tags", "geometry")))
    assert first.summary.checkpoint.endswith("step-00000003.pt")
    assert second.summary.checkpoint.endswith("step-00000002.pt")
    assert [p.name for p in (w / "checkpoints").glob("step-*.pt")] == ["step-00000002.pt"]
    assert (w / "checkpoints" / "previous" / "step-00000003.pt").exists()
    assert len(json.loads((w / "checkpoints" / "history.json").read_text())) == 2


def test_training_benchmark_runs_on_cpu():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "train.py"), "--tiles", "16", "--batch", "4",
                          "--steps", "2", "--crop", "50"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "real tokens/s" in out.stdout and "ratio packed/padded: x" in out.stdout
    assert "steps/s with tiles cropped to 50 entities / uncropped: x" in out.stdout


def test_training_imports_without_the_pipeline_packages():
    """GPU hosts have torch, numpy and pyarrow only: the training modules must import there."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'pydantic', 'mlflow', 'prefect', 'osmium', 'duckdb', 'rasterio', 'geopandas',
                                  'shapely', 'yaml', 'typer', 'pyproj'}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import geojepa.model.jepa, geojepa.train.train, geojepa.train.data, geojepa.train.masks
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_flex_attention_path_equals_the_padded_path():
    """The GPU's attention (compiled FlexAttention over the packed sequence with a document mask), run here on
    the CPU, gives what per-tile padded SDPA gives."""
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(dims=(8, 0, 0), width=32, depth=2, heads=4, mlp=64)).eval()
    lengths = [5, 40, 17, 1, 130]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    x = torch.randn(len(doc), 32)
    with torch.no_grad():
        flex = enc(x, Packing(doc, len(lengths), flex=True))
        padded = enc(x, Packing(doc, len(lengths), flex=False))
    torch.testing.assert_close(flex, padded, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(w, cfg):
    losses = {}
    for mode in ("off", "on"):
        run = _resolved(cfg, w, max_steps=3, compile=mode, modalities=("tags", "geometry"))
        shutil.rmtree(w / "checkpoints", ignore_errors=True)
        train(run)
        losses[mode] = [h["loss"] for h in json.loads((w / "checkpoints" / "history.json").read_text())]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-3)


def test_token_rows_hand_out_views_of_every_width_including_tiles_without_images():
    import numpy as np
    import pyarrow as pa

    from geojepa.train.data import TokenRows

    f = pa.list_(pa.float32())
    table = pa.table({
        "entity_position": pa.array([np.arange(16.0), np.arange(8.0)], f),
        "tag": pa.array([np.ones(6), 2 * np.ones(3)], f),
        "geometry": pa.array([np.ones(4), np.ones(2)], f),
        "patch_position": pa.array([np.zeros(16), []], f),
        "image": pa.array([np.ones(10), []], f),
    })
    rows = TokenRows(table, ("tags", "geometry", "image"))
    a, b = rows.item(0), rows.item(1)
    assert a["tags"].shape == (2, 3) and a["image"].shape == (2, 5) and a["ppos"].shape == (2, 8)
    assert b["tags"].tolist() == [[2, 2, 2]] and b["image"].shape == (0, 5) and b["epos"].shape == (1, 8)
    assert rows.lengths(("tags", "geometry", "image")).tolist() == [6, 2]


def test_at_initialisation_the_modality_does_not_drown_the_content(w):
    """Share of the layer-normed encoder outputs' variance explained by the token's modality alone, at
    initialisation (width 128, as in the run the issue measured; GT, the default variant): with an N(0, 1)
    modality embedding beside unnormalised projections it was 92% here (82% with images), and the predictor,
    told each target's modality, drove the loss down without learning content. Now 37%: content dominates."""
    from torch.nn import functional as F

    from geojepa.train.data import pack

    torch.manual_seed(0)
    modalities = ("tags", "geometry")
    data = ShardDataset(w / "tokens", "train", modalities)
    enc = Encoder(ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], 0), width=128, depth=4, heads=4,
                              mlp=512))
    items = [data[i] for i in range(min(16, len(data)))]
    packed = pack(items, modalities)
    packed.pop("tiles")
    empty = torch.zeros(0, dtype=torch.long)
    from geojepa.model.jepa import TokenBatch

    b = TokenBatch(**packed, context=empty, pred_src=empty, pred_is_target=empty.bool(), pred_doc=empty, n_pred_docs=0)
    with torch.no_grad():
        out = F.layer_norm(enc(enc.embed(b), Packing(b.doc, b.n_tiles)), (128,))
    total = ((out - out.mean(0)) ** 2).sum()
    between = sum(((b.modality == m).sum() * ((out[b.modality == m].mean(0) - out.mean(0)) ** 2).sum())
                  for m in b.modality.unique())
    assert float(between / total) < 0.5


def test_targets_carry_their_centre_only_unless_asked_for_their_box(w):
    """A target's rotated box gives away its size and shape: by default the predictor is told its centre."""
    from geojepa.train.masks import MaskConfig

    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    items = [data[i] for i in range(6)]
    for box in (False, True):
        b = Collator(("tags", "geometry"), data.dims, seed=0, masks=MaskConfig(target_box=box))(items)
        src = b.pos[b.pred_src]
        tgt, ctx = b.pred_pos[b.pred_is_target], b.pred_pos[~b.pred_is_target]
        torch.testing.assert_close(ctx, src[~b.pred_is_target])  # the context keeps its boxes
        centre = src[b.pred_is_target].view(-1, 4, 2).mean(1)
        if box:
            torch.testing.assert_close(tgt, src[b.pred_is_target])
        else:
            torch.testing.assert_close(tgt.view(-1, 4, 2), centre[:, None].expand(-1, 4, 2))
            assert not torch.allclose(tgt, src[b.pred_is_target])


def test_vicreg_is_not_met_for_free_by_a_layernorm_scale_when_tiles_collapse(w):
    """Identical tiles (a collapse of tiles onto one another; only their masks differ) keep the variance term
    high under a LayerNorm scale of 10; on the context tokens (before) that scale zeroed it (0.000)."""
    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    torch.manual_seed(0)
    model = GeoJEPA(ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], 0), width=32, depth=1, heads=4,
                                mlp=64, pred_width=16, pred_depth=1, pred_heads=2))
    with torch.no_grad():
        model.encoder.norm.weight.mul_(10)
    same = [data[0]] * 8
    out = model(Collator(("tags", "geometry"), data.dims, seed=0)(same))
    assert out["var"] > 0.3  # the tile-mean half of the hinge near its maximum (1)


def test_the_collapse_monitor_reads_validation_tiles_and_sees_a_collapse(w):
    from geojepa.train.train import CollapseMonitor

    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    torch.manual_seed(0)
    model = GeoJEPA(ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], 0), width=32, depth=1, heads=4,
                                mlp=64, pred_width=16, pred_depth=1, pred_heads=2))
    monitor = CollapseMonitor(ShardDataset(w / "tokens", "val", ("tags", "geometry")), ("tags", "geometry"), "cpu",
                              n=64)
    assert len(monitor.items) == min(64, len(ShardDataset(w / "tokens", "val", ("tags", "geometry"))))
    healthy = monitor(model)
    assert set(healthy) == {
        f"val.{k}.{e}" for k in ("erank", "mean_cos", "within_share") for e in ("target", "context")
    }
    assert 0 < healthy["val.within_share.target"] <= 1
    assert healthy["val.erank.target"] > 2
    with torch.no_grad():  # a collapsed target: every token the same output
        model.target_encoder.norm.weight.zero_()
        model.target_encoder.norm.bias.copy_(torch.linspace(-1, 1, 32))
    collapsed = monitor(model)
    assert collapsed["val.mean_cos.target"] > 0.999 and healthy["val.mean_cos.target"] < 0.99
    assert collapsed["val.mean_cos.context"] == pytest.approx(healthy["val.mean_cos.context"])


def test_a_micro_batch_of_one_tile_has_a_finite_loss(w):
    """An epoch's draw may leave one tile for the last micro-batch: the tile-mean VICReg term needs two rows
    and is left out, not a NaN that stops training."""
    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    torch.manual_seed(0)
    model = GeoJEPA(ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], 0), width=32, depth=1, heads=4,
                                mlp=64, pred_width=16, pred_depth=1, pred_heads=2))
    out = model(Collator(("tags", "geometry"), data.dims, seed=0)([data[0]]))
    assert all(torch.isfinite(v) for v in out.values()), out


def test_the_diagnostics_see_a_tile_wide_gist_and_the_target_terms_spare_a_perfect_predictor():
    """``_context_mean`` is the per-(tile, modality) mean of the context tokens' targets (falling back to the
    tile's, then the batch's); ``within_share`` falls when a tile-wide component is added; the target-relative
    terms are zero for the targets themselves and positive for a collapsed prediction."""
    from geojepa.model.jepa import _context_mean, target_relative_terms, within_share

    g = torch.Generator().manual_seed(0)
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    modality = torch.tensor([0, 0, 1, 1, 0, 0, 1, 0, 1])
    target = torch.randn(9, 8, generator=g)
    group = doc * 3 + modality
    context = torch.tensor([0, 2, 4, 7])
    src = torch.tensor([1, 3, 5, 6, 8])
    got = _context_mean(target, group, context, src, doc, 3)
    want = torch.stack([target[0], target[2], target[4], target[4], target[7]])  # tile 1 image: no context of
    torch.testing.assert_close(got, want)  # its modality there -> the tile's context mean (token 4 alone)
    z = torch.randn(300, 16, generator=g)
    docs = torch.arange(300) // 10
    share = within_share(z, docs, 30)
    gist = z + 3 * torch.randn(30, 16, generator=g)[docs]  # a component shared by each tile's tokens
    assert 0.8 < share <= 1.0 and within_share(gist, docs, 30) < 0.2
    var, cov = target_relative_terms(z, z)
    assert float(var) == 0.0 and float(cov) == pytest.approx(0.0, abs=1e-10)
    var, cov = target_relative_terms(torch.zeros_like(z) + z.mean(0), z)  # one vector for every token
    assert float(var) > 0.5
    shifted = target_relative_terms(z + 5.0, z)  # a constant shift is not what the terms are about
    assert float(shifted[0]) == pytest.approx(0.0, abs=1e-6) and float(shifted[1]) == pytest.approx(0.0, abs=1e-4)


def test_the_target_regulariser_and_centring_train_and_every_step_records_the_diagnostics(w, cfg):
    train(_resolved(cfg, w, modalities=("tags", "geometry"), regulariser="target", target_centre=True,
                    entity_dropout=0.3, max_steps=3))
    history = json.loads((w / "checkpoints" / "history.json").read_text())
    for h in history:
        assert {"trivial", "jepa_gain", "within_share"} <= set(h) and math.isfinite(h["loss"])
        assert h["jepa_gain"] == pytest.approx(h["trivial"] - h["jepa"], abs=1e-6)
        assert "tile_std" not in h  # no VICReg on tile means under the target regulariser
    assert "val.within_share.target" in history[-1]
    assert all(h["within_share"] < 1 - 1e-6 for h in history)  # measured on the uncentred targets
    # centred, the trivial prediction is 0: the same trivial loss as the uncentred context mean, same batch
    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    torch.manual_seed(0)
    model = GeoJEPA(ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], 0), width=32, depth=1, heads=4,
                                mlp=64, pred_width=16, pred_depth=1, pred_heads=2))
    batch = Collator(("tags", "geometry"), data.dims, seed=0)([data[i] for i in range(4)])
    with torch.no_grad():
        plain, centred = model(batch), model(batch, target_centre=True)
    assert float(centred["trivial"]) == pytest.approx(float(plain["trivial"]), rel=1e-6)
    assert float(centred["within_share"]) == pytest.approx(float(plain["within_share"]), rel=1e-6)


def test_a_long_tile_is_cropped_to_a_contiguous_part_of_it_and_short_ones_are_left_whole(w):
    from geojepa.train.data import spatial_crop

    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    i = int(np.argmax(data.lengths))
    item = data[i]
    n = len(item["epos"])
    assert n > 20
    rng = np.random.default_rng(0)
    cut = spatial_crop(item, 10, rng)
    assert len(cut["epos"]) == len(cut["tags"]) == len(cut["geometry"]) == 10
    centres = item["epos"].reshape(n, 4, 2).mean(1)
    kept = [int(np.flatnonzero((item["epos"] == e).all(1))[0]) for e in cut["epos"]]
    assert kept == sorted(kept)  # the tile's order
    for j in range(len(cut["epos"])):  # rows stay together: each kept entity's tags and geometry are its own
        np.testing.assert_array_equal(cut["tags"][j], item["tags"][kept[j]])
    # contiguous: every entity left out is at least as far from the kept ones' nearest anchor candidate
    d = ((centres[:, None] - centres[kept][None]) ** 2).sum(-1)
    anchor = kept[int(np.argmin(d[kept].max(0)))]
    far = ((centres - centres[anchor]) ** 2).sum(1)
    assert far[kept].max() <= np.sort(far)[9] + 1e-9
    short = data[int(np.argmin(data.lengths))]
    assert spatial_crop(short, len(short["epos"]), rng) is short
    collate = Collator(("tags", "geometry"), data.dims, seed=0, max_entities=10)
    b = collate([data[i], short])
    assert (b.doc == 0).sum() == 20  # 10 entities x (tags, geometry)


def test_entity_dropout_leaves_out_one_token_of_a_share_of_the_context_entities():
    from geojepa.model.jepa import MODALITIES
    from geojepa.train.data import entity_dropout

    n = 400  # entities 0..399: tags tokens, then geometry tokens; 10 image patches (entities 400..409)
    tags, geo, img = MODALITIES["tags"], MODALITIES["geometry"], MODALITIES["image"]
    modality = np.r_[np.full(n, tags), np.full(n, geo), np.full(10, img)]
    entity = np.r_[np.arange(n), np.arange(n), n + np.arange(10)]
    context = np.r_[np.arange(300), n + np.arange(200), 2 * n + np.arange(10)]  # entities 0..199 both; 200..299 tags
    assert np.array_equal(entity_dropout(context, modality, entity, 0.0, np.random.default_rng(0)), context)
    out = entity_dropout(context, modality, entity, 0.3, np.random.default_rng(0))
    assert np.all(np.diff(out) > 0) and set(out) <= set(context)  # a subset, in order
    gone = np.setdiff1d(context, out)
    ents = entity[gone]
    assert len(np.unique(ents)) == len(gone)  # never both tokens of an entity
    assert ents.max() < 200  # only entities with both tokens in the context; images and single tokens kept
    assert 40 <= len(gone) <= 80  # about 30% of 200
    assert 0.3 < np.mean(modality[gone] == tags) < 0.7  # tags or geometry, at random
    again = entity_dropout(context, modality, entity, 0.3, np.random.default_rng(0))
    assert np.array_equal(out, again)  # deterministic per generator


def test_the_monitor_reports_the_jepa_gain_on_validation_tiles_under_masks_fixed_once(w):
    from geojepa.train.train import CollapseMonitor

    mods = ("tags", "geometry")
    val = ShardDataset(w / "tokens", "val", mods)
    torch.manual_seed(0)
    model = GeoJEPA(ModelConfig(dims=(val.dims["tags"], val.dims["geometry"], 0), width=32, depth=1, heads=4,
                                mlp=64, pred_width=16, pred_depth=1, pred_heads=2))
    collate = Collator(mods, val.dims, seed=0, max_entities=8, entity_dropout=0.5)
    monitor = CollapseMonitor(val, mods, "cpu", collate=collate, loss_weights={"regulariser": "target"})
    first = monitor(model)
    assert first["val.jepa_gain"] == pytest.approx(first["val.trivial"] - first["val.jepa"])
    assert first["val.jepa"] > 0 and first["val.trivial"] > 0
    assert monitor(model) == first  # the same tiles and masks every time: checkpoints are comparable
    # whole-entity masks whatever the training's partial entity masks: arms are compared on one task
    from geojepa.train.settings import MaskConfig

    partial = Collator(mods, val.dims, seed=0, masks=MaskConfig(p_partial=1.0))
    assert CollapseMonitor(val, mods, "cpu", collate=partial, loss_weights={"regulariser": "target"})(model) == first
    assert model.training  # left as it was
    with torch.no_grad():
        for p in model.predictor.parameters():
            p.mul_(0.0)
    assert monitor(model)["val.jepa"] != first["val.jepa"]  # it reads the model it is given
    assert "val.jepa" not in CollapseMonitor(val, mods, "cpu")(model)  # without the collator: collapse only


def test_fourier_positions_and_the_tile_head_train_and_the_encoder_loads_with_its_own_position_width(w, cfg, caplog):
    import logging

    from geojepa.model.jepa import encoder_from_checkpoint
    from geojepa.model.layers import PositionMLP

    caplog.set_level(logging.INFO)
    pos = torch.rand(5, 8)
    mlp = PositionMLP(16, fourier=3)
    assert mlp.net[0].in_features == 8 * 7 and mlp(pos).shape == (5, 16)
    assert "freqs" not in mlp.state_dict()  # derived from the setting, not stored
    train(_resolved(cfg, w, modalities=("tags", "geometry"), regulariser="target", target_centre=True,
                    pos_fourier=3, tile_head=0.5, max_steps=3))
    history = json.loads((w / "checkpoints" / "history.json").read_text())
    assert all({"tile", "tile_gain"} <= set(h) and math.isfinite(h["tile"]) for h in history)
    assert any(" tile " in r.getMessage() and "(gain " in r.getMessage() for r in caplog.records
               if "step 3/3" in r.getMessage())  # the head's loss on the console's step line
    ckpt = sorted((w / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True)
    assert any(k.startswith("tile_head.") for k in state["model"])
    encoder, conf = encoder_from_checkpoint(ckpt)
    assert conf["pos_fourier"] == 3 and encoder.pos.net[0].in_features == 8 * 7
    twin, _ = encoder_from_checkpoint(ckpt, untrained=True)
    assert twin.pos.net[0].in_features == 8 * 7  # the twin has the same architecture
    # a checkpoint from before the setting (no pos_fourier in its config) loads as the raw-position model
    old = _plain_checkpoint(w, cfg)
    assert encoder_from_checkpoint(old)[0].pos.net[0].in_features == 8


def _plain_checkpoint(w, cfg):
    out = w / "plain"
    shutil.copytree(w / "tokens", out / "tokens")
    train(_resolved(cfg, out, modalities=("tags", "geometry"), max_steps=1))
    ckpt = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["pos_fourier"]
    torch.save(state, ckpt)
    return ckpt


def test_the_tile_head_adds_its_loss_and_is_refused_on_a_model_without_it(w):
    data = ShardDataset(w / "tokens", "train", ("tags", "geometry"))
    sizes = ModelConfig(dims=(data.dims["tags"], data.dims["geometry"], 0), width=32, depth=1, heads=4, mlp=64,
                        pred_width=16, pred_depth=1, pred_heads=2)
    batch = Collator(("tags", "geometry"), data.dims, seed=0)([data[i] for i in range(4)])
    torch.manual_seed(0)
    model = GeoJEPA(sizes, tile_head=True)
    with torch.no_grad():
        plain, headed = model(batch, regulariser="target"), model(batch, regulariser="target", tile_head=2.0)
    assert "tile" not in plain and float(headed["tile"]) > 0
    model.zero_grad()
    model(batch, regulariser="target", tile_head=2.0)["loss"].backward()
    assert model.tile_head[1].weight.grad.abs().sum() > 0  # the head learns, and through it the context encoder
    grads = [p.grad for p in model.encoder.blocks[0].parameters()]
    model.zero_grad()
    model(batch, regulariser="target")["loss"].backward()
    assert model.tile_head[1].weight.grad is None  # without its weight, the head takes no part
    assert not all(torch.equal(a, p.grad) for a, p in zip(grads, model.encoder.blocks[0].parameters(), strict=True))
    assert float(headed["loss"]) >= float(plain["loss"]) + 2.0 * float(headed["tile"]) - 1e-5
    with pytest.raises(ValueError, match="tile_head > 0 needs a model built with its head"):
        GeoJEPA(sizes)(batch, tile_head=1.0)
