"""The evaluate stage: a model and a region's token shards -> ``W/eval/``.

It streams: what it holds for the whole region is per-tile float arrays (what the probes need) and sparse
integer tables, never the tokens, the entities' tags or their geometries. Its phases, each a module:

1. loading (``region``, ``features.task_sets``): the token index, one pass over ``tile_entities`` for the
   tasks' labels, tag counts and masking edits; which tiles each task probes.
2. embedding (``features``): the trained target and context encoders and the untrained twins over every tile
   and each task's masked tiles (the twins from the region's cache when another model was evaluated before);
   TagPool alongside; the target's entity embeddings spilled to disk.
3. peers (``baselines``): bag-of-tags, and SRAI's embedders fitted on the training tiles (cached likewise).
4. probes (``probes``, ``readouts``): every read-out of the protocol (``protocol``) on every feature set.
5. retrieval and pictures (``retrieval``), then writing (``outputs``, ``report``, and the summary the report
   was written from, ``W/eval/summary.json``, which the corpus and ablation reports read).

The folder is written whole into the staging folder the lifecycle hands the stage and swapped in at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data_contracts import ENTITIES, TAG_VOCAB, TILE_ENTITIES, TILE_IMAGES, TILES, TOKENS, open_artifact, read_table
from geojepa import manifest
from geojepa.config import Config
from geojepa.encoding.models import Trained, check_tokens, check_widths, load_trained
from geojepa.encoding.shards import release, tiles_meta, token_index
from geojepa.encoding.spill import Spill
from geojepa.errors import GeoJepaError
from geojepa.evaluate import baselines, features, outputs, probes, retrieval
from geojepa.evaluate.cache import Cache, key
from geojepa.evaluate.labels import TASKS
from geojepa.evaluate.protocol import Protocol, protocol
from geojepa.evaluate.region import scan_entities
from geojepa.evaluate.report import write_report
from geojepa.lifecycle import Lifecycle, StageResult, Summary
from geojepa.tokens.vocab import Vocab
from geojepa.workdir import SPLITS, EvalDir, WorkDir

log = logging.getLogger(__name__)
SHARED = ("geojepa", "geojepa_context", "tagpool")  # feature sets that mean the same in every region (+ twins)


@dataclass(frozen=True, kw_only=True)
class EvalSummary(Summary):
    """The evaluate stage's figures the flows and the command line read (every other figure: ``figures``, also
    written as ``W/eval/summary.json``): the checkpoint evaluated, whether the model saw the region in training,
    and per task its tiles, splits and read-out choice, or why it was skipped."""

    checkpoint: str
    seen_in_training: bool
    tasks: dict[str, dict]


def last_checkpoint(work_dir: Path) -> Path:
    model = WorkDir(work_dir).model
    found = model.checkpoints()
    if not found:
        raise GeoJepaError(f"{model.checkpoints_dir}: no step-*.pt checkpoint; run `geojepa train {work_dir}`, "
                           "or pass --model")
    return found[-1]


def evaluate(work_dir: Path | str, cfg: Config, checkpoint: Path | str | None = None, force: bool = False,
             model: str | Path | None = None) -> StageResult[EvalSummary]:
    """Evaluate region ``work_dir`` with ``model`` (a checkpoint, a model folder or ``models:/name/N``; default
    the region's own last checkpoint). The model must have been trained on tokens of the region's tokenizer;
    the report says whether the region was among its training regions."""
    w = WorkDir(work_dir)
    try:
        work_dir, section, proto = w.path, cfg.evaluate, protocol(cfg.evaluate)
    except ValueError as e:
        raise GeoJepaError(str(e)) from None
    if not work_dir.is_dir() or not w.tokens.is_dir():
        raise GeoJepaError(
            f"{work_dir}: not a tokenised region (no {w.tokens.name}/ folder); prepare it with "
            f"`geojepa extract PBF {work_dir}`, `geojepa tile {work_dir}` and `geojepa tokens {work_dir}`"
        )
    spec = model or checkpoint or section.checkpoint
    trained = load_trained(spec or last_checkpoint(work_dir), cfg, work_dir.parent / ".models")
    check_tokens(trained, w.tokens, w.tokenizer_digest(), "tokenise the region with the model's tokenizer "
                 "(geojepa tokens W --tokenizer T)")
    paths = {"tiles": w.tiles, "tile_entities": w.tile_entities, "tile_images": w.tile_images, "entities": w.entities,
             "tokens": w.tokens, "tag_vocab": Path(cfg.tokens.vocab) if cfg.tokens.vocab else w.vocab_path(),
             "checkpoint": trained.checkpoint}
    for name, contract in (("tiles", TILES), ("tile_entities", TILE_ENTITIES), ("tile_images", TILE_IMAGES),
                           ("entities", ENTITIES), ("tokens", TOKENS), ("tag_vocab", TAG_VOCAB)):
        open_artifact(paths[name], contract)
    # The vocabulary of a corpus tokenizer grows with other regions: it enters by the shards' digest instead.
    inputs = {k: v for k, v in paths.items() if not (k == "tag_vocab" and trained.digest)}
    # Whether SRAI is installed decides the peers' rows: an evaluation made without it is stale once it is.
    from geojepa.evaluate import peers

    params = {**section.model_dump(mode="json"), "resolved": proto.__dict__,
              "peers_srai": peers.version() if section.peers else None}
    life = Lifecycle("evaluate", work_dir, cfg, inputs, params, ("geojepa.evaluate", "geojepa.encoding",
                                                                   "geojepa.model"), section="evaluate")
    if done := life.skipped(force, EvalSummary):
        return done
    region_inputs = {k: v for k, v in life.expected["inputs"].items() if k != "checkpoint"}
    out = w.eval
    with life.run() as run, _torch_threads(1), _pool() as pool:
        with life.staging(out) as tmp:
            summary, results = _phases(w, paths, trained, section, proto, region_inputs, pool, tmp)
        run.metrics({_metric_name(r): r["mean"] for r in results if r["mean"] is not None})
        run.metrics({_metric_name(r) + "_std": r["std"] for r in results if r["std"] is not None})
        run.metrics({f"retrieval.agreement.{m}": v for m, v in summary["agreement"].items()})
        run.metrics(
            {f"peers.{p}.{k}": v for p, st in summary["peers"].get("fitted", {}).items() for k, v in st.items()}
        )
        run.metrics({f"seconds.{k}": v for k, v in _flat_timing(summary["timing"]).items()})
        for f in (out.report, out.results, out.predictions, out.task_labels,
                  *(out / name for name in summary["pictures"].values())):
            run.artifact(f, out.path.name)
        run.dict(summary, "eval_summary.json")
    log.info("evaluate: %s written in %.1fs (%s); report %s", out, summary["seconds"],
             ", ".join(f"{k} {v:g}s" for k, v in _flat_timing(summary["timing"]).items()), out.report)
    return life.publish([out.path], EvalSummary.of(summary))


def _phases(w: WorkDir, paths: dict, trained: Trained, section, proto: Protocol, region_inputs: dict, pool,
            tmp: EvalDir) -> tuple[dict, list[dict]]:
    """The evaluation's phases (see the module docstring), writing into ``tmp``; (summary, result rows)."""
    t0, timing, clock = time.perf_counter(), {}, [time.perf_counter()]

    def lap(name):
        timing[name] = round(time.perf_counter() - clock[0], 2)
        clock[0] = time.perf_counter()

    device = "cuda" if section.device == "cuda" or (section.device == "auto" and torch.cuda.is_available()) else "cpu"
    cache = Cache(w.eval_cache if section.cache else None)
    modalities = trained.modalities
    # Rendered images are drawn from the very tags the masked setting removes: there the image tokens are left
    # out (real imagery, an independent observation, stays).
    rendered = "image" in modalities and _rendered(paths["tile_images"])
    tok = token_index(paths["tokens"], SPLITS)  # never the gap tiles (tokenised for `geojepa embed` only)
    target = trained.encoder("target")
    check_widths(tok.dims, modalities, target, trained.checkpoint, paths["tokens"])
    tasks = [TASKS[name] for name in section.tasks]

    # 1. loading
    vocab = _vocab(paths["tag_vocab"])
    scan = scan_entities(paths["tile_entities"], tok, tasks, vocab)
    meta = tiles_meta(paths["tiles"], tok)
    groups = meta["group_id"].to_numpy(zero_copy_only=False).astype(str)
    release()
    sets, notes, label_rows = features.task_sets(tasks, scan, tok, section, modalities, rendered)
    lap("loading")

    # 2. embedding: the trained encoders and the twins not in the cache
    # A twin's vectors depend on its architecture and seed, the region's tokens, each task's tiles (their
    # rows and masked counts) and the code that embeds and masks them.
    twin_code = manifest.code_version("geojepa.encoding", "geojepa.model", "geojepa.train.data",
                                      "geojepa.evaluate.features", "geojepa.evaluate.masking",
                                      "geojepa.evaluate.labels", "geojepa.evaluate.region")
    task_tiles = {t: [s.rows, s.kept] for t, s in sets.items()}
    twin_keys = {name: key("twin", region_inputs, _architecture(trained), section.seed + i, rendered, twin_code,
                           *[a for t in sorted(task_tiles) for a in (t, *task_tiles[t])])
                 for i, name in enumerate(proto.twins())}
    pools = {name: features.Pools.from_arrays(hit) for name, k in twin_keys.items()
             if (hit := cache.load("twins", k)) is not None}
    encoders = {"geojepa": target, "geojepa_context": trained.encoder("context"),
                **{name: trained.encoder(untrained=True, seed=section.seed + i)
                   for i, name in enumerate(proto.twins()) if name not in pools}}
    spill = Spill(tmp / ".entity_embeddings.f32", target.width)
    with spill:
        ran, tagpool = features.embed_region(tok, scan, sets, encoders, modalities, section, device, spill,
                                             vocab.vectors, pool, rendered)
    for name in encoders:
        if name in twin_keys:
            cache.save("twins", twin_keys[name], ran[name].arrays())
    pools.update(ran)
    del vocab
    release()
    lap("embedding")

    # 3. baselines without an encoder: bag-of-tags, SRAI's peers
    bag_all, bag_task = baselines.bag_of_tags(scan, tok, sets, section, tasks)
    peer_all, peer_task, peer_notes = baselines.peer_vectors(paths, tok, sets, section, cache, region_inputs,
                                                             _torch_threads(probes.workers()))
    lap("peers")

    # 4. probes
    extra_all = features.counts(tok, modalities)
    encoder_names = ["geojepa", "geojepa_context", *proto.twins()]
    masked_feats, jobs = {}, []
    for name, s in sets.items():
        extra = features.counts(tok, modalities, s.rows, s.kept, rendered)
        masked = {m: features.tile_vectors(pools[m], proto, extra, name) for m in encoder_names}
        masked["tagpool"] = features.tile_vectors(tagpool, proto, extra, name)
        masked_feats[name] = {m: masked[m] for m in (*SHARED, *proto.twins())}
        masked |= {"bag_of_tags": bag_task[name], **peer_task.get(name, {})}
        task_jobs = [("masked", masked, proto.probes, True)]
        if section.unmasked:
            unmasked = {m: features.tile_vectors(pools[m], proto, extra_all[s.rows], rows=s.rows) for m in SHARED
                        if m != "tagpool"}
            unmasked["tagpool"] = features.tile_vectors(tagpool, proto, extra_all[s.rows], rows=s.rows)
            task_jobs.append(("unmasked", unmasked, proto.unmasked_probes, False))
        jobs.append(probes.TaskProbes(s.task, task_jobs, s.y, s.sp, np.unique(groups[s.rows], return_inverse=True)[1],
                                      tok.ids[s.rows]))
    results, predictions, timing["probes"], choice = probes.score(jobs, proto, section, pool, cache)
    for name, c in choice.items():
        notes[name]["choice"] = c
        if c.get("skipped"):
            notes[name]["skipped"] = c["skipped"]
    lap("probes_wall")

    # 5. retrieval and pictures over the unmasked tiles
    every = {m: features.tile_vectors(pools[m], proto, extra_all) for m in encoder_names}
    every |= {"tagpool": features.tile_vectors(tagpool, proto, extra_all), "bag_of_tags": bag_all, **peer_all}
    agreement = retrieval.agreement(every, scan.hist, section.k, device)
    del every
    lap("retrieval")
    tiles = np.concatenate([pools["geojepa"].mean, pools["geojepa"].max], 1)  # what geojepa embed gives
    pictures = retrieval.pictures(tmp, paths, tok, scan, meta, tiles, spill, section, trained.checkpoint) \
        if section.pictures else {}
    release()
    lap("pictures")

    # 6. writing
    outputs.write_embeddings(
        tmp.embeddings, paths, tok, meta, tiles, spill, f"geojepa:{trained.checkpoint.name}"
    )
    spill.path.unlink()
    outputs.write_tables(tmp, label_rows, results, predictions)
    outputs.write_probe_features(tmp.probe_features, tok.ids, groups, sets, masked_feats)
    lap("writing")
    seen, role = _role(w, trained)
    summary = {"checkpoint": str(trained.checkpoint), "region": w.name, "seen_in_training": seen, "role": role,
               "protocol": proto.__dict__, "tokenizer_digest": w.tokenizer_digest(),
               "masked_images": "left out (rendered from the tags)" if rendered else
               ("kept (real imagery)" if "image" in modalities else None), "tiles": tok.n,
               "entities": int(tok.ent_off[-1]), "tasks": notes, "peers": peer_notes, "agreement": agreement,
               "pictures": pictures, "cache": {"hits": cache.hits, "misses": cache.misses, "twins_cached":
                                               sorted(set(proto.twins()) - set(encoders))},
               "seconds": round(time.perf_counter() - t0, 1), "timing": timing}
    write_report(tmp.report, results, summary, w.name)
    tmp.summary.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary, results


def _architecture(trained: Trained) -> dict:
    c = trained.config
    return {"modalities": list(trained.modalities), **{k: c[k] for k in ("width", "depth", "heads", "mlp")},
            **({"pos_fourier": c["pos_fourier"]} if c.get("pos_fourier") else {}), "digest": trained.digest}


def _role(w: WorkDir, trained: Trained) -> tuple[bool, str]:
    tcfg = trained.config
    trained_on = [Path(d).name for d in tcfg.get("data") or [tcfg.get("work_dir", "")]]
    names = tcfg.get("regions") or trained_on
    seen = w.name in names or w.path.resolve().as_posix() in [str(Path(d)) for d in tcfg.get("data") or []]
    return seen, (f"trained on: the model saw this region's train split ({', '.join(names)})" if seen else
                  f"holdout: the model never saw this region (trained on {', '.join(names)})")


@contextlib.contextmanager
def _torch_threads(n: int):
    """Torch ops on ``n`` threads inside the block. The evaluation's matrices are small: its parallelism is
    separate work on separate threads (``_pool``), each op on one thread; two threads per op contend with
    each other and with the other threads (about 10 x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pool() -> ThreadPoolExecutor:
    """A thread per core, each running torch ops on one thread (the setting is per thread)."""
    return ThreadPoolExecutor(probes.workers(), initializer=torch.set_num_threads, initargs=(1,))


def _rendered(tile_images: Path) -> bool:
    """Whether the region's tile images were rendered from its own map data (``tile --imagery render``)."""
    sources = pq.read_table(tile_images, columns=["source"])["source"]
    return bool(pc.any(pc.starts_with(sources, "render")).as_py())


def _flat_timing(timing: dict) -> dict[str, float]:
    out = {}
    for k, v in timing.items():
        out.update({f"{k}.{t}": s for t, s in v.items()} if isinstance(v, dict) else {k: v})
    return out


def _metric_name(r: dict) -> str:
    """Stable MLflow names, e.g. masked.building_count.geojepa.ridge.mae."""
    return f"{r['setting']}.{r['task']}.{r['model']}.{r['probe']}.{r['metric']}"


def _vocab(path: Path) -> Vocab:
    v = read_table(path, TAG_VOCAB)
    col = v["embedding"].combine_chunks()
    offs = col.offsets.to_numpy()
    values = col.values.to_numpy()[offs[0] : offs[-1]] if len(offs) else np.zeros(0, np.float32)
    return Vocab(v["key"].to_pylist(), v["value"].to_pylist(),
                 np.array(values, np.float32).reshape(v.num_rows, -1) if v.num_rows else np.zeros((0, 1), np.float32))
