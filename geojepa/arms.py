"""The fast learning loop: several training arms (config overrides), a few hundred steps each and several
seeds, judged on what says whether a model learns, before anything is scaled.

A spec (YAML)::

    steps: 200                       # training steps per arm and seed
    seeds: [0, 1]                    # pretraining seeds (train.seed)
    data: [work/research/helsinki, work/research/malta, ...]     # the regions trained on
    judge: [work/research/malta, work/research/liechtenstein]    # read out on: one trained-on, one holdout
    arms:                            # name -> overrides of the base config (the first arm: the control)
      vicreg: []
      target: [train.regulariser=target]

Each (arm, seed) trains into ``OUT/<arm>-s<seed>`` (skipped when already trained with the same settings) and
is evaluated on each judge region through a view of it (``OUT/views/<arm>-s<seed>/<region>``: links to the
region's artifacts and its evaluation cache, its own ``eval/``), with protocol v2's ridge read-out only, no
peers, the masked setting only (the twins and the baselines come from the region's cache). Judged on:

- ``jepa_gain``: the trivial per-(tile, modality) context-mean loss minus the JEPA loss at the end (its share
  of the trivial loss: what the predictor knows beyond the tile's gist);
- the within-tile share of the target's variance on training batches and on validation tiles, and the
  validation tiles' mean cosine (collapse);
- per judge region and task, the ridge headline metric of the encoder chosen on validation against every
  untrained twin (point estimates; the corpus report gives intervals on the full evaluation).

Writes ``OUT/arms.md`` and ``OUT/arms.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from data_contracts import EVAL_RESULTS, atomic_path, read_table
from geojepa.config import load_config
from geojepa.errors import GeoJepaError
from geojepa.workdir import ModelDir, WorkDir

log = logging.getLogger(__name__)
JUDGE = ["evaluate.probes=[ridge]", "evaluate.peers=[]", "evaluate.unmasked=false", "evaluate.map=pca",
         "evaluate.gallery_queries=2"]


def load_spec(path: Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise GeoJepaError(f"{path}: cannot read the arms spec ({e})") from None
    missing = [k for k in ("steps", "seeds", "data", "judge", "arms") if not (spec or {}).get(k)]
    if missing:
        raise GeoJepaError(f"{path}: the arms spec needs {', '.join(missing)} (see geojepa/arms.py)")
    if not isinstance(spec["arms"], dict):
        raise GeoJepaError(f"{path}: arms: a mapping of name -> list of overrides")
    return spec


def view(region: WorkDir, at: Path) -> WorkDir:
    """``at``: a work directory that links to ``region``'s artifacts and evaluation cache, with its own
    manifests (all but evaluate's copied) and its own ``eval/``."""
    mine = WorkDir(at)
    mine.manifests.mkdir(parents=True, exist_ok=True)
    own = {region.eval.path, region.manifests, region.model.checkpoints_dir.path}  # not linked
    for f in region.path.iterdir():
        if f in own or f.name.startswith(f".{region.eval.path.name}.tmp"):  # an evaluation being written
            continue
        link = at / f.name
        if link.is_symlink() and not link.exists():  # a link left from a region since moved
            link.unlink()
        if not (link.is_symlink() or link.exists()):
            link.symlink_to(f.resolve())
    region.eval_cache.mkdir(exist_ok=True)
    if not mine.eval_cache.exists():
        mine.eval_cache.symlink_to(region.eval_cache.resolve())
    for m in region.manifests.glob("*.json"):
        if m != region.manifest("evaluate"):
            shutil.copy(m, mine.manifests / m.name)
    return mine


def run_arms(spec_path: Path, out: Path, config: str | None, overrides: list[str]) -> list[dict]:
    from geojepa.evaluate import evaluate
    from geojepa.evaluate.protocol import is_twin
    from geojepa.evaluate.report import chosen_encoders, headline_metric
    from geojepa.launch import train

    spec = load_spec(spec_path)
    data = [Path(d) for d in spec["data"]]
    judges = [WorkDir(j) for j in spec["judge"]]
    for w in [*map(WorkDir, data), *judges]:
        if not w.tokens.is_dir():
            raise GeoJepaError(f"{w.path}: not a tokenised region (no tokens/); the arms need every region of the "
                               "spec tokenised with one tokenizer")
    rows = []
    # every arm at the first seed, then every arm at the next: a loop cut short still compares every arm
    for seed in spec["seeds"]:
        for arm, arm_overrides in spec["arms"].items():
            name = f"{arm}-s{seed}"
            model = out / name
            cfg = load_config(config, [*overrides, *(arm_overrides or []), f"train.max_steps={spec['steps']}",
                                       f"train.seed={seed}"])
            log.info("arms: training %s (%s)", name, ", ".join(arm_overrides or ["control"]))
            train(model, cfg, data=data)
            history = json.loads(ModelDir(model).checkpoints_dir.history.read_text())
            last = history[-1]
            val = next((h for h in reversed(history) if "val.mean_cos.target" in h), {})
            row = {"arm": arm, "seed": seed, "overrides": arm_overrides or [], "steps": last["step"],
                   "jepa": last["jepa"], "trivial": last.get("trivial"), "jepa_gain": last.get("jepa_gain"),
                   "within_share": last.get("within_share"), "val_within_share": val.get("val.within_share.target"),
                   "val_mean_cos": val.get("val.mean_cos.target"), "judge": {}}
            ecfg = load_config(config, [*overrides, *JUDGE, "tracking.enabled=false"])
            for region in judges:
                v = view(region, out / "views" / name / region.name)
                evaluated = evaluate(v.path, ecfg, model=model)
                results = read_table(v.eval.results, EVAL_RESULTS).to_pylist()
                chosen = chosen_encoders(results, "ridge")
                for task, enc in chosen.items():
                    metric = headline_metric(task)
                    get = {r["model"]: r["mean"] for r in results if (r["setting"], r["task"], r["probe"],
                                                                      r["metric"]) == ("masked", task, "ridge", metric)}
                    twins = [x for m, x in get.items() if is_twin(m) and x is not None]
                    row["judge"][f"{region.name}/{task}"] = {
                        "metric": metric, "encoder": enc, "value": get.get(enc), "twins": twins,
                        "tagpool": get.get("tagpool"), "seen": evaluated.summary.seen_in_training}
            rows.append(row)
            _write(out, spec, rows)  # the table so far, after every (arm, seed)
    return rows


def _better(c: dict) -> bool | None:
    if c.get("value") is None or not c["twins"]:
        return None
    higher = c["metric"] == "roc_auc"
    return all((c["value"] > t) if higher else (c["value"] < t) for t in c["twins"])


def _write(out: Path, spec: dict, rows: list[dict]) -> None:
    cells = list(dict.fromkeys(k for r in rows for k in r["judge"]))
    lines = [f"# Arms: {spec['steps']} steps, seeds {spec['seeds']}", "",
             f"Trained on {len(spec['data'])} regions; read out on {', '.join(Path(j).name for j in spec['judge'])} "
             "(ridge, masked, protocol v2; point estimates on each region's test tiles). *gain*: trivial "
             "per-(tile, modality) context-mean loss minus the JEPA loss at the last step, and its share of the "
             "trivial loss; *within*: the within-tile share of the target's variance (training batch / validation "
             "tiles); *cos*: validation tiles' mean cosine (collapse above 0.95). Per region and task: the "
             "encoder's value, **bold** when better than every twin.", "",
             "| arm | seed | jepa | gain (share) | within (train / val) | cos | " + " | ".join(cells) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cells)]

    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"

    for r in rows:
        share = None if not r["trivial"] else r["jepa_gain"] / r["trivial"]
        judged = []
        for k in cells:
            c = r["judge"].get(k)
            if c is None or c["value"] is None:
                judged.append("-")
                continue
            text = f"{c['value']:.3f} (twins {min(c['twins']):.3f} to {max(c['twins']):.3f})" if c["twins"] else \
                f"{c['value']:.3f}"
            judged.append(f"**{text}**" if _better(c) else text)
        lines.append(f"| {r['arm']} | {r['seed']} | {f(r['jepa'])} | {f(r['jepa_gain'])} ({f(share, 2)}) | "
                     f"{f(r['within_share'], 2)} / {f(r['val_within_share'], 2)} | {f(r['val_mean_cos'])} | "
                     + " | ".join(judged) + " |")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "arms.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "arms.json") as tmp:
        tmp.write_text(json.dumps({"spec": spec, "rows": rows}, indent=1, default=str))
