"""The GPU sweep (run by bench/gpu.sh): about four training arms on a compact corpus (geojepa.train.compact),
each a real torchrun job with a wall-clock budget (its share of ``--minutes``; the start-up outside it,
about 15 to 30 s an arm, comes on top), bf16 autocast, packed attention and compiled blocks on CUDA;
each arm's model is exported as an fp16 checkpoint that takes the full tokens, to be evaluated here with
``geojepa evaluate --model OUT/<arm>/model.pt``. Prints one line per arm (steps, seconds a step, tokens a
second, the last JEPA loss and its gain over the trivial context mean, the within-tile share, the validation
tiles' mean cosine, peak GPU memory, the exported file's size) and writes ``OUT/sweep.json``.

    python bench/gpu_sweep.py work/gpu/corpus.npz OUT --minutes 6          # on the GPU host
    python bench/gpu_sweep.py work/gpu/corpus.npz OUT --tiny --minutes 1   # on this CPU: tiny arms, the same path

Only torch, numpy and pyarrow are needed (the GPU host has no pydantic, mlflow or prefect).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from geojepa.model.sizes import ModelSizes  # noqa: E402
from geojepa.train.compact import Compact, export  # noqa: E402
from geojepa.train.settings import MaskConfig, TrainRun, TrainSettings  # noqa: E402

# The arms, decided before the run: the fourth round's control and its candidates on this CPU
# (docs/results/research-cpu/arms/fourth.yaml: centred targets ranked first there) at a GPU's scale. The
# second round's (vicreg, target-deep, target-blocks15) stay available by name.
ARMS = {
    "target": {"regulariser": "target"},
    "centre": {"regulariser": "target", "target_centre": True},
    "centre-head": {"regulariser": "target", "target_centre": True, "tile_head": 1.0},
    "fourier": {"regulariser": "target", "pos_fourier": 6},
}
MORE = {
    "vicreg": {},
    "target-deep": {"regulariser": "target", "pred_depth": 4},
    "target-blocks15": {"regulariser": "target", "masks": {"block_area": 0.15}},
}
GPU_SIZES = dict(width=256, depth=4, heads=8, mlp=1024, pred_width=128, pred_depth=2, pred_heads=4)  # 13 MB fp16
GPU_TRAIN = dict(batch_tiles=256, max_steps=100_000, log_every=25, checkpoint_every=100_000, keep_last=1,
                 num_workers=4, device="cuda", compile="on", modalities=("tags", "geometry"))
TINY_SIZES = dict(width=32, depth=1, heads=4, mlp=64, pred_width=16, pred_depth=1, pred_heads=2)
TINY_TRAIN = dict(batch_tiles=8, max_steps=12, log_every=2, checkpoint_every=100_000, keep_last=1, num_workers=0,
                  device="cpu", compile="off", modalities=("tags", "geometry"))


def arm_run(name: str, overrides: dict, corpus: Compact, scratch: Path, seconds: float, tiny: bool,
            seed: int) -> TrainRun:
    sizes = {**(TINY_SIZES if tiny else GPU_SIZES), **{k: v for k, v in overrides.items() if k in
                                                         {f.name for f in dataclasses.fields(ModelSizes)}}}
    train = {**(TINY_TRAIN if tiny else GPU_TRAIN), "seed": seed,
             **{k: v for k, v in overrides.items() if k not in sizes and k != "masks"}}
    masks = MaskConfig(**overrides.get("masks", {}))
    return TrainRun(model=ModelSizes(**sizes), settings=TrainSettings(**train, masks=masks),
                    out_dir=str(scratch / name), data=(str(corpus.path.resolve()),), regions=tuple(corpus.regions),
                    time_limit_s=seconds, tokenizer_digest=corpus.meta.get("tokenizer_digest"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="a compact tokens file (geojepa compact)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--minutes", type=float, default=6.0, help="the whole sweep's training budget")
    ap.add_argument("--arms", nargs="*", default=list(ARMS), help=f"of {list(ARMS) + list(MORE)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny arms on the CPU (the script's own test)")
    args = ap.parse_args()
    compact = Compact(args.corpus)  # a bad file fails here, before any arm
    if compact.holdouts:
        raise SystemExit(f"{args.corpus}: holds the holdout region(s) {', '.join(compact.holdouts)}; training "
                         "refuses it (build it from the training regions only)")
    every = {**ARMS, **MORE}
    unknown = sorted(set(args.arms) - set(every))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; expected some of {list(every)}")
    args.out.mkdir(parents=True, exist_ok=True)
    per_arm = args.minutes * 60 / len(args.arms)
    print(f"corpus {args.corpus}: {compact.meta['tiles']} tiles of {len(compact.regions)} regions, "
          f"{args.corpus.stat().st_size / 2**20:.1f} MiB; {len(args.arms)} arms, {per_arm:.0f} s each", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="geojepa-sweep-") as scratch:
        for name in args.arms:
            run = arm_run(name, every[name], compact, Path(scratch), per_arm, args.tiny, args.seed)
            arm_out = args.out / name
            arm_out.mkdir(exist_ok=True)
            config = Path(scratch) / f"{name}.json"
            config.write_text(json.dumps(run.to_json(), indent=1))
            (arm_out / "train_config.json").write_text(config.read_text())
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   "-m", "geojepa.train", str(config)]
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            if args.tiny:
                env["CUDA_VISIBLE_DEVICES"] = ""
            t0 = time.perf_counter()
            with open(arm_out / "train.log", "w") as log:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
            wall = time.perf_counter() - t0
            if code != 0:
                print(f"{name}: training failed (exit {code}); see {arm_out / 'train.log'}", flush=True)
                rows.append({"arm": name, "failed": code})
                continue
            ckpts = sorted((Path(scratch) / name / "checkpoints").glob("step-*.pt"))
            history = json.loads((Path(scratch) / name / "checkpoints" / "history.json").read_text())
            (arm_out / "history.json").write_text(json.dumps(history))
            model = export(ckpts[-1], compact, arm_out / "model.pt")
            last = history[-1]
            logged = [h for h in history if "tokens_per_s" in h]
            val = next((h for h in reversed(history) if "val.mean_cos.target" in h), {})
            row = {"arm": name, "overrides": every[name], "steps": last["step"], "wall_s": round(wall, 1),
                   "s_per_step": round(logged[-1].get("s_per_step", float("nan")), 4) if logged else None,
                   "overhead_s": round(wall - last["step"] * logged[-1].get("s_per_step", 0.0), 1)
                   if logged else None,
                   "tokens_per_s": round(sum(h["tokens_per_s"] for h in logged[1:]) / max(len(logged) - 1, 1)),
                   "jepa": last["jepa"], "trivial": last["trivial"], "gain_share": last["jepa_gain"] / last["trivial"],
                   "within_share": last["within_share"], "val_within_share": val.get("val.within_share.target"),
                   "val_mean_cos": val.get("val.mean_cos.target"), "val_gain_share": (
                       val["val.jepa_gain"] / val["val.trivial"] if val.get("val.trivial") else None),
                   "gpu_memory_gb": max((h.get("gpu_memory_gb", 0.0) for h in logged), default=0.0),
                   "model_mb": round(model.stat().st_size / 2**20, 2)}
            rows.append(row)
            print(f"{name}: {row['steps']} steps in {wall:.0f} s ({row['s_per_step']:.3f} s a step, compilation "
                  f"included; start-up and export {row['overhead_s']} s; "
                  f"{row['tokens_per_s']} tokens/s), jepa {row['jepa']:.4f} gain share {row['gain_share']:+.3f} "
                  f"(val {row['val_gain_share'] if row['val_gain_share'] is not None else float('nan'):+.3f}), "
                  f"within {row['within_share']:.2f} / {row['val_within_share'] or float('nan'):.2f}, "
                  f"val cos {row['val_mean_cos'] or float('nan'):.3f}, peak GPU {row['gpu_memory_gb']:.1f} GB, "
                  f"model {row['model_mb']} MiB", flush=True)
            (args.out / "sweep.json").write_text(json.dumps({"corpus": compact.meta, "rows": rows}, indent=1))
    if any("failed" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
