"""Benchmark: full GeoJEPA training steps on variable-length tiles, packed vs padded to the batch maximum.

Synthetic token batches with a city's length spread (lognormal, median about
120, clipped to 5..1,250 tokens): context encoder, target encoder, predictor,
backward, optimiser and EMA update. Ours: batches of similar lengths (the
length-bucketed sampler), attention kept inside each tile (FlexAttention on a
packed sequence on CUDA; padding per bucket elsewhere). Baseline: the same
model and tiles in random batches, every tile padded to the batch's longest.
Prints real (non-padding) tokens per second, model TFLOP/s (forward +
backward, about 6 x parameters x tokens plus attention), peak memory, the
ratio, and on CUDA the chip's measured bf16 matmul rate.

    python bench/train.py                       # CPU: a small model, so it finishes in about a minute
    python bench/train.py --full                # the reference size (12 x 384), for a GPU
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from geojepa.model.jepa import GeoJEPA, ModelConfig, TokenBatch
from geojepa.train.data import Collator

DIM = 64  # width of the synthetic tag and geometry features


def synthetic_tiles(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(120), 1.0, n), 5, 1250).astype(int)
    tiles = []
    for i, length in enumerate(lengths):
        centre = rng.random((length, 2))
        epos = np.repeat(centre, 4, axis=0).reshape(length, 8).astype(np.float32)
        tiles.append({"index": i, "epos": epos, "tags": rng.standard_normal((length, DIM)).astype(np.float32),
                      "geometry": rng.standard_normal((length, DIM)).astype(np.float32)})
    return tiles


def batches(tiles: list[dict], per_batch: int, bucketed: bool, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    lengths = np.array([len(t["epos"]) for t in tiles])
    order = np.argsort(lengths) if bucketed else rng.permutation(len(tiles))
    return [[tiles[i] for i in order[s : s + per_batch]] for s in range(0, len(order) - per_batch + 1, per_batch)]


def flops_per_step(model: GeoJEPA, real: int) -> float:
    params = sum(p.numel() for p in model.encoder.blocks.parameters())
    pred = sum(p.numel() for p in model.predictor.blocks.parameters())
    return 6 * (params + pred) * real + 2 * params * real  # context+predictor fwd/bwd, target fwd


def run(model: GeoJEPA, device, data: list[TokenBatch], steps: int, warmup: int) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    real = 0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, real = time.perf_counter(), 0
        b = data[i % len(data)].to(device)
        with amp:
            loss = model(b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_target(0.999)
        real += b.n_tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tokens_per_s": real / seconds, "steps_per_s": steps / seconds,
            "tflops": flops_per_step(model, real) / seconds / 1e12, "peak_gb": peak}


def matmul_rate(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the reference model size")
    ap.add_argument("--tiles", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="tiles per batch")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--crop", type=int, default=None,
                    help="also run with train.max_entities_per_tile=CROP (steps/s against the uncropped run)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile the blocks of both models (auto: on a GPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    size = (dict(width=384, depth=12, heads=8, mlp=1536) if args.full or gpu
            else dict(width=64, depth=2, heads=4, mlp=256, pred_width=32, pred_depth=1, pred_heads=4))
    per_batch = args.batch or (96 if gpu else 8)
    steps = args.steps or (30 if gpu else 6)
    tiles = synthetic_tiles(args.tiles or per_batch * 8, seed=0)
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU'}; model {size}; compile {args.compile}; "
          f"{len(tiles)} tiles, "
          f"{per_batch} per batch, median {int(np.median([len(t['epos']) for t in tiles]))} entities")
    results = {}
    arms = [("packed+bucketed", True, False, None), ("padded baseline", False, True, None)]
    if args.crop:
        arms.append((f"crop {args.crop}", True, False, args.crop))
    for name, bucketed, pad, crop in arms:
        torch.manual_seed(0)
        model = GeoJEPA(ModelConfig(dims=(DIM, DIM, 0), **size)).to(device)
        if args.compile == "on" or (args.compile == "auto" and gpu):
            model.compile_blocks()
        collate = Collator(("tags", "geometry"), {"tags": DIM, "geometry": DIM, "image": 0}, seed=0, pad_to_max=pad,
                           max_entities=crop)
        data = [collate(b) for b in batches(tiles, per_batch, bucketed, seed=1)]
        if not bucketed:  # the baseline pads every tile to the batch's longest: count the padding too
            waste = np.mean([1 - b.n_tokens / (b.n_tiles * int(torch.bincount(b.doc).max())) for b in data])
            print(f"  baseline batches: {waste:.0%} of padded token slots are padding")
        r = run(model, device, data, steps, warmup=2)
        results[name] = r
        print(f"  {name:16s} {r['tokens_per_s']:10,.0f} real tokens/s  {r['steps_per_s']:6.2f} steps/s  "
              f"{r['tflops']:7.3f} TFLOP/s  peak {r['peak_gb']:.2f} GB")
    ratio = results["packed+bucketed"]["tokens_per_s"] / results["padded baseline"]["tokens_per_s"]
    print(f"  ratio packed/padded: x{ratio:.2f}")
    if args.crop:
        gain = results[f"crop {args.crop}"]["steps_per_s"] / results["packed+bucketed"]["steps_per_s"]
        print(f"  steps/s with tiles cropped to {args.crop} entities / uncropped: x{gain:.2f}")
    if gpu:
        rate = matmul_rate(device)
        print(f"  bf16 matmul rate of this chip: {rate:.0f} TFLOP/s; model reaches "
              f"{results['packed+bucketed']['tflops'] / rate:.0%} of it")


if __name__ == "__main__":
    main()
