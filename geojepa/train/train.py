"""GeoJEPA training, run as-is under torchrun: ``torchrun --nproc_per_node N -m geojepa.train CONFIG.json``.

The launcher (``geojepa train W``) resolves the config and writes it as JSON
(a ``TrainRun``: ``geojepa.train.settings``, plain dataclasses), so this module
needs only torch, numpy and pyarrow (bare GPU hosts have no pydantic, mlflow or
prefect); mlflow is imported lazily, on rank 0 only, and skipped when absent.
DDP over gloo (CPU) or NCCL (GPU); rank 0 alone logs and writes checkpoints
(atomically, every ``checkpoint_every`` steps and at the end, the last
``keep_last`` kept). ``resume`` continues exactly: the data order
is a function of (seed, epoch) and the step, and RNG states are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data_contracts import atomic_path
from geojepa.model.jepa import (
    GeoJEPA,
    ModelConfig,
    TokenBatch,
    collapse_stats,
    load_checkpoint,
    tile_means,
    within_share,
)
from geojepa.progress import duration
from geojepa.settings import from_dict
from geojepa.train.compact import CompactDataset
from geojepa.train.data import Collator, MixedBatches, ShardDataset, pack, region_quotas
from geojepa.train.settings import TrainRun, TrainSettings
from geojepa.workdir import CheckpointsDir, ModelDir, WorkDir, checkpoints_in

log = logging.getLogger("geojepa.train")
COLLAPSE_COS = 0.95  # validation tiles' mean pairwise cosine above which training warns of collapse


class NonFiniteLoss(RuntimeError):
    pass


def schedules(step: int, total: int, s: TrainSettings | Mapping) -> tuple[float, float, float]:
    """(learning rate, weight decay, EMA momentum) at ``step``: linear warm-up from 0.1x then cosine to
    ``final_lr``; weight decay cosine from ``wd`` to ``final_wd``; momentum linear ``ema`` -> ``final_ema``,
    moved away from 1 in short runs so the target turns over (``ema_turnover``). ``s``: the settings, or
    some of them in their JSON form (the rest at their defaults)."""
    if isinstance(s, Mapping):
        s = from_dict(TrainSettings, s)
    warm = max(1, int(s.warmup * total))
    if step < warm:
        lr = s.lr * (s.warmup_start + (1 - s.warmup_start) * step / warm)
    else:
        t = (step - warm) / max(1, total - warm)
        lr = s.final_lr + 0.5 * (s.lr - s.final_lr) * (1 + math.cos(math.pi * t))
    t = step / max(1, total)
    wd = s.final_wd + 0.5 * (s.wd - s.final_wd) * (1 + math.cos(math.pi * t))
    momentum = s.ema + (s.final_ema - s.ema) * t
    # The target must move in a run of any length: over the run, sum(1 - momentum) is at least ema_turnover
    # (e^-5: under 1% of the initial weights left). Long runs keep the reference's ramp; shorter ones scale
    # its distance from 1 up (a 600-step run kept 40% of its initial weights with the plain ramp).
    turnover = total * (1 - (s.ema + s.final_ema) / 2)
    need = s.ema_turnover
    if 0 < turnover < need:
        momentum = max(0.0, 1 - (1 - momentum) * need / turnover)
    return lr, wd, momentum


def _setup_distributed(device_setting: str = "auto") -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_setting != "cpu" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def load_last_good(folder: Path, device="cpu") -> dict:
    """The newest checkpoint in ``folder`` that loads; damaged newer ones are named and passed over."""
    for path in reversed(checkpoints_in(folder)):
        try:
            state = load_checkpoint(path, device)
        except ValueError as e:
            log.warning("%s; falling back to the checkpoint before it", e)
            continue
        log.info("resuming from %s", path)
        return state
    raise ValueError(f"{folder}: no checkpoint there loads; start afresh without --resume")


def open_split(run: TrainRun, split: str, modalities: tuple[str, ...]):
    """The ``split`` tiles of the run's data: its regions' token shards, or its compact tokens file."""
    if run.compact:
        data = CompactDataset(run.data[0], split, modalities)
        if data.compact.holdouts:
            raise ValueError(f"{run.data[0]}: holds the holdout region(s) {', '.join(data.compact.holdouts)}; "
                             "training must never see them (build it from the training regions only)")
        return data
    return ShardDataset([WorkDir(w).tokens for w in run.data], split, modalities)


def validation_set(run: TrainRun, modalities: tuple[str, ...], train_set):
    """The validation tiles of the run's data (the regions that have some), or None; ``train_set``: its
    training split (a compact file is read once)."""
    if run.compact:
        compact = train_set.compact
        val = CompactDataset(compact, "val", modalities) if "val" in compact.meta["splits"] else None
        return val if val is not None and len(val) else None
    folders = [WorkDir(w).tokens for w in run.data]
    have = [f for f in folders if any(pq.read_metadata(s).num_rows for s in f.glob("val-*.parquet"))]
    return ShardDataset(have, "val", modalities) if have else None


class CollapseMonitor:
    """Tile-level collapse detectors on up to ``n`` validation tiles (``val``: a dataset, or None): effective
    rank and mean pairwise cosine of the tiles' mean embeddings, by the target and the context encoder.
    Token-level statistics miss a collapse of tiles onto one another. With ``collate`` (the training
    collator), also the JEPA loss, the trivial context-mean loss and ``jepa_gain`` on those tiles under
    masks fixed once (the same every checkpoint): whether the predictor beats the tile's gist on tiles it
    never trained on."""

    def __init__(self, val, modalities: tuple[str, ...], device, n: int = 256, seed: int = 0,
                 collate: Collator | None = None, loss_weights: dict | None = None):
        self.items, self.modalities, self.device = [], modalities, device
        self.masked, self.loss_weights = [], loss_weights or {}
        if val is not None:  # (the val splits are a tenth of the tiles, held in memory like the train split)
            pick = np.random.default_rng(seed).permutation(len(val))[:n]
            self.items = [val[int(i)] for i in np.sort(pick)]
            if collate is not None and len(self.items) >= 3:
                # no crop, no dropout, no partial entities: whole-entity masks (arms that change the masks'
                # shape, e.g. block_area, are still read under their own)
                fixed = Collator(collate.modalities, collate.dims, seed + 1,
                                 dataclasses.replace(collate.masks, p_partial=0.0))
                self.masked = [fixed(self.items[i : i + 32]) for i in range(0, len(self.items), 32)]

    def __call__(self, model: GeoJEPA, batch_tiles: int = 64) -> dict[str, float]:
        if len(self.items) < 3:
            return {}
        out = {}
        empty = torch.zeros(0, dtype=torch.long)
        for name, enc in (("target", model.target_encoder), ("context", model.encoder)):
            was = enc.training
            enc.eval()
            z, tokens, docs, at = [], [], [], 0
            for i in range(0, len(self.items), batch_tiles):
                packed = pack(self.items[i : i + batch_tiles], self.modalities)
                packed.pop("tiles")
                b = TokenBatch(**packed, context=empty, pred_src=empty, pred_is_target=empty.bool(), pred_doc=empty,
                               n_pred_docs=0).to(self.device)
                means, outs = tile_means(enc, b, tokens=True)
                z.append(means)
                tokens.append(outs)
                docs.append(b.doc + at)
                at += b.n_tiles
            enc.train(was)
            out.update({f"val.{k}.{name}": v for k, v in collapse_stats(torch.cat(z)).items()})
            out[f"val.within_share.{name}"] = float(within_share(torch.cat(tokens), torch.cat(docs), at))
        if self.masked:
            was = model.training
            model.eval()
            sums, weight = {"jepa": 0.0, "trivial": 0.0}, 0
            with torch.no_grad():
                for b in self.masked:
                    parts = model(b.to(self.device), **self.loss_weights)
                    n = int(b.pred_is_target.sum())
                    for k in sums:
                        sums[k] += float(parts[k]) * n
                    weight += n
            model.train(was)
            out.update({f"val.{k}": v / weight for k, v in sums.items()})
            out["val.jepa_gain"] = out["val.trivial"] - out["val.jepa"]
        return out


def _save(folder: Path, step: int, epoch: int, model: GeoJEPA, opt, keep_last: int, run: TrainRun) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = CheckpointsDir(folder).step(step)
    tmp = folder / f".{path.name}.tmp"
    torch.save({"step": step, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "config": run.to_json(), "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)
    for old in checkpoints_in(folder)[:-keep_last]:
        old.unlink()
    return path


def _write_history(path: Path, history: list[dict]) -> None:
    """Every step's record so far, replacing the file whole (never half-written)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(history))


def _tracker(run: TrainRun, rank: int) -> tuple[TrainRun, object | None]:
    """An MLflow run on rank 0 when mlflow is installed and a tracking URI is given (else None), and ``run``
    with its id."""
    if rank != 0 or not run.tracking_uri:
        return run, None
    try:
        import mlflow
    except ImportError:
        log.warning("mlflow not installed: metrics are logged to stdout only")
        return run, None
    mlflow.set_tracking_uri(run.tracking_uri)
    mlflow.set_experiment(run.experiment)
    active = mlflow.start_run(run_id=run.mlflow_run_id, run_name=f"train {Path(run.out_dir).name}",
                              tags={"stage": "train"})
    if not run.mlflow_run_id:
        mlflow.log_params({k: v for k, v in run.to_json().items() if not isinstance(v, dict | list)})
    return dataclasses.replace(run, mlflow_run_id=active.info.run_id), mlflow


def train(run: TrainRun | Mapping) -> dict:
    """Train per ``run`` (or its JSON form: the resolved ``train`` section's keys beside the run's; see
    ``geojepa.train.settings.TrainRun``); returns the final metrics."""
    t_start = time.perf_counter()
    if isinstance(run, Mapping):
        run = TrainRun.from_json(run)
    s = run.settings
    rank, world, device = _setup_distributed(s.device)
    torch.manual_seed(s.seed)
    checkpoints = ModelDir(Path(run.out_dir)).checkpoints_dir
    ckpt_dir = checkpoints.path
    modalities = s.modalities
    data = open_split(run, "train", modalities)
    if run.compact:  # the regions are the ones the file holds
        run = dataclasses.replace(run, regions=tuple(data.compact.regions))
    counts = np.bincount(data.region, minlength=len(run.regions))
    weights = s.region_weights or None
    quotas = region_quotas(counts, None if weights is None else [weights.get(n, 1.0) for n in run.regions],
                           s.region_cap)
    if rank == 0:
        log.info("training tiles per region (drawn per epoch): %s",
                 ", ".join(f"{n} {c} ({q})" for n, c, q in zip(run.regions, counts, quotas, strict=True)))
    if s.batch_tiles % (world * s.accumulate):
        raise ValueError(f"train.batch_tiles={s.batch_tiles} is not divisible by {world} ranks x "
                         f"{s.accumulate} accumulation steps")
    micro = s.batch_tiles // (world * s.accumulate)
    lengths = data.lengths  # tokens a tile; a crop bounds them (tags and geometry: image patches are not cropped)
    if s.max_entities_per_tile and "image" not in modalities:
        lengths = np.minimum(lengths, s.max_entities_per_tile * len(modalities))
    sampler = MixedBatches(lengths, data.region, micro, s.seed, rank, world, quotas, max_tokens=s.max_batch_tokens)
    collate = Collator(modalities, data.dims, s.seed, s.masks, pad_to_max=s.pad_to_max,
                       max_entities=s.max_entities_per_tile, entity_dropout=s.entity_dropout)
    dims = tuple(data.dims[m] if m in modalities else 0 for m in ("tags", "geometry", "image"))
    model = GeoJEPA(ModelConfig(dims=dims, **dataclasses.asdict(run.model)), tile_head=s.tile_head > 0).to(device)
    # The target's initial weights (the untrained twin evaluation compares against; rebuilt the same way on
    # resume, since the model is built from the seed): its drift from them is logged.
    target_init = _flat(model.target_encoder) if rank == 0 else None
    if s.compile == "on" or (s.compile == "auto" and device.type == "cuda"):
        model.compile_blocks()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=s.betas)
    steps_per_epoch = len(sampler) // s.accumulate
    if steps_per_epoch == 0:
        raise ValueError(f"{list(run.data)}: {len(data)} training tiles make no batch of {s.batch_tiles} tiles")
    total = s.max_steps or s.epochs * steps_per_epoch
    step, epoch = 0, 0
    if run.resume and checkpoints_in(ckpt_dir):
        state = load_last_good(ckpt_dir, device)
        was, now = state["config"], run.to_json()
        shape = [*(f.name for f in dataclasses.fields(type(run.model))), "modalities"]
        differ = [f"{k} {was.get(k)} -> {now[k]}" for k in shape if k in was and was.get(k) != now[k]]
        if (was.get("tile_head", 0) > 0) != (s.tile_head > 0):
            differ.append(f"tile_head {was.get('tile_head', 0)} -> {s.tile_head}")
        if differ:
            raise ValueError(f"{ckpt_dir}: --resume with another model ({', '.join(differ)}); resume with the "
                             "checkpoint's settings, or start afresh without --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from step %d", step)
    # DDP syncs the trained parameters (the target encoder has no gradients; its EMA update is the same on all ranks).
    forward = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    run, tracker = _tracker(run, rank)
    loss_weights = dict(vicreg_scale=s.vicreg_scale, var_weight=s.var_weight, cov_weight=s.cov_weight,
                        regulariser=s.regulariser, target_centre=s.target_centre, tile_head=s.tile_head)
    monitor = CollapseMonitor(validation_set(run, modalities, data), modalities, device, seed=s.seed, collate=collate,
                              loss_weights=loss_weights) if rank == 0 else None
    if monitor and step == 0:
        at_start = monitor(model)
        log.info("before training: %s", ", ".join(f"{k} {v:.3f}" for k, v in at_start.items()))
        if tracker and at_start:
            tracker.log_metrics(at_start, step=0)
    history: list[dict] = []
    if step and checkpoints.history.exists():
        history = [h for h in json.loads(checkpoints.history.read_text()) if h["step"] <= step]
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    t_last, tokens_since = time.perf_counter(), 0
    t_run, first_step = t_last, step  # the estimate of the time left
    t_fifth = None  # when the fifth step of this sitting ended (time_limit_s: the rate over steps 5 to 10)
    while step < total:
        sampler.epoch = collate.epoch = epoch
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=s.num_workers, persistent_workers=False)
        batches = iter(loader)
        skip = (step - epoch * steps_per_epoch) * s.accumulate
        for _ in range(skip):  # resume mid-epoch: the same batches are drawn in the same order
            next(batches)
        for _ in range(steps_per_epoch - skip // s.accumulate):
            if step >= total:
                break
            lr, wd, momentum = schedules(step, total, s)
            for g in opt.param_groups[:1]:
                g["lr"], g["weight_decay"] = lr, wd
            opt.param_groups[1]["lr"] = lr
            parts: dict[str, float] = {}
            for micro_step in range(s.accumulate):
                batch = next(batches).to(device)
                tokens_since += batch.n_tokens
                sync = micro_step == s.accumulate - 1
                no_sync = forward.no_sync() if world > 1 and not sync else contextlib.nullcontext()
                with no_sync:  # gradients are all-reduced on the last micro-batch only
                    with amp:
                        out = forward(batch, **loss_weights)
                    loss = out["loss"] / s.accumulate
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"non-finite loss at step {step} (lr {lr:.2e}); the last good "
                                            f"checkpoint in {ckpt_dir} is kept")
                    loss.backward()
                for k, v in out.items():
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / s.accumulate
            if world > 1:  # the record is of the global batch: average the parts over ranks
                vals = torch.tensor(list(parts.values()), dtype=torch.float64, device=device)
                dist.all_reduce(vals)
                parts = dict(zip(parts, (vals / world).tolist(), strict=True))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_target(momentum)
            step += 1
            record = {"step": step, **parts, "lr": lr, "wd": wd, "momentum": momentum, "grad_norm": float(grad_norm)}
            history.append(record)
            if rank == 0 and (step % s.log_every == 0 or step == total):
                now = time.perf_counter()
                record["tokens_per_s"] = tokens_since * world / (now - t_last)
                record["target_drift"] = float((_flat(model.target_encoder) - target_init).norm() / target_init.norm())
                t_last, tokens_since = now, 0
                if device.type == "cuda":
                    record["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                per_step = (now - t_run) / max(step - first_step, 1)
                record["s_per_step"] = per_step  # this sitting's mean, the validation passes included
                log.info("step %d/%d loss %.4f jepa %.4f (trivial %.4f, gain %.4f) var %.4f cov %.4f within-tile "
                         "share %.3f%s lr %.2e ema %.5f target drift %.3f; %.2f s a step, %s left", step, total,
                         parts["loss"], parts["jepa"], parts["trivial"], parts["jepa_gain"], parts["var"], parts["cov"],
                         parts["within_share"],
                         f" tile {parts['tile']:.4f} (gain {parts['tile_gain']:.4f})" if "tile" in parts else "",
                         lr, momentum, record["target_drift"], per_step, duration(per_step * (total - step)))
                if tracker:
                    tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
            stop = step == run.stop_after  # a time-limited job: checkpoint, stop, resume later
            if run.time_limit_s:
                now, done = time.perf_counter(), step - first_step
                if done == 5:
                    t_fifth = now
                elif done == 10 and t_fifth is not None:  # (after the first steps' compilation)
                    fits = step + int((run.time_limit_s - (now - t_start)) * 0.95 / ((now - t_fifth) / 5))
                    if fits < total:
                        total = max(fits, step)
                        log.info("time_limit_s %.0f: the run is cut to %d steps (%.3f s a step)",
                                 run.time_limit_s, total, (now - t_fifth) / 5)
                stop = stop or now - t_start >= run.time_limit_s
                if world > 1:  # every rank stops at the same step: the first to reach the limit decides
                    agree = torch.tensor([float(stop), -float(total)], device=device)
                    dist.all_reduce(agree, op=dist.ReduceOp.MAX)
                    stop, total = bool(agree[0]), int(-agree[1])
            if rank == 0 and (step % s.checkpoint_every == 0 or step == total or stop):
                if stats := monitor(model):
                    record.update(stats)
                    log.info("step %d validation tiles: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
                    if stats.get("val.mean_cos.target", 0.0) > COLLAPSE_COS:
                        log.warning("step %d: validation tiles' mean cosine %.3f > %.2f: the target encoder is "
                                    "collapsing (every tile the same direction)", step, stats["val.mean_cos.target"],
                                    COLLAPSE_COS)
                    if tracker:
                        tracker.log_metrics(stats, step=step)
                _save(ckpt_dir, step, epoch + (step % steps_per_epoch == 0), model, opt, s.keep_last, run)
                _write_history(checkpoints.history, history)  # a run killed later resumes with its whole history
            if stop:
                total = step
        epoch += 1
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        _write_history(checkpoints.history, history)
        if tracker:
            tracker.end_run()
    return history[-1] if history else {}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: torchrun [...] -m geojepa.train CONFIG.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")
    try:
        run = TrainRun.from_json(json.loads(Path(argv[0]).read_text()))
    except ValueError as e:
        raise SystemExit(f"{argv[0]}: {e}") from None
    try:
        train(run)
    except NonFiniteLoss as e:
        log.error("%s", e)
        raise SystemExit(3) from None
