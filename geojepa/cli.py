"""The ``geojepa`` command line: one subcommand per stage, each on a work directory ``W``.

``W`` holds one region's artifacts under fixed names (``W/entities.parquet``,
``W/tiles.parquet``, ...). Every command takes ``--config FILE`` and repeated
``--set section.key=value`` overrides.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from data_contracts import ContractError
from geojepa.config import Config, load_config
from geojepa.errors import GeoJepaError
from geojepa.extract.fetch import GEOFABRIK_INDEX
from geojepa.lifecycle import StageResult
from geojepa.workdir import WorkDir

# torch_geometric still scripts a few functions when imported; torch 2.14 warns about it on every command
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GeoJEPA: self-supervised embeddings of urban tiles from OpenStreetMap and imagery.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default configs/default.yaml)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value (repeatable)")]
ForceOpt = Annotated[bool, typer.Option(help="re-run even if inputs are unchanged")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]
# `--data W1 W2 ...`, as documented: the work directories are positional (a click option takes one value), the flag
# marks where they begin; optional, but with it at least one must follow (`_regions` reads it).
DataFlag = Annotated[bool, typer.Option("--data", help="the region work directories follow: --data W1 W2 ... "
                                                       "(optional)")]


def _setup(config: Path | None, overrides: list[str] | None, verbose: bool = False) -> Config:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return load_config(config, overrides or [])


def _regions(data: bool, regions: list[Path] | None) -> list[Path]:
    """The region work directories listed; ``--data`` with none after it is an error (for ``train``, rather than
    training OUT on itself)."""
    if data and not regions:
        raise GeoJepaError("--data: no region work directory follows (--data W1 W2 ...)")
    return list(regions or [])


def _run(call: Callable[[], object]) -> None:
    """Run a stage; print its result (JSON: ``StageResult.as_dict()``) or, for bad input, ``error: ...`` and
    exit 1."""
    try:
        result = call()
    except (GeoJepaError, ContractError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    if isinstance(result, StageResult):
        result = result.as_dict()
    if result is not None:
        typer.echo(result if isinstance(result, str) else json.dumps(result, indent=2, default=float))


def _imagery(imagery: list[str] | None) -> str | list[str] | None:
    """``--imagery`` values as the tile stage takes them: one keyword ('render', 'naip', stac+URL) as is, files."""
    if not imagery:
        return None
    return imagery[0] if len(imagery) == 1 and not Path(imagery[0]).suffix else imagery


@app.command()
def extract(
    pbf: Annotated[Path, typer.Argument(help="OpenStreetMap *.osm.pbf file")],
    work_dir: Annotated[Path, typer.Argument(help="work directory W; writes W/entities.parquet")],
    bbox: Annotated[str | None, typer.Option(help="clip to min_lon,min_lat,max_lon,max_lat")] = None,
    tags: Annotated[
        str | None, typer.Option(help="keep only entities with these tags: key or key=value, comma-separated")
    ] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Extract tagged OSM nodes, ways and relations into GeoParquet (W/entities.parquet)."""
    from geojepa.extract import extract as run_extract

    overrides = list(set_ or [])
    if bbox:
        overrides.append(f"extract.bbox=[{bbox}]")
    if tags:
        overrides.append("extract.tag_filter=" + json.dumps([t.strip() for t in tags.split(",") if t.strip()]))
    _run(lambda: run_extract(pbf, work_dir, _setup(config, overrides, verbose), force=force).as_dict()
         | {"output": str(WorkDir(work_dir).entities)})


@app.command()
def tile(
    work_dir: Annotated[Path, typer.Argument(help="work directory W holding entities.parquet")],
    imagery: Annotated[list[str] | None, typer.Option(
        help="GeoTIFF/COG file(s) or folder, 'render' (synthetic, from OSM), 'naip' (Planetary Computer STAC), "
             "or stac+URL#collection; repeatable")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Cut W/entities.parquet into 300 m tiles with their entities and imagery (W/tiles.parquet, ...)."""
    from geojepa.tile import tile as run_tile

    _run(lambda: run_tile(work_dir, _setup(config, set_, verbose), imagery=_imagery(imagery), force=force))


@app.command()
def tokens(
    work_dir: Annotated[Path, typer.Argument(help="work directory W holding the tile artifacts")],
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="a corpus tokenizer folder T (geojepa tokenizer fit); "
            "default: the region's own vocabulary and shape encoder"
        ),
    ] = None,
    train_geometry: Annotated[bool, typer.Option(help="(re)train the region's own shape encoder first")] = False,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Embed the tag vocabulary, encode shapes and images, and write W/tokens/{split}-NNNNN.parquet."""
    from geojepa.tokens import tokens as run_tokens

    _run(lambda: run_tokens(work_dir, _setup(config, set_, verbose), train_geometry=train_geometry, force=force,
                            tokenizer=tokenizer))


tokenizer_app = typer.Typer(no_args_is_help=True, help="A corpus's frozen tokenizer (vocabulary, shape encoder).")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("fit")
def tokenizer_fit(
    folder: Annotated[Path, typer.Argument(help="tokenizer folder T")],
    regions: Annotated[
        list[Path], typer.Argument(help="work directories of the training regions, tiled", show_default=False)
    ],
    data: DataFlag = False,
    force: Annotated[
        bool, typer.Option(help="refit an existing tokenizer (a new digest: its models no longer match)")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Fit one frozen tokenizer on the listed regions: tag vocabulary, shape encoder, rules and their digest."""
    from geojepa.tokens.tokenizer import fit

    _run(lambda: fit(folder, _regions(data, regions), _setup(config, set_, verbose), force=force))


@app.command()
def train(
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="model folder OUT (checkpoints in OUT/checkpoints); alone: a region W trained on its own tokens"
        ),
    ],
    regions: Annotated[
        list[Path] | None, typer.Argument(help="the regions' work directories", show_default=False)
    ] = None,
    data: DataFlag = False,
    nproc: Annotated[int, typer.Option(help="processes per node (GPUs; CPU processes with train.device=cpu)")] = 1,
    nnodes: Annotated[int, typer.Option(help="nodes (torchrun --nnodes)")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="host:port for multi-node")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the last good checkpoint")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train one GeoJEPA on the train splits of the regions (--data W1 W2 ..., mixed in every batch) with torchrun."""
    from geojepa.launch import train as run_train

    _run(lambda: run_train(out_dir, _setup(config, set_, verbose), data=_regions(data, regions) or None, nproc=nproc,
                           nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, resume=resume))


@app.command()
def evaluate(
    work_dir: Annotated[Path, typer.Argument(help="work directory W holding tokens/ and checkpoints/; writes W/eval/")],
    model: Annotated[
        str | None,
        typer.Option(
            help="a checkpoint, a model folder (OUT of geojepa train) or "
            "models:/geojepa-encoder/N; default: the last in W/checkpoints"
        ),
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="a checkpoint file (same as --model FILE)")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Probe, retrieve and report: task datasets, embeddings, baselines, galleries in W/eval."""
    from geojepa.evaluate import evaluate as run_evaluate

    def call():
        result = run_evaluate(work_dir, _setup(config, set_, verbose), checkpoint=checkpoint, force=force,
                              model=model)
        return {k: v for k, v in result.as_dict().items() if k != "tasks"} | {
            "report": str(WorkDir(work_dir).eval.report)
        }

    _run(call)


@app.command("corpus-report")
def corpus_report(
    out: Annotated[Path, typer.Argument(help="where to write corpus_report.md and corpus_results.parquet")],
    regions: Annotated[list[Path], typer.Argument(help="the evaluated regions' work directories", show_default=False)],
    data: DataFlag = False,
    title: Annotated[str, typer.Option(help="the report's title")] = "corpus",
    verbose: VerboseOpt = False,
) -> None:
    """Pool the regions' evaluations (one model): per region and pooled MAE, bootstrap intervals, comparisons."""
    from geojepa.evaluate.corpus import corpus_report as run_report

    _setup(None, None, verbose)
    _run(lambda: run_report([WorkDir(w) for w in _regions(data, regions)], out, title))


@app.command("ablation-report")
def ablation_report(
    out: Annotated[Path, typer.Argument(help="where to write ablation_report.md and ablation.json")],
    runs: Annotated[list[str], typer.Argument(help="NAME=ROOT per model, the first the reference; each region's "
                                                   "work directory is ROOT/REGION", show_default=False)],
    regions: Annotated[list[str], typer.Option("--region", "-r", help="a region (repeatable)")],
    title: Annotated[str, typer.Option(help="the report's title")] = "ablation",
    verbose: VerboseOpt = False,
) -> None:
    """Compare models evaluated on the same regions: pooled MAE and paired bootstrap gains over the first."""
    from geojepa.evaluate.ablation import compare_runs

    _setup(None, None, verbose)
    bad = [r for r in runs if "=" not in r]
    if bad:
        typer.echo(f"error: {bad[0]!r}: a run is NAME=ROOT", err=True)
        raise typer.Exit(code=1)
    pairs = [r.split("=", 1) for r in runs]
    if len({n for n, _ in pairs}) < len(pairs):
        typer.echo(f"error: run names repeat in {' '.join(runs)}", err=True)
        raise typer.Exit(code=1)
    _run(lambda: compare_runs({n: [WorkDir(Path(root) / g) for g in regions] for n, root in pairs}, out, title))


@app.command("arms")
def arms(
    spec: Annotated[
        Path, typer.Argument(help="the arms spec (YAML: steps, seeds, data, judge, arms; geojepa/arms.py)")
    ],
    out: Annotated[Path, typer.Argument(help="where the arms' models, views and arms.md go")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The fast learning loop: train each arm for a few hundred steps per seed, judge it on jepa_gain, the
    within-tile share and the ridge read-out against every twin on a trained-on and a holdout region."""
    from geojepa.arms import run_arms

    def go() -> str:
        _setup(config, set_, verbose)  # inside: a bad config is a one-line error
        rows = run_arms(spec, out, str(config) if config else None, list(set_ or []))
        return f"{len(rows)} (arm, seed) runs; the table and the choice: {out / 'arms.md'} (rows: {out / 'arms.json'})"

    _run(go)


@app.command("select-checkpoint")
def select_checkpoint(
    run: Annotated[Path, typer.Argument(help="a training run's folder (its checkpoints/step-*.pt)")],
    regions: Annotated[list[Path], typer.Argument(help="trained-on regions to choose on (their validation tiles)")],
    every: Annotated[int, typer.Option(help="read every N-th checkpoint (the last always)")] = 1,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Choose the checkpoint to ship and evaluate on validation, not the last one: each checkpoint read out
    the arms loop's way (ridge, masked, every twin) on REGIONS' validation tiles, ranked by the cells where it
    beats every twin, then its mean gain. Writes RUN/checkpoints/selection.json (the read-outs through views
    of the regions in RUN/selection-views); a rerun reuses what is still valid. The same --config as the
    evaluation's (the run's own training config does)."""
    from geojepa.arms import JUDGE
    from geojepa.arms import select_checkpoint as select
    from geojepa.config import load_config
    from geojepa.workdir import WorkDir

    def go() -> None:
        _setup(config, set_, verbose)  # inside: a bad config is a one-line error
        cfg = load_config(str(config) if config else None, [*(set_ or []), *JUDGE, "tracking.enabled=false"])
        chosen = select(run, [WorkDir(r) for r in regions], run / "selection-views", cfg, every=every)
        for r in chosen["rows"]:
            typer.echo(f"{r['checkpoint']}  better than every twin on validation: {r['won']} of "
                       f"{len(r['cells'])}  mean gain {r['gain']:+.3f}")
        typer.echo(f"chosen: {chosen['chosen']}")

    _run(go)


@app.command("compact")
def compact(
    out: Annotated[Path, typer.Argument(help="the compact tokens file to write (.npz)")],
    regions: Annotated[list[Path], typer.Argument(help="the regions' work directories (tokenised, one tokenizer)")],
    splits: Annotated[str, typer.Option(help="the splits to hold, comma-separated")] = "train,val",
    tag_dim: Annotated[int, typer.Option(help="principal axes kept of the tag vectors")] = 128,
    geometry_dim: Annotated[int, typer.Option(help="principal axes kept of the shape vectors (int8)")] = 32,
    verbose: VerboseOpt = False,
) -> None:
    """A corpus's token shards in a compact form for a GPU host (geojepa/train/compact.py): `torchrun -m
    geojepa.train` reads it as its data (bench/gpu.sh sweeps arms on it), and its models export back to the full
    tokens. Holdout regions are recorded, and training refuses a file that holds one."""
    from geojepa.train.compact import build
    from geojepa.workdir import WorkDir

    _setup(None, None, verbose)
    works = [WorkDir(r) for r in regions]
    holdouts = [w.name for w in works if w.role() == "holdout"]
    if holdouts:
        typer.echo(f"warning: {', '.join(holdouts)} is a holdout region: the file is recorded as holding it and "
                   "training refuses it (build it from the training regions to train)", err=True)
    _run(lambda: build([w.tokens for w in works], out, tuple(splits.split(",")), tag_dim, geometry_dim,
                       holdouts=holdouts))


@app.command("export-model")
def export_model(
    model: Annotated[str, typer.Argument(help="a checkpoint or a model folder (OUT of geojepa train)")],
    out: Annotated[Path, typer.Argument(help="the folder to write (new)")],
    tokenizer: Annotated[Path, typer.Option(help="the tokenizer folder T the model was trained with")],
    vocab_for: Annotated[list[Path] | None, typer.Option(help="keep only the vocabulary entries these regions need "
                                                              "(repeatable; default: all)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """A model folder to ship: the trained encoders (no optimizer state) and the frozen tokenizer."""
    from geojepa.encoding.models import resolve_model
    from geojepa.export import export_model as run_export

    def call():
        cfg = _setup(config, set_, verbose)
        return run_export(resolve_model(model, cfg, Path(out).parent), tokenizer, out, vocab_for or [],
                          cfg.tokens.max_values_per_key)

    _run(call)


@app.command("embed")
def embed_cmd(
    source: Annotated[str, typer.Argument(help="a region work directory, an *.osm.pbf, or a Geofabrik region name "
                                               "(downloaded)")],
    out: Annotated[Path, typer.Argument(help="writes OUT/tile_embeddings.parquet and OUT/entity_embeddings.parquet")],
    model: Annotated[str, typer.Option(help="a model folder (models/geojepa-cpu), a checkpoint or "
                                            "models:/geojepa-encoder/N")],
    tokenizer: Annotated[Path | None, typer.Option(help="the model's tokenizer folder (default: beside the model)")
                         ] = None,
    imagery: Annotated[list[str] | None, typer.Option(help="as for `geojepa tile` (a new region only)")] = None,
    force: Annotated[bool, typer.Option(help="replace another model's embeddings in OUT")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """A region's tile and entity embeddings as GeoParquet (EPSG:4326), with the model in the file metadata."""
    from geojepa.embeddings import embed_source

    _run(lambda: embed_source(source, out, _setup(config, set_, verbose), model, tokenizer=tokenizer,
                              imagery=_imagery(imagery), force=force))


@app.command()
def similar(
    out: Annotated[Path, typer.Argument(help="an OUT of geojepa embed")],
    query: Annotated[str, typer.Argument(help="a tile id, or lon,lat (the tile containing the point)")],
    k: Annotated[int, typer.Option("-k", help="neighbours")] = 10,
    verbose: VerboseOpt = False,
) -> None:
    """The k tiles nearest QUERY by cosine similarity: a table, and a gallery in OUT/similar/."""
    from geojepa.embeddings import similar as run_similar
    from geojepa.embeddings.similar import table

    _setup(None, None, verbose)
    _run(lambda: table(run_similar(out, query, k)))


@app.command("map")
def map_cmd(
    out: Annotated[Path, typer.Argument(help="an OUT of geojepa embed; writes OUT/map.html")],
    k: Annotated[int, typer.Option("-k", help="neighbours shown for a clicked tile")] = 10,
    verbose: VerboseOpt = False,
) -> None:
    """One self-contained HTML page: tiles coloured by their embeddings, a click shows the nearest tiles."""
    from geojepa.embeddings import write_map

    _setup(None, None, verbose)
    _run(lambda: write_map(out, k))


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="output *.osm.pbf (synthetic)")],
    km2: Annotated[float, typer.Option(help="area in square kilometres")] = 4.0,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same file")] = 0,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Generate a deterministic synthetic city as an OSM PBF (benchmarks and tests; labelled synthetic)."""
    from geojepa.synth import generate

    _run(lambda: generate(out, km2=km2, seed=seed, cfg=_setup(config, set_).synth))


@app.command("fetch-osm")
def fetch_osm(
    region: Annotated[str, typer.Argument(help="Geofabrik region id, e.g. 'us/california' or 'monaco'")],
    work_dir: Annotated[Path, typer.Argument(help="work directory W; writes W/<region>-latest.osm.pbf")],
    index_url: Annotated[str, typer.Option(help="Geofabrik index (JSON)")] = GEOFABRIK_INDEX,
) -> None:
    """Download a region's PBF from Geofabrik: resumable, checksum verified."""
    from geojepa.extract.fetch import fetch_region

    _setup(None, None)
    _run(lambda: str(fetch_region(region, work_dir, index_url=index_url)))


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="a region W, a tokenizer folder T, a model folder OUT or embed's OUT")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts) instead of a table")] = False,
) -> None:
    """What a folder holds: a region's extent, tiles per split, stages and last evaluation; a tokenizer's
    digest and regions; a model's checkpoints, size and card."""
    from geojepa.info import info as read
    from geojepa.info import lines

    _run(lambda: read(path) if as_json else "\n".join(lines(read(path))))


def _version(value: bool) -> None:
    if value:
        from geojepa import __version__

        typer.echo(f"geojepa {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """GeoJEPA: self-supervised embeddings of urban tiles from OpenStreetMap and imagery."""


if __name__ == "__main__":
    app()
