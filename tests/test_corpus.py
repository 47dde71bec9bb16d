"""The corpus path on real regions: two small ones (Kotka, Helsinki) share one frozen tokenizer and train one
model; a third (central Moscow) is tokenised with it and evaluated as a holdout it never saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_contracts import TAG_VOCAB, TOKENS, read_table
from geojepa.corpus import load_corpus, mark_region
from geojepa.errors import GeoJepaError
from geojepa.train.data import MixedBatches, ShardDataset, region_quotas
from geojepa.workdir import WorkDir
from tests.conftest import SAMPLES, small_tokens

TINY = {"width": 32, "depth": 1, "heads": 2, "mlp": 64, "pred_width": 16, "pred_depth": 1, "pred_heads": 2,
        "batch_tiles": 8, "max_steps": 3, "num_workers": 0, "log_every": 1, "device": "cpu"}
FAST_EVAL = {"seeds": 1, "max_epochs": 20, "patience": 3, "map": "pca", "gallery_queries": 1,
             "tasks": ("building_count",)}


def _cfg(cfg):
    cfg = small_tokens(cfg, geometry_epochs=1, geometry_max_shapes=600, geometry_dim=32)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=TINY),
                                  "evaluate": cfg.evaluate.model_copy(update=FAST_EVAL)})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, extracted, cfg):
    """Kotka and Helsinki (train) and central Moscow (holdout) tiled, one tokenizer, all tokenised, one model."""
    from geojepa.extract import extract
    from geojepa.launch import train
    from geojepa.tile import tile
    from geojepa.tokens import tokens
    from geojepa.tokens.tokenizer import fit

    cfg = _cfg(cfg)
    root = tmp_path_factory.mktemp("corpus")
    c = load_corpus(_corpus_file(root, "kotka", "helsinki", holdout="moscow-centre-2020"))
    w = {r.name: c.work_dir(r, root) for r in c.regions}
    for r in c.regions:
        mark_region(w[r.name], c, r)
    for name in ("kotka", "helsinki"):
        shutil.copy(extracted[name] / "entities.parquet", w[name].entities)
    extract(SAMPLES / "moscow-centre-2020.osm.pbf", w["moscow-centre-2020"].path, cfg)
    for x in w.values():
        tile(x.path, cfg)
    fitted = fit(root / "T", [w["kotka"].path, w["helsinki"].path], cfg)
    vocab_before = read_table(root / "T" / "tag_vocab.parquet", TAG_VOCAB)
    for x in w.values():
        tokens(x.path, cfg, tokenizer=root / "T")
    trained = train(root / "model", cfg, data=[w["kotka"].path, w["helsinki"].path])
    return {"root": root, "w": w, "cfg": cfg, "fitted": fitted, "vocab_before": vocab_before, "trained": trained,
            "corpus": c}


def _corpus_file(root: Path, *train: str, holdout: str) -> Path:
    f = root / "corpus.yaml"
    regions = [{"name": n, "source": n, "role": "train"} for n in train]
    regions.append({"name": holdout, "source": holdout, "role": "holdout"})
    f.write_text(json.dumps({"name": "test", "regions": regions}))
    return f


def test_one_tokenizer_gives_every_region_the_same_digest_and_its_vocabulary_only_grows(corpus):
    w, digest = corpus["w"], corpus["fitted"].summary.digest
    assert {x.tokenizer_digest() for x in w.values()} == {digest}
    for x in w.values():
        for shard in x.token_shards():
            assert pq.read_schema(shard).metadata[b"tokenizer_digest"].decode() == digest
    before, after = corpus["vocab_before"], read_table(corpus["root"] / "T" / "tag_vocab.parquet", TAG_VOCAB)
    assert after.num_rows > before.num_rows  # Moscow brought new tag values
    assert after.slice(0, before.num_rows).equals(before)  # no vector written before ever changes
    # The frozen tokenizer is kept on a second fit (same digest), even with other regions listed.
    from geojepa.tokens.tokenizer import fit

    again = fit(corpus["root"] / "T", [w["kotka"].path], corpus["cfg"])
    assert again.skipped and again.summary.digest == digest


def test_batches_mix_regions_and_the_holdout_never_reaches_training(corpus):
    w = corpus["w"]
    config = json.loads((corpus["root"] / "model" / "checkpoints" / "train_config.json").read_text())
    assert config["regions"] == ["kotka", "helsinki"] and config["tokenizer_digest"] == corpus["fitted"].summary.digest
    data = ShardDataset([Path(d) / "tokens" for d in config["data"]], "train", ("tags", "geometry"))
    moscow = set(read_table(w["moscow-centre-2020"].tokens, TOKENS, columns=["tile_id"])["tile_id"].to_pylist())
    trained = set(data.table["tile_id"].to_pylist())
    assert moscow and not (moscow & trained)
    sampler = MixedBatches(data.lengths, data.region, 8, seed=0)
    batches = sampler.batches()
    assert all(len(set(data.region[b])) == 2 for b in batches)  # both regions in every batch
    with pytest.raises(GeoJepaError, match="holdout region"):
        from geojepa.launch import train

        train(corpus["root"] / "model2", corpus["cfg"], data=[w["kotka"].path, w["moscow-centre-2020"].path])


def test_evaluation_says_whether_the_region_was_trained_on(corpus):
    from geojepa.evaluate import evaluate

    w, cfg = corpus["w"], corpus["cfg"]
    held = evaluate(w["moscow-centre-2020"].path, cfg, model=corpus["root"] / "model").as_dict()
    assert held["seen_in_training"] is False and held["role"].startswith("holdout")
    assert "holdout: the model never saw this region" in (w["moscow-centre-2020"].eval / "report.md").read_text()
    seen = evaluate(w["kotka"].path, cfg, model=corpus["root"] / "model")
    assert seen.summary.seen_in_training is True
    assert seen.summary.checkpoint == corpus["trained"].summary.checkpoint


def test_regions_of_another_tokenizer_are_refused_before_any_work(corpus, tmp_path):
    from geojepa.evaluate import evaluate
    from geojepa.launch import train
    from geojepa.tokens import tokens

    w, cfg = corpus["w"], corpus["cfg"]
    own = WorkDir(tmp_path / "kotka-own")
    own.path.mkdir()
    for f in ("tiles.parquet", "tile_entities.parquet", "tile_images.parquet", "entities.parquet"):
        src = w["kotka"] / f
        (shutil.copytree if src.is_dir() else shutil.copy)(src, own / f)
    tokens(own.path, cfg)  # its own vocabulary and shape encoder: no digest
    with pytest.raises(GeoJepaError, match="not tokenised with one tokenizer"):
        train(tmp_path / "m", cfg, data=[w["kotka"].path, own.path])
    assert not (tmp_path / "m" / "checkpoints").exists()
    with pytest.raises(GeoJepaError, match="trained on tokens of tokenizer"):
        evaluate(own.path, cfg, model=corpus["root"] / "model")


def test_corpus_files_with_bad_regions_are_refused_naming_the_file_and_region(tmp_path):
    cases = {
        "missing": ({"name": "x", "source": "no-such-extract", "role": "train"}, "no bundled extract"),
        "role": ({"name": "x", "source": "kotka", "role": "test"}, "region 'x': role"),
        "key": ({"name": "x", "source": "kotka", "role": "train", "colour": 1}, "unknown key"),
        "pbf": ({"name": "x", "source": "nowhere/x.osm.pbf", "role": "train"}, "no file"),
    }
    for case, (region, needle) in cases.items():
        f = tmp_path / f"{case}.yaml"
        f.write_text(json.dumps({"name": "c", "regions": [region]}))
        with pytest.raises(GeoJepaError, match=needle) as e:
            load_corpus(f)
        assert str(f) in str(e.value)
    f = tmp_path / "holdout-only.yaml"
    f.write_text(json.dumps({"name": "c", "regions": [{"name": "k", "source": "kotka", "role": "holdout"}]}))
    with pytest.raises(GeoJepaError, match="no region has role 'train'"):
        load_corpus(f)
    assert [r.role for r in load_corpus(Path(__file__).parent.parent / "configs" / "corpus.yaml").regions].count(
        "holdout") == 2


def test_region_quotas_cap_a_large_region_and_follow_explicit_weights():
    q = region_quotas(np.array([10_000, 100, 120]), cap=2.0)
    assert list(q) == [240, 100, 120]  # the large region capped at twice the median (120)
    q = region_quotas(np.array([300, 100]), weights=np.array([1.0, 1.0]))
    assert list(q) == [200, 200]  # same total, equal shares: the small region is drawn with repetition


def test_mixed_batches_are_deterministic_per_epoch_and_disjoint_across_ranks():
    rng = np.random.default_rng(0)
    lengths, region = rng.integers(5, 500, 300), np.repeat([0, 1, 2], 100)
    a = MixedBatches(lengths, region, 6, seed=3, rank=0, world=2)
    b = MixedBatches(lengths, region, 6, seed=3, rank=1, world=2)
    assert a.batches() == MixedBatches(lengths, region, 6, seed=3, rank=0, world=2).batches()
    assert len(a.batches()) == len(a) == len(b.batches())
    seen_a = {i for batch in a.batches() for i in batch}
    seen_b = {i for batch in b.batches() for i in batch}
    assert not (seen_a & seen_b)
    assert all(len(set(region[batch])) == 3 for batch in a.batches())
    a.epoch = 1
    assert a.batches() != b.batches()


def test_token_bounded_batches_hold_at_most_max_tokens_and_as_many_every_epoch_on_every_rank():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(60), 1.0, 400), 2, 900).astype(int)
    region = np.repeat([0, 1], 200)
    quotas = np.array([150, 150])  # regions drawn below their size: each epoch draws different tiles
    plain = MixedBatches(lengths, region, 16, seed=0, quotas=quotas)
    for world in (1, 2):
        ranks = [MixedBatches(lengths, region, 16, seed=0, rank=r, world=world, quotas=quotas, max_tokens=600)
                 for r in range(world)]
        counts = set()
        for epoch in range(4):
            for s in ranks:
                s.epoch = epoch
                batches = s.batches()
                counts.add(len(batches))
                for b in batches:
                    assert lengths[b].sum() <= 600 or len(b) == 1  # a longer tile goes alone
                    assert len(b) <= 16
        assert counts == {len(ranks[0])}  # the same number every epoch and on every rank
    bounded = MixedBatches(lengths, region, 16, seed=0, quotas=quotas, max_tokens=600)
    assert len(bounded) > len(plain)  # the long tiles' batches were split
    assert max(lengths[b].sum() for b in plain.batches()) > 600
    # all the first epoch's tiles are drawn, once each, as without the bound
    assert sorted(i for b in bounded.batches() for i in b) == sorted(i for b in plain.batches() for i in b)


def test_every_stage_shares_one_lifecycle_skip_force_and_recovery(corpus, tmp_path):
    """Each stage, run again on unchanged inputs, skips with the summary it recorded (one shape for all), sweeps
    what a killed run left behind, and runs again when forced."""
    from geojepa.evaluate import evaluate
    from geojepa.extract import extract
    from geojepa.launch import train
    from geojepa.tile import tile
    from geojepa.tokens import tokens

    root, w, cfg = corpus["root"], corpus["w"]["moscow-centre-2020"], corpus["cfg"]
    model = root / "model"
    stages = {
        "extract": (
            w.path,
            lambda force=False: extract(SAMPLES / "moscow-centre-2020.osm.pbf", w.path, cfg, force=force),
        ),
        "tile": (w.path, lambda force=False: tile(w.path, cfg, force=force)),
        "tokens": (w.path, lambda force=False: tokens(w.path, cfg, tokenizer=root / "T", force=force)),
        "train": (
            model,
            lambda force=False: train(model, cfg, data=[corpus["w"]["kotka"].path, corpus["w"]["helsinki"].path]),
        ),
        "evaluate": (w.path, lambda force=False: evaluate(w.path, cfg, model=model, force=force)),
    }
    for stage, (folder, run) in stages.items():
        dead = folder / f".{stage}-leftover.tmp-999999999"  # a temporary of a process that no longer exists
        dead.write_text("half-written")
        again = run().as_dict()
        assert again["stage"] == stage and again["skipped"] is True, stage
        assert not dead.exists(), f"{stage}: the dead run's temporary was not swept"
        recorded = json.loads((folder / "manifests" / f"{stage}.json").read_text())
        assert {k: again[k] for k in recorded["summary"]} == recorded["summary"], stage
    forced = stages["evaluate"][1](force=True)
    assert forced.stage == "evaluate" and forced.skipped is False


def test_the_command_line_takes_data_w1_w2_and_names_what_is_missing(tmp_path):
    from typer.testing import CliRunner

    from geojepa.cli import app

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    runner = CliRunner()
    out = runner.invoke(app, ["train", str(tmp_path / "out"), "--data", str(a), str(b), "--set",
                              "tracking.enabled=false"])
    assert out.exit_code == 1 and f"{a / 'tokens'}: no train-*.parquet token shards" in out.output
    out = runner.invoke(app, ["tokenizer", "fit", str(tmp_path / "T"), "--data", str(a), str(b), "--set",
                              "tracking.enabled=false"])
    assert out.exit_code == 1 and f"{a / 'tiles.parquet'}: missing" in out.output
    assert not (tmp_path / "T").exists() and not (tmp_path / "out").exists()


def _fake_region(root, name, seen, n_test, rng, noise, labels=None, val_better=("geojepa_context",)):
    """A region's eval/predictions.parquet and eval/summary.json: geojepa's errors scaled by noise['geojepa'],
    etc. (a model per key of ``noise``); the models ``val_better`` (the context encoder) are worse on test than
    on validation."""
    from data_contracts import PREDICTIONS, write_table

    w = WorkDir(root / name)
    w.eval.path.mkdir(parents=True)
    w.eval.summary.write_text(json.dumps({"seen_in_training": seen, "tasks": {
        "building_count": {"test_tiles": n_test, "skipped": None}}}))
    cols = {f.name: [] for f in PREDICTIONS.schema}
    draw = rng if labels is None else np.random.default_rng(labels)  # ``labels``: a seed for the labels alone
    y = {s: draw.integers(0, 50, n).astype(float) for s, n in (("val", 10), ("test", n_test))}
    for model in noise:
        probe = "median" if model == "dummy" else "mlp"
        for split, labels in y.items():
            scale = noise[model] * (0.5 if (model in val_better and split == "val") else 1.0)
            pred = labels[:, None] + rng.normal(0, scale, (len(labels), 3))
            for i, (lab, p) in enumerate(zip(labels, pred, strict=True)):
                for col, v in (("setting", "masked"), ("task", "building_count"), ("model", model), ("probe", probe),
                               ("split", split), ("tile_id", f"{name}/{split}/{i}"), ("label", lab),
                               ("pred", p.tolist())):
                    cols[col].append(v)
    write_table(pa.table(cols, schema=PREDICTIONS.schema), w.eval / "predictions.parquet", PREDICTIONS)
    return w


def test_corpus_report_pools_test_tiles_with_a_paired_bootstrap_and_chooses_the_encoder_on_validation(tmp_path):
    from data_contracts import CORPUS_RESULTS, PREDICTIONS, read_table
    from geojepa.evaluate.corpus import corpus_report

    rng = np.random.default_rng(0)
    noise = {"geojepa": 1.0, "geojepa_context": 1.6, "untrained": 8.0, "tagpool": 1.02, "dummy": 20.0}
    regions = [_fake_region(tmp_path, "a", True, 300, rng, noise), _fake_region(tmp_path, "b", True, 40, rng, noise),
               _fake_region(tmp_path, "h", False, 200, rng, noise)]
    metrics = corpus_report(regions, tmp_path / "model", "fake")
    rows = read_table(tmp_path / "model" / "corpus_results.parquet", CORPUS_RESULTS).to_pylist()
    get = {(r["region"], r["model"]): r for r in rows if r["metric"] == "mae"}
    # pooled = MAE over the union of the test tiles, mean over seeds
    preds = [read_table(w.eval / "predictions.parquet", PREDICTIONS).to_pandas() for w in regions[:2]]
    union = [p[(p.model == "geojepa") & (p.split == "test")] for p in preds]
    err = np.concatenate([np.abs(np.stack(u.pred.to_numpy()) - u.label.to_numpy()[:, None]) for u in union])
    assert get["trained", "geojepa"]["mean"] == pytest.approx(err.mean())
    assert get["trained", "geojepa"]["n_test"] == 340 and get["all", "geojepa"]["regions"] == 3
    for r in rows:
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]
    width = {n: get[n, "geojepa"]["ci_high"] - get[n, "geojepa"]["ci_low"] for n in ("a", "b")}
    assert width["b"] > width["a"]  # 40 test tiles leave a wider interval than 300
    # the context encoder is better on validation (chosen), though worse on test: the choice never looks at test
    report = json.loads((tmp_path / "model" / "corpus_comparisons.json").read_text())
    assert report["chosen_encoder"] == {"building_count/mlp": "geojepa_context"}
    verdict = {(c["group"], c["baseline"]): c for c in report["comparisons"]}
    assert verdict["all", "untrained"]["better"] and verdict["holdout", "dummy"]["better"]
    assert not verdict["all", "tagpool"]["better"] and verdict["all", "tagpool"]["worse"]  # context 1.6 vs 1.02
    assert verdict["all", "every twin (1 of 1)"]["better"]
    assert metrics["corpus.all.masked.building_count.mlp.geojepa_vs_untrained.gain_ci_low"] > 0
    assert "| building_count (mae) | mlp | holdout (1) | geojepa_context |" in (tmp_path / "model" /
                                                                              "corpus_report.md").read_text()


def test_the_best_peer_is_chosen_on_validation_and_compared_like_a_baseline(tmp_path):
    from geojepa.evaluate.corpus import corpus_report

    rng = np.random.default_rng(1)
    # hex2vec looks best on validation (0.5 x 4.0 = 2.0) but geovex is best on test (3.0): hex2vec is the best peer
    noise = {"geojepa": 1.0, "geojepa_context": 5.0, "untrained": 8.0, "count": 6.0, "contextual_count": 5.0,
             "hex2vec": 4.0, "geovex": 3.0, "dummy": 20.0}
    regions = [_fake_region(tmp_path, n, n != "h", 150, rng, noise, val_better=("hex2vec",)) for n in ("a", "h")]
    metrics = corpus_report(regions, tmp_path / "model", "fake")
    report = json.loads((tmp_path / "model" / "corpus_comparisons.json").read_text())
    verdict = {(c["group"], c["baseline"]): c for c in report["comparisons"]}
    assert verdict["all", "best_peer (hex2vec)"]["baseline_value"] == pytest.approx(
        verdict["all", "hex2vec"]["baseline_value"])
    assert verdict["all", "best_peer (hex2vec)"]["better"]
    for peer in ("count", "contextual_count", "hex2vec", "geovex"):
        assert verdict["all", peer]["better"], peer
    assert metrics["corpus.all.masked.building_count.mlp.geojepa_vs_best_peer.gain_ci_low"] > 0
    assert "masked.building_count.geovex.mlp.mae" in " ".join(metrics)  # the peers' pooled rows, by stable names
    text = (tmp_path / "model" / "corpus_report.md").read_text()
    assert "| geovex |" in text and "** (hex2vec) |" in text
    assert "## Peers (SRAI)" in text and "Not evaluated" in text  # these fake regions say nothing of their fits


def test_an_exported_model_folder_evaluates_like_its_checkpoint_and_keeps_the_tokenizer(corpus, tmp_path):
    """export-model: the encoders without optimizer state, the tokenizer with the vocabulary the listed regions
    need; `evaluate --model FOLDER` resolves it, and its encoders equal the checkpoint's."""
    from geojepa.export import export_model
    from geojepa.model.jepa import encoder_from_checkpoint
    from geojepa.tokens.tokenizer import load_tokenizer

    root = corpus["root"]
    ckpt = sorted((root / "model" / "checkpoints").glob("step-*.pt"))[-1]
    got = export_model(ckpt, root / "T", tmp_path / "shipped", [corpus["w"]["kotka"].path])
    folder = tmp_path / "shipped"
    shipped = next((folder / "checkpoints").glob("step-*.pt"))
    assert shipped.stat().st_size < ckpt.stat().st_size  # no optimizer state, no predictor
    for which in ("target", "context"):
        a, _ = encoder_from_checkpoint(ckpt, which=which)
        b, _ = encoder_from_checkpoint(shipped, which=which)
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(v, w), k
    assert load_tokenizer(folder / "tokenizer").digest == load_tokenizer(root / "T").digest
    full = read_table(root / "T" / "tag_vocab.parquet", TAG_VOCAB).num_rows
    assert 0 < got["vocabulary_entries"] <= full
    with pytest.raises(GeoJepaError, match="exists"):
        export_model(ckpt, root / "T", folder)


def test_ablation_report_pairs_runs_on_the_same_test_tiles_and_refuses_other_tiles(tmp_path):
    """compare_runs: a run whose encoder errs less than the reference's gains beyond the uncertainty, paired on
    the same resamples; the baselines come from the reference; runs on other tiles or regions are refused."""
    from geojepa.evaluate.ablation import compare_runs

    def run(name, geojepa_noise, seed):  # the same labels and tile ids in every run, other prediction noise
        noise = {
            "geojepa": geojepa_noise,
            "geojepa_context": 30.0,
            "untrained": 8.0,
            "tagpool": 3.0,
            "dummy": 20.0,
            "hex2vec": 4.0,
            "geovex": 3.0,
        }  # hex2vec: 2.0 on validation, so chosen, though geovex is better on test
        return [_fake_region(tmp_path / name, r, r != "h", 200, np.random.default_rng([seed, i]), noise, labels=i,
                             val_better=("geojepa_context", "hex2vec")) for i, r in enumerate(("a", "h"))]

    ref, better, same = run("ref", 4.0, 0), run("better", 1.0, 1), run("same", 4.0, 2)
    metrics = compare_runs({"ref": ref, "better": better, "same": same}, tmp_path / "abl", "test")
    rows = {(r["group"], r["run"]): r for r in json.loads((tmp_path / "abl" / "ablation.json").read_text())["rows"]}
    assert rows["all", "better"]["vs_reference"]["better"]  # 1.0 vs 4.0 noise: better beyond the interval
    assert rows["all", "better"]["vs_every_twin"]["better"]
    c = rows["all", "same"]["vs_reference"]
    assert c["ci_low"] < 0 < c["ci_high"]  # the same noise: within the uncertainty
    assert "vs_reference" not in rows["all", "ref"]
    # every run against the best SRAI peer (the reference's rows; chosen on validation): hex2vec
    assert (
        rows["all", "better"]["best_peer"] == "best_peer (hex2vec)" and rows["all", "better"]["vs_best_peer"]["better"]
    )
    c = rows["all", "ref"]["vs_best_peer"]
    assert c["ci_low"] < 0 < c["ci_high"]  # 4.0 against hex2vec's 4.0 (geovex's 3.0 would have made it worse)
    assert rows["holdout", "better"]["regions"] == 1 and rows["all", "better"]["n_test"] == 400
    assert metrics["ablation.all.building_count.mlp.better_vs_reference.gain"] == pytest.approx(
        rows["all", "ref"]["value"] - rows["all", "better"]["value"])
    report = (tmp_path / "abl" / "ablation_report.md").read_text()
    assert "| building_count (mae) | mlp | all (2) | better | geojepa |" in report and "**+" in report
    # another run's test tiles (here: other labels and tile ids) or other regions are refused, naming the file
    other = [_fake_region(tmp_path / "other", r, True, 150, np.random.default_rng(9), {
        "geojepa": 1.0, "geojepa_context": 1.0, "untrained": 1.0, "tagpool": 1.0, "dummy": 1.0}) for r in ("a", "h")]
    with pytest.raises(GeoJepaError, match=r"other/a/eval/predictions.parquet: run other has other test tiles"):
        compare_runs({"ref": ref, "other": other}, tmp_path / "abl2", "test")
    with pytest.raises(GeoJepaError, match="regions"):
        compare_runs({"ref": ref, "one": better[:1]}, tmp_path / "abl3", "test")
    assert not (tmp_path / "abl2").exists() and not (tmp_path / "abl3").exists()


def _fake_v2_region(root, name, seen, rng, n=(80, 60, 120)):
    """A region evaluated with protocol v2: building_count (count) and bridge (binary), ridge predictions for
    GeoJEPA's encoders, three twins (untrained_1 as good as GeoJEPA), TagPool and Dummy; probe features in
    which geojepa's carry the label and the twins' are noise."""
    from data_contracts import PREDICTIONS, PROBE_FEATURES, write_table
    from geojepa.evaluate.protocol import PRESETS

    w = WorkDir(root / name)
    w.eval.path.mkdir(parents=True)
    w.eval.summary.write_text(json.dumps({"seen_in_training": seen, "protocol": PRESETS["v2"].__dict__}))
    noise = {"geojepa": 1.0, "geojepa_context": 3.0, "untrained": 6.0, "untrained_1": 1.0, "untrained_2": 6.0,
             "tagpool": 4.0, "dummy": 0.0}
    cols = {f.name: [] for f in PREDICTIONS.schema}
    feats = {f.name: [] for f in PROBE_FEATURES.schema}
    for task in ("building_count", "bridge"):
        for split, k in zip(("train", "val", "test"), n, strict=True):
            y = rng.integers(0, 40, k).astype(float) if task == "building_count" else (rng.random(k) < 0.3) * 1.0
            ids = [f"{name}/{task}/{split}/{i}" for i in range(k)]
            for model in ("geojepa", "untrained", "untrained_1", "untrained_2", "tagpool"):
                signal = y if model == "geojepa" else rng.normal(size=k)
                x = np.column_stack([signal + rng.normal(0, 0.3, k), rng.normal(size=(k, 3))]).astype(np.float32)
                for col, v in (("task", [task] * k), ("model", [model] * k), ("tile_id", ids), ("split", [split] * k),
                               ("group_id", [str(i // 4) for i in range(k)]), ("label", y.tolist()),
                               ("features", x.tolist())):
                    feats[col] += v
            if split == "train":
                continue
            for model, s in noise.items():
                if model == "dummy":
                    p = np.full((k, 1), np.median(y))
                elif task == "bridge":
                    p = (y + rng.normal(0, 0.15 * s, k))[:, None]
                else:
                    p = (y + rng.normal(0, s, k))[:, None]
                for col, v in (("setting", ["masked"] * k), ("task", [task] * k), ("model", [model] * k),
                               ("probe", ["median" if model == "dummy" else "ridge"] * k), ("split", [split] * k),
                               ("tile_id", ids), ("label", y.tolist()), ("pred", p.tolist())):
                    cols[col] += v
    write_table(pa.table(cols, schema=PREDICTIONS.schema), w.eval / "predictions.parquet", PREDICTIONS)
    write_table(pa.table(feats, schema=PROBE_FEATURES.schema), w.eval / "probe_features.parquet", PROBE_FEATURES)
    return w


def test_corpus_report_v2_headlines_auc_needs_every_twin_and_pools_relative_and_cross_region(tmp_path):
    from sklearn.metrics import roc_auc_score

    from data_contracts import CORPUS_RESULTS, PREDICTIONS, read_table
    from geojepa.evaluate.corpus import corpus_report

    rng = np.random.default_rng(5)
    regions = [_fake_v2_region(tmp_path, n, n != "h", rng) for n in ("a", "b", "h")]
    metrics = corpus_report(regions, tmp_path / "model", "v2")
    rows = read_table(tmp_path / "model" / "corpus_results.parquet", CORPUS_RESULTS).to_pylist()
    get = {(r["region"], r["task"], r["model"], r["probe"], r["metric"]): r for r in rows}
    preds = pd.concat([read_table(w.eval / "predictions.parquet", PREDICTIONS).to_pandas() for w in regions])
    mine = preds[(preds.task == "bridge") & (preds.model == "geojepa") & (preds.split == "test")]
    want = roc_auc_score(mine.label, np.stack(mine.pred.to_numpy())[:, 0])
    assert get["all", "bridge", "geojepa", "ridge", "roc_auc"]["mean"] == pytest.approx(want)
    # relative MAE: each region's MAE over its Dummy's, averaged over regions
    ratios = []
    for n in ("a", "b", "h"):
        part = preds[(preds.task == "building_count") & (preds.split == "test") & preds.tile_id.str.startswith(n + "/")]
        mae = {m: np.abs(np.stack(g.pred.to_numpy())[:, 0] - g.label).mean() for m, g in part.groupby("model")}
        ratios.append(mae["geojepa"] / mae["dummy"])
    assert get["all", "building_count", "geojepa", "ridge", "relative_mae"]["mean"] == pytest.approx(np.mean(ratios))
    assert get["all", "building_count", "dummy", "median", "relative_mae"]["mean"] == pytest.approx(1.0)
    report = json.loads((tmp_path / "model" / "corpus_comparisons.json").read_text())
    verdict = {(c["task"], c["probe"], c["group"], c["baseline"]): c for c in report["comparisons"]}
    for task, metric in (("building_count", "mae"), ("bridge", "roc_auc")):
        c = verdict[task, "ridge", "all", "untrained"]
        assert c["metric"] == metric and c["better"], task
        assert not verdict[task, "ridge", "all", "every twin (3 of 3)"]["better"]  # untrained_1 is as good
        assert verdict[task, "ridge", "all", "tagpool"]["better"]
    # the cross-region probe: fitted on a and b, tested on every region (the holdout's train tiles never used)
    for group in ("all", "holdout"):
        ours = get[group, "building_count", "geojepa", "cross_ridge", "mae"]
        twin = get[group, "building_count", "untrained", "cross_ridge", "mae"]
        assert ours["mean"] < 0.5 * twin["mean"] and ours["n_test"] == (360 if group == "all" else 120)
    assert verdict["building_count", "cross_ridge", "holdout", "untrained"]["better"]
    assert metrics["corpus.all.masked.bridge.ridge.geojepa_vs_every_twin.gain"] == pytest.approx(
        verdict["bridge", "ridge", "all", "every twin (3 of 3)"]["gain"])
    text = (tmp_path / "model" / "corpus_report.md").read_text()
    assert "**Protocol: v2.**" in text and "| bridge (roc_auc) | ridge | all (3) |" in text
    assert "Cross-region ridge" in text and "Relative MAE" in text


def test_weighted_auc_is_sklearns_with_sample_weights():
    from sklearn.metrics import roc_auc_score

    from geojepa.evaluate.pooled import weighted_auc

    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.4) * 1.0
    score = np.round(y + rng.normal(0, 1, 200), 1)  # ties
    w = rng.integers(0, 4, (5, 200))
    got = weighted_auc(score, y, w)
    for i in range(5):
        assert got[i] == pytest.approx(roc_auc_score(y, score, sample_weight=w[i]))
