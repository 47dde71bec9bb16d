"""Benchmark: training steps on the real corpus, the research run's settings against the throughput options, with
a profile of a step.

The real data path of ``geojepa train`` (its sampler, collator and model, ``num_workers=0`` as the research
config) on the training regions' shards (or a compact corpus, ``geojepa compact``), at the research model size
(4 x 128, predictor 2 x 64, 32 tiles a batch). Every arm trains on the same tiles: the first ``--steps``
batches of the research settings' first epoch (the sampler's shuffled order, long-tile batches included):

- ``research``: the research run's settings (the baseline);
- ``crop K``: ``train.max_entities_per_tile=K`` (a long tile cut to K entities);
- ``crop K + tokens T``: and ``train.max_batch_tokens=T`` (each batch split where its tokens pass T: more,
  smaller steps over the same tiles).

Prints per arm: the seconds to train on those tiles, steps a minute, real tokens a second, the median and worst
step, the share of a step in each
phase (collate, forward, backward, optimiser with clipping, EMA), the model's FLOP rate against this machine's
measured fp32 matmul rate, peak RSS; then the ratios to the baseline.

    python bench/train_corpus.py work/research/{helsinki,kotka,isle-of-wight,malta,andorra,rutland,monaco,\
london-centre,munchen-centre,moscow-centre} --steps 40
    python bench/train_corpus.py work/gpu/corpus.npz --steps 40          # the compact form
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch
from train import flops_per_step  # bench/train.py: the same FLOP count

from geojepa.model.jepa import GeoJEPA, ModelConfig
from geojepa.train.compact import CompactDataset
from geojepa.train.data import Collator, MixedBatches, ShardDataset, region_quotas, split_by_tokens
from geojepa.train.settings import is_compact
from geojepa.workdir import WorkDir

SIZES = dict(width=128, depth=4, heads=4, mlp=512, pred_width=64, pred_depth=2, pred_heads=4)  # research-cpu
MODALITIES = ("tags", "geometry")
PHASES = ("collate", "forward", "backward", "optimiser", "ema")


def matmul_rate() -> float:
    """This machine's fp32 matmul rate (GFLOP/s) at the threads torch uses."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return n * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9


def run(data, order: list[list[int]], crop: int | None, max_tokens: int | None) -> dict:
    torch.manual_seed(0)
    dims = (data.dims["tags"], data.dims["geometry"], 0)
    model = GeoJEPA(ModelConfig(dims=dims, **SIZES))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    lengths = np.minimum(data.lengths, crop * len(MODALITIES)) if crop else data.lengths
    if max_tokens:
        order = [part for b in order for part in split_by_tokens(sorted(b, key=lambda i: lengths[i]), lengths,
                                                                 max_tokens)]
    collate = Collator(MODALITIES, data.dims, seed=0, max_entities=crop)
    times = {p: [] for p in PHASES}
    step_s, tokens = [], 0
    warm = [order[0], order[1]]  # two warm-up steps, not timed
    for i, batch in enumerate(warm + order):
        t = [time.perf_counter()]
        b = collate([data[j] for j in batch])
        t.append(time.perf_counter())
        out = model(b, regulariser="target")
        t.append(time.perf_counter())
        out["loss"].backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        model.update_target(0.996)
        t.append(time.perf_counter())
        if i >= len(warm):
            for p, a, z in zip(PHASES, t, t[1:], strict=False):
                times[p].append(z - a)
            step_s.append(t[-1] - t[0])
            tokens += b.n_tokens
    total = sum(step_s)
    return {"seconds": total, "steps": len(order), "steps_per_min": 60 * len(order) / total,
            "tokens_per_s": tokens / total, "median_s": float(np.median(step_s)),
            "worst_s": max(step_s), "phases": {p: sum(v) / total for p, v in times.items()},
            "gflops": flops_per_step(model, tokens) / total / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path, help="the training regions' work directories, or a compact file")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32, help="tiles a batch (the research run's 32)")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if len(args.data) == 1 and is_compact(args.data[0]):
        data = CompactDataset(args.data[0], "train", MODALITIES)
    else:
        data = ShardDataset([WorkDir(w).tokens for w in args.data], "train", MODALITIES)
    region = data.region
    quotas = region_quotas(np.bincount(region))
    print(f"{len(data)} training tiles of {len(np.unique(region))} regions loaded in {time.perf_counter() - t0:.0f} s; "
          f"tokens a tile: median {int(np.median(data.lengths))}, max {int(data.lengths.max())}; "
          f"model {SIZES}, {args.batch} tiles a batch, {args.steps} steps an arm; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    order = MixedBatches(data.lengths, region, args.batch, seed=0, quotas=quotas).batches()[: args.steps]
    tiles = sum(map(len, order))
    rate = matmul_rate()
    print(f"fp32 matmul (1024^2): {rate:.0f} GFLOP/s", flush=True)
    arms = [("research", None, None), (f"crop {args.crop}", args.crop, None),
            (f"crop {args.crop} + tokens {args.max_tokens}", args.crop, args.max_tokens)]
    results = {}
    for name, crop, max_tokens in arms:
        r = run(data, order, crop, max_tokens)
        results[name] = r
        phases = ", ".join(f"{p} {v:.0%}" for p, v in r["phases"].items())
        print(f"  {name:26s} {tiles} tiles in {r['seconds']:6.1f} s, {r['steps']} steps: {r['steps_per_min']:6.1f} "
              f"steps/min  {r['tokens_per_s']:8,.0f} tokens/s  step median {r['median_s']:.2f} s worst "
              f"{r['worst_s']:.2f} s  {r['gflops']:5.1f} GFLOP/s ({r['gflops'] / rate:.0%} of matmul)  [{phases}]",
              flush=True)
    base = results["research"]
    for name, r in results.items():
        if name != "research":
            print(f"  {name} / research: the same tiles x{base['seconds'] / r['seconds']:.2f} faster, steps/min "
                  f"x{r['steps_per_min'] / base['steps_per_min']:.2f}, tokens/s "
                  f"x{r['tokens_per_s'] / base['tokens_per_s']:.2f} (tokens after the crop)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
