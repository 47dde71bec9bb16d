"""Benchmark: the compute floor of the evaluation's embedding phase. One frozen encoder over every tile of a
region (the pass the evaluation makes per encoder, unmasked; the masked tiles add about 1.4 passes more), in
one process: fp32 on one torch thread (how the evaluation runs each encoder), fp32 on two, and bf16 autocast on
one; against the machine's fp32 and bf16 matmul rates measured in the same process. Prints seconds, tokens/s,
the achieved GFLOP/s (the encoder's linear layers and attention, counted) and the ratio to the first run.

    python bench/encoder_pass.py W [--model models/geojepa-cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from geojepa.encoding.pooling import embed
from geojepa.encoding.shards import token_batches, token_index
from geojepa.model.jepa import encoder_from_checkpoint
from geojepa.workdir import ModelDir, WorkDir


def matmul_rate(dtype: torch.dtype, threads: int) -> float:
    torch.set_num_threads(threads)
    a, w = torch.randn(4096, 128, dtype=dtype), torch.randn(512, 128, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    t0 = time.perf_counter()
    for _ in range(50):
        torch.nn.functional.linear(a, w)
    return 50 * 2 * 4096 * 128 * 512 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("region", type=Path)
    p.add_argument("--model", default="models/geojepa-cpu")
    a = p.parse_args()
    enc, cfg = encoder_from_checkpoint(ModelDir(a.model).checkpoints()[-1])
    mods = tuple(m for m in cfg["modalities"] if m in ("tags", "geometry"))
    tok = token_index(WorkDir(a.region).tokens)
    batches = [items for _, items in token_batches(tok, mods, 256)]
    per_tile = np.array([len(mods) * len(it["epos"]) for b in batches for it in b], np.float64)
    d, depth, mlp = cfg["width"], cfg["depth"], cfg["mlp"]
    # per token and layer: qkv + out (4 d^2) and the MLP (2 d mlp) multiply-adds, attention 2 n d
    flops = 2 * depth * (per_tile.sum() * (4 * d * d + 2 * d * mlp) + (per_tile**2).sum() * 2 * d)
    print(f"{a.region}: {len(per_tile)} tiles, {int(per_tile.sum()):,} tokens (median {int(np.median(per_tile))} a "
          f"tile, longest {int(per_tile.max())}); encoder {depth} x {d} (mlp {mlp}); {flops / 1e12:.2f} TFLOP a pass")
    print(f"  matmul 4096x128 @ 128x512: fp32 {matmul_rate(torch.float32, 1):.0f} GFLOP/s on 1 thread, "
          f"{matmul_rate(torch.float32, 2):.0f} on 2; bf16 {matmul_rate(torch.bfloat16, 1):.0f} on 1")
    runs = {"fp32, 1 thread (the evaluation's)": (1, contextlib.nullcontext),
            "fp32, 2 threads": (2, contextlib.nullcontext),
            "bf16 autocast, 1 thread": (1, lambda: torch.autocast("cpu", dtype=torch.bfloat16))}
    base, ref = None, None
    for name, (threads, ctx) in runs.items():
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with ctx():
            means = np.concatenate([embed(enc, items, mods, 256).mean for items in batches])
        s = time.perf_counter() - t0
        base = base or s
        ref = means if ref is None else ref
        diff = np.linalg.norm(means - ref) / np.linalg.norm(ref)
        print(f"  {name:36s} {s:6.1f} s  {per_tile.sum() / s:9,.0f} tokens/s  {flops / s / 1e9:5.0f} GFLOP/s  "
              f"x{base / s:.2f}  relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
