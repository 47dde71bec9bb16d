"""Benchmark: `geojepa evaluate` (streaming: a partition of entities or a batch of tiles at a time, stacked
probes) against the path it replaced (the `geojepa.evaluate` package of commit OLD, loaded from git into the
child), each run in its own child process: wall time, its split, peak RSS (wait4), and the results of both.

    python bench/evaluate_streaming.py kotka                    # old and new on the Kotka sample; results compared
    python bench/evaluate_streaming.py synth --km2 100 1000     # synthetic regions (new path; --old adds the old one)
    python bench/evaluate_streaming.py W [W ...] [--old]        # prepared work directories (e.g. /tmp/iow, see README)
    python bench/evaluate_streaming.py probes W [--task building_count]   # the probe phase alone, old loop vs stacked
    ... --set evaluate.seeds=1 --set evaluate.max_epochs=1      # config overrides for both paths

`probes` takes an evaluated W (its eval/embeddings.parquet tile embeddings and eval/task_labels.parquet) and
fits the probes of one feature set (the unmasked tile embeddings) for every seed and both kinds, in one
process: the old way (one `fit_predict` per seed, torch's default threads, as the old path ran them; and the
same on one thread) and the stacked way (`fit_predict_seeds`, one thread per fit, fits side by side).

Regions named `kotka` or `synth` are prepared under bench/.data/ (extract, tile, tokens and a model trained
with configs/demo.yaml; synthetic ones without imagery) the first time. Both paths run with the default
evaluate settings (5 seeds, every task) and MLflow off, with `--force`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, run_child, synth_pbf  # noqa: E402

OLD = "98b7b3af7b5b6e924086364f2c5de087b138ea5b"  # the last commit with the whole-region evaluate path
OLD_MODULES = ("labels", "knn", "figures", "embed", "probe", "report", "model", "stage")

CHILD = r"""
import json, sys, time, types, subprocess, resource
from pathlib import Path
w, which, old = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
timing = {}
if which == "old":
    # The old package, from git, in place of the new one (same module names, so its imports resolve to it).
    pkg = types.ModuleType("geojepa.evaluate")
    pkg.__path__ = []
    sys.modules["geojepa.evaluate"] = pkg
    for name in sys.argv[4].split(","):
        src = subprocess.check_output(["git", "show", f"{old}:geojepa/evaluate/{name}.py"], text=True)
        mod = types.ModuleType(f"geojepa.evaluate.{name}")
        mod.__file__, mod.__package__ = f"<{old[:7]}>/geojepa/evaluate/{name}.py", "geojepa.evaluate"
        sys.modules[mod.__name__] = mod
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)
        setattr(pkg, name, mod)
    stage = sys.modules["geojepa.evaluate.stage"]
    pkg.evaluate = stage.evaluate
    # The shared packer now hands out (start, modality, positions, entity) per tile; the old path took 3.
    emb_mod = sys.modules["geojepa.evaluate.embed"]
    _pack = emb_mod.pack

    def pack3(*a, **k):
        out = _pack(*a, **k)
        out["tiles"] = [t[:3] for t in out["tiles"]]
        return out

    emb_mod.pack = pack3

    def timed(key, fn, per_task=False):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                name = f"probes.{a[1].name}" if per_task else key
                timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    stage._load = timed("loading", stage._load)
    stage.embed = timed("embedding", stage.embed)
    stage._score = timed("probes", stage._score, per_task=True)
    stage._pictures = timed("pictures", stage._pictures)
    stage._write_embeddings = timed("writing", stage._write_embeddings)
import pyarrow.parquet as pq
from geojepa.config import load_config
from geojepa.evaluate import evaluate
cfg = load_config(None, ["tracking.enabled=false", *[o for o in sys.argv[5].split(";") if o]])
s = evaluate(w, cfg, force=True)
s = s.as_dict() if hasattr(s, "as_dict") else s  # the old package's stage returned a dict
if which == "new":
    timing = {k: v for k, v in s["timing"].items() if k != "probes"} | {f"probes.{t}": v for t, v in
                                                                          s["timing"]["probes"].items()}
rows = pq.read_table(w / "eval" / "results.parquet").to_pylist()  # either contract version (old path: v1)
print(json.dumps({"total_s": s["seconds"], "timing": {k: round(v, 2) for k, v in timing.items()}, "results": rows,
                  "tiles": s["tiles"], "entities": s["entities"],
                  "tasks": {t: n["skipped"] or "probed" for t, n in s["tasks"].items()}}))
"""


def geojepa(*args: str | Path) -> None:
    subprocess.run([sys.executable, "-m", "geojepa.cli", *map(str, args), "--set", "tracking.enabled=false"],
                   check=True, capture_output=True, cwd=ROOT)


def prepare(name: str, pbf: Path, imagery: bool) -> Path:
    """A work directory with tiles, tokens and a demo-sized model (made once)."""
    w = DATA / f"eval-{name}"
    if not list((w / "checkpoints").glob("step-*.pt")):
        print(f"preparing {w} (extract, tile, tokens, train) ...", flush=True)
        geojepa("extract", pbf, w)
        geojepa("tile", w, *(["--imagery", "render"] if imagery else []))
        geojepa("tokens", w, "--config", "configs/demo.yaml")
        geojepa("train", w, "--config", "configs/demo.yaml")
    return w


def run(w: Path, which: str, overrides: list[str] = ()) -> dict:
    r = run_child(CHILD, w, which, OLD, ",".join(OLD_MODULES), ";".join(overrides))
    split = ", ".join(f"{k} {v:.1f}" for k, v in r["timing"].items())
    print(f"  {which}: {r['seconds']:7.1f} s wall, peak {r['peak_rss_mb']:7,.0f} MB   ({split})", flush=True)
    return r


def compare(old: dict, new: dict) -> dict:
    """Per result row, old and new mean +- std over seeds and the difference in units of their seed spread."""
    key = ("setting", "task", "model", "probe", "metric")
    o = {tuple(r[k] for k in key): r for r in old["results"]}
    worst, rows = 0.0, []
    for r in new["results"]:
        k = tuple(r[c] for c in key)
        if k not in o or r["mean"] is None or o[k]["mean"] is None:
            continue
        spread = ((o[k]["std"] or 0) ** 2 + (r["std"] or 0) ** 2) ** 0.5
        diff = r["mean"] - o[k]["mean"]
        z = abs(diff) / spread if spread > 0 else (0.0 if abs(diff) < 1e-6 else float("inf"))
        worst = max(worst, z) if r["probe"] in ("linear", "mlp") else worst
        rows.append((k, o[k], r, diff, z))
    print("  results (test split), old -> new; z = |difference| / sqrt(std_old^2 + std_new^2) over seeds:")
    for k, a, b, diff, z in rows:
        if k[4] == "mae" or k[3] in ("linear", "mlp"):
            print(f"    {'/'.join(k):58s} {a['mean']:9.3f} ± {a['std'] or 0:.3f} -> {b['mean']:9.3f} ± "
                  f"{b['std'] or 0:.3f}   diff {diff:+.3f}  z {z:.2f}")
    same = sum(1 for k, a, b, d, z in rows if abs(d) < 1e-6)
    print(f"  {len(rows)} result rows compared; {same} identical; largest z among probe rows {worst:.2f}")
    return {"rows": len(rows), "identical": same, "max_z_probes": round(worst, 2)}


PROBES = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, pyarrow.compute as pc, pyarrow.parquet as pq, torch
from geojepa.evaluate.probe import ProbeSettings, fit_predict, fit_predict_seeds, metrics, standardise
w, task = sys.argv[1], sys.argv[2]
emb = pq.read_table(f"{w}/eval/embeddings.parquet", columns=["level", "tile_id", "embedding"],
                    filters=pc.field("level") == "tile")
x_all = np.stack(emb["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
at = {t: i for i, t in enumerate(emb["tile_id"].to_pylist())}
lab = pq.read_table(f"{w}/eval/task_labels.parquet").filter(pc.field("task") == task).to_pylist()
x = x_all[[at[r["tile_id"]] for r in lab]]
y = np.array([r["label"] for r in lab])
sp = np.array([r["split"] for r in lab])
tr, va, te = (np.flatnonzero(sp == s) for s in ("train", "val", "test"))
s, seeds, out = ProbeSettings(), list(range(5)), {"tiles": len(y), "train": len(tr)}
kind_ = "count"
for name, threads in (("per-seed loop, default threads", torch.get_num_threads()), ("per-seed loop, 1 thread", 1)):
    torch.set_num_threads(threads)
    t0, maes = time.perf_counter(), {}
    for kind in ("linear", "mlp"):
        maes[kind] = [metrics(kind_, y[te], fit_predict(kind, x[tr], y[tr], x[va], y[va], x[te], seed, s))["mae"]
                      for seed in seeds]
    out[name] = {"seconds": time.perf_counter() - t0, "mae": maes}
torch.set_num_threads(1)
t0 = time.perf_counter()
xs = standardise(x, tr)
with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
    preds = dict(zip(("linear", "mlp"), pool.map(lambda k: fit_predict_seeds(k, [xs], y, tr, va, te, seeds, s)[0],
                                                 ("linear", "mlp"))))
out["stacked"] = {"seconds": time.perf_counter() - t0,
                  "mae": {k: [metrics(kind_, y[te], p)["mae"] for p in v] for k, v in preds.items()}}
print(json.dumps(out))
"""


def probes(w: Path, task: str) -> dict:
    r = run_child(PROBES, w, task)
    print(f"probes of {task} on {w} ({r['tiles']:,} tiles, {r['train']:,} train; unmasked tile embeddings; "
          "5 seeds x linear + MLP):")
    for name in ("per-seed loop, default threads", "per-seed loop, 1 thread", "stacked"):
        m = r[name]["mae"]
        print(f"  {name:32s} {r[name]['seconds']:7.1f} s   test MAE linear "
              f"{np.mean(m['linear']):.3f} ± {np.std(m['linear']):.3f}, MLP {np.mean(m['mlp']):.3f} ± "
              f"{np.std(m['mlp']):.3f}")
    base = r["stacked"]["seconds"]
    print(
        f"  ratio per-seed (default threads) / stacked: x{r['per-seed loop, default threads']['seconds'] / base:.2f}; "
        f"per-seed (1 thread) / stacked: x{r['per-seed loop, 1 thread']['seconds'] / base:.2f}"
    )
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("regions", nargs="+", help="kotka, synth, or work directories")
    p.add_argument("--km2", type=float, nargs="+", default=[100, 1000])
    p.add_argument("--old", action="store_true", help="also run the old path (kotka: always)")
    p.add_argument("--task", default="building_count", help="probes: the task")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="a config override for both paths, e.g. evaluate.seeds=1 (repeatable)")
    a = p.parse_args()
    if a.regions[0] == "probes":
        print(json.dumps({str(w): probes(Path(w), a.task) for w in a.regions[1:]}))
        return
    print(f"machine: {len(__import__('os').sched_getaffinity(0))} cores; python {sys.version.split()[0]}; "
          f"old path: geojepa/evaluate at {OLD[:7]}")
    out = {}
    targets: list[tuple[str, Path, bool]] = []
    for r in a.regions:
        if r == "kotka":
            targets.append(("kotka", prepare("kotka", ROOT / "data" / "samples" / "kotka.osm.pbf", True), True))
        elif r == "synth":
            targets += [(f"synthetic {km:g} km2", prepare(f"synth-{km:g}km2", synth_pbf(km), False), a.old)
                        for km in a.km2]
        else:
            targets.append((Path(r).name, Path(r), a.old))
    for name, w, with_old in targets:
        print(f"{name} ({w}):", flush=True)
        new = run(w, "new", a.overrides)
        print(f"  {new['tiles']:,} tiles, {new['entities']:,} entity pieces; tasks: "
              + ", ".join(f"{t} {s}" for t, s in new["tasks"].items()))
        res = {"new": {k: new[k] for k in ("seconds", "peak_rss_mb", "timing")}}
        if with_old:
            old = run(w, "old", a.overrides)
            res["old"] = {k: old[k] for k in ("seconds", "peak_rss_mb", "timing")}
            res["ratio_time"] = round(old["seconds"] / new["seconds"], 2)
            res["ratio_peak"] = round(old["peak_rss_mb"] / new["peak_rss_mb"], 2)
            print(f"  ratio old/new: time x{res['ratio_time']:.2f}, peak memory x{res['ratio_peak']:.2f}")
            res["results"] = compare(old, new)
        out[name] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
