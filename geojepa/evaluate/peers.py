"""The field's own embedders as baselines: SRAI's Count, ContextualCount, Hex2Vec and GeoVeX on our tiles.

Optional: ``pip install -e '.[peers]'`` (a pinned ``srai[torch]``); without it ``missing()`` says why and the
evaluation reports the peers as skipped. Nothing else in the pipeline imports SRAI.

SRAI's three inputs come from the region's own artifacts, offline:

- regions: the evaluated tiles (footprints from ``tiles.parquet``, EPSG:4326), index the tile id;
- features: the entities of ``tile_entities`` in SRAI's wide format (a column per OSM key, the tag's value in
  it), restricted to the ``n_features`` key=value pairs found on the most training tiles, fixed per region
  (padded with empty columns to GeoVeX's minimum of 256);
- joint: the tiling's own (tile, entity) pairs, so the peers count exactly the entities GeoJEPA reads.

In the masked setting a task's label-defining tags are removed from every entity (``Task.defines``), as for
GeoJEPA's own inputs. Hex2Vec and GeoVeX are fitted once per region on the *training* tiles with all their tags
(as GeoJEPA trains on training tiles); every tile is then embedded from the (masked) features. Neighbourhoods are
the square grid's: the 8 tiles around a tile (``GridNeighbourhood``). GeoVeX is built for H3 hexagons: its
hexagonal kernels and ring weights work in axial coordinates, and a square grid read in axial coordinates
(column, row) is a hexagonal lattice whose six neighbours are the four sides and one diagonal pair
(``square_grid_dataset``): GeoVeX runs on it unchanged, the other diagonal pair two rings out. Tiles near the
region's edge have missing neighbours: they count as empty (SRAI's H3 dataset drops such cells, which would
leave edge tiles without an embedding). One fix to SRAI 0.10.2's GeoVeX: its hexagonal convolutions replace
their weight by a new tensor at every call, so the optimiser never updates them; ``_train_hexagonal_kernels``
applies the same mask to a trained weight instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geojepa.progress import Progress

PEERS = ("count", "contextual_count", "hex2vec", "geovex")
# Their counts reach the probes as log(1 + count), as bag-of-tags' do: raw, a few dense test tiles lie far
# outside the training range and the probes extrapolate to MAEs in the thousands (the research run's first
# pass: docs/results/research-cpu/peers-raw-counts/).
LOG_COUNTS = ("count", "contextual_count")
GEOVEX_MIN_FEATURES = 256  # GeoVeX's convolutional layers want at least this many input features
log = logging.getLogger(__name__)


def missing() -> str | None:
    """None when the peers can run, else why not (the extra is absent)."""
    try:
        import pytorch_lightning  # noqa: F401
        import srai  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed: pip install 'geojepa[peers]' (from a checkout: pip install -e '.[peers]')"
    return None


def version() -> str | None:
    """The installed SRAI's version, None without the extra (part of an evaluation's freshness key)."""
    if missing():
        return None
    import srai

    return srai.__version__


@dataclass
class Region:
    """SRAI's inputs for one region and the grid beside them."""

    regions: object  # GeoDataFrame, index region_id = tile id (token order)
    features: object  # GeoDataFrame, index feature_id = entity id; a column per key
    joint: object  # GeoDataFrame, index (region_id, feature_id)
    names: list[str]  # the expected output features, "key_value"
    pairs: list[tuple[str, str]]  # (key, value) of each real feature name
    grid: dict[str, tuple[int, int]]  # tile id -> (col, row)
    train: list[str]  # the training tiles' ids

    def masked(self, defines) -> Region:
        """The region with every tag ``defines(key, value)`` removed from every entity."""
        gone: dict[str, list[str]] = {}
        for k, v in self.pairs:
            if defines(k, v):
                gone.setdefault(k, []).append(v)
        if not gone:
            return self
        feats = self.features.copy()
        for k, vs in gone.items():
            feats.loc[feats[k].isin(vs), k] = None
        return Region(self.regions, feats, self.joint, self.names, self.pairs, self.grid, self.train)

    def subset(self, ids: list[str]) -> Region:
        """The same region restricted to tiles ``ids`` (and their entities)."""
        import geopandas as gpd

        keep = set(ids)
        regions = self.regions.loc[ids]
        joint = self.joint[self.joint.index.get_level_values(0).isin(keep)]
        feats = self.features.loc[joint.index.get_level_values(1).unique()]
        return Region(regions, gpd.GeoDataFrame(feats, geometry="geometry"), joint, self.names, self.pairs,
                      {i: self.grid[i] for i in ids}, [i for i in self.train if i in keep])


def load_region(tiles: Path, tile_entities: Path, ids: np.ndarray, split: np.ndarray, n_features: int) -> Region:
    """SRAI's inputs for the tiles ``ids`` (token order; ``split`` beside them): see the module docstring."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    meta = pq.read_table(tiles, columns=["tile_id", "col", "row", "geometry"]).to_pandas().set_index("tile_id")
    meta = meta.loc[list(ids)]
    regions = gpd.GeoDataFrame(index=pd.Index(list(ids), name="region_id"),
                               geometry=shapely.from_wkb(meta["geometry"].to_numpy()), crs="EPSG:4326")
    grid = dict(zip(ids.tolist(), zip(meta["col"].tolist(), meta["row"].tolist(), strict=True), strict=True))
    train = [i for i, s in zip(ids.tolist(), split.tolist(), strict=True) if s == "train"]

    te = pq.read_table(tile_entities, columns=["tile_id", "entity_id", "tags"])
    te = te.filter(pc.is_in(te["tile_id"], pa.array(list(ids), pa.string())))
    tags = te["tags"].combine_chunks()
    offs = tags.offsets.to_numpy()
    row = np.repeat(np.arange(te.num_rows), np.diff(offs))
    keys = tags.keys.slice(offs[0], offs[-1] - offs[0])
    values = pc.fill_null(tags.items.slice(offs[0], offs[-1] - offs[0]), "")
    kv = pc.binary_join_element_wise(keys, values, "\x1f").dictionary_encode()
    code = kv.indices.to_numpy()
    # The features: the pairs on the most training tiles (ties by name), as for bag_of_tags.
    tile_code = pc.dictionary_encode(te["tile_id"].combine_chunks()).indices.to_numpy()[row]
    tile_names = pc.unique(te["tile_id"].combine_chunks()).to_pylist()
    is_train = np.isin(np.array(tile_names, dtype=object), np.array(train, dtype=object))
    on_train = is_train[tile_code]
    uniq = np.unique(tile_code[on_train].astype(np.int64) << 32 | code[on_train])
    tiles_with = np.bincount((uniq & 0xFFFFFFFF).astype(np.int64), minlength=len(kv.dictionary))
    texts = kv.dictionary.to_pylist()
    ranked = sorted((c for c in range(len(texts)) if tiles_with[c] > 0), key=lambda c: (-tiles_with[c], texts[c]))
    names, pairs, chosen = {}, [], np.zeros(len(texts), bool)
    for c in ranked:
        k, v = texts[c].split("\x1f", 1)
        name = f"{k}_{v}"
        # SRAI names the dummy of an empty cell "<key>_null" and drops every such column: a real value "null"
        # (London has type=null) would collide with it.
        if name in names or not v or v == "null":
            continue
        names[name] = c
        pairs.append((k, v))
        chosen[c] = True
        if len(pairs) == n_features:
            break
    padded = list(names) + [f"_empty_{i}" for i in range(GEOVEX_MIN_FEATURES - len(names))]

    # Wide features: one row per entity holding a chosen pair, a column per key.
    sel = chosen[code]
    ent_ids = te["entity_id"].combine_chunks()
    frame = pd.DataFrame({"feature_id": ent_ids.take(pa.array(row[sel])).to_numpy(zero_copy_only=False),
                          "key": keys.filter(pa.array(sel)).to_numpy(zero_copy_only=False),
                          "value": values.filter(pa.array(sel)).to_numpy(zero_copy_only=False)})
    wide = frame.drop_duplicates(["feature_id", "key"]).pivot(index="feature_id", columns="key", values="value")
    wide = wide.reindex(columns=sorted({k for k, _ in pairs})).astype(object).where(wide.notna(), None)
    wide.columns.name = None
    features = gpd.GeoDataFrame(wide, geometry=gpd.GeoSeries([None] * len(wide), index=wide.index),
                                crs="EPSG:4326")
    joint_rows = row[sel]
    joint_index = pd.MultiIndex.from_arrays(
        [te["tile_id"].combine_chunks().take(pa.array(joint_rows)).to_numpy(zero_copy_only=False),
         ent_ids.take(pa.array(joint_rows)).to_numpy(zero_copy_only=False)], names=["region_id", "feature_id"])
    joint_index = joint_index.unique()
    joint = gpd.GeoDataFrame(index=joint_index, geometry=gpd.GeoSeries([None] * len(joint_index),
                                                                        index=joint_index), crs="EPSG:4326")
    return Region(regions, features, joint, padded, pairs, grid, train)


def grid_neighbourhood(grid: dict[str, tuple[int, int]]):
    """An SRAI neighbourhood over square tiles: the (up to) 8 tiles around each tile."""
    from srai.neighbourhoods import Neighbourhood

    class GridNeighbourhood(Neighbourhood[str]):
        def __init__(self, grid: dict[str, tuple[int, int]]):
            super().__init__(include_center=False)
            self.at = {cr: t for t, cr in grid.items()}
            self.grid = grid

        def get_neighbours(self, index: str, include_center: bool | None = None) -> set[str]:
            c, r = self.grid[index]
            out = {self.at[c + dc, r + dr] for dc in (-1, 0, 1) for dr in (-1, 0, 1)
                   if (dc or dr) and (c + dc, r + dr) in self.at}
            return self._handle_center(index, 1, out, at_distance=False, include_center_override=include_center)

    return GridNeighbourhood(grid)


def square_grid_dataset(counts, grid: dict[str, tuple[int, int]], radius: int, centres: list[str] | None = None):
    """GeoVeX's dataset over square tiles read in axial coordinates (see the module docstring): one tensor per
    centre tile (``centres``, default all), features x (2R + 2) x (2R + 2), the tile at [R, R] and each tile
    (column + dc, row + dr) within hexagonal distance ``radius`` (max(|dc|, |dr|, |dc + dr|)) at [R + dr, R + dc],
    where GeoVeX's hexagonal kernels and ring weights expect it; missing neighbours stay zero. One gather per
    item (SRAI's HexagonalDataset fills each neighbour in a Python loop)."""
    import torch
    from srai.embedders.geovex.dataset import HexagonalDataset

    n, size = counts.shape[0], 2 * radius + 2
    cr = np.array([grid[t] for t in counts.index], np.int64).reshape(-1, 2)
    lo = (cr.min(0) if n else np.zeros(2, np.int64)) - radius
    dense = np.full(tuple((cr.max(0) if n else np.zeros(2, np.int64)) - lo + radius + 1), n, np.int64)
    dense[cr[:, 0] - lo[0], cr[:, 1] - lo[1]] = np.arange(n)
    loc = {t: i for i, t in enumerate(counts.index)}
    at = np.array([loc[t] for t in (counts.index if centres is None else centres)], np.int64)
    table = np.full((len(at), size * size), n, np.int64)  # n: the zero row
    for dc in range(-radius, radius + 1):
        for dr in range(-radius, radius + 1):
            if max(abs(dc), abs(dr), abs(dc + dr)) <= radius:
                table[:, (radius + dr) * size + radius + dc] = dense[cr[at, 0] - lo[0] + dc, cr[at, 1] - lo[1] + dr]

    class SquareGridDataset(HexagonalDataset):
        def __init__(self):  # HexagonalDataset's fields, from the grid instead of H3
            self._k, self._N = radius, counts.shape[1]
            self._data_torch = torch.cat([torch.from_numpy(counts.to_numpy(dtype=np.float32)),
                                          torch.zeros(1, counts.shape[1])])
            self._table = torch.from_numpy(table)
            self._valid_cells = [(counts.index[i], int(i), []) for i in at]
            self._invalid_cells = set()

        def __getitem__(self, index):
            return self._data_torch[self._table[index]].T.reshape(self._N, size, size)

    return SquareGridDataset()


@dataclass
class PeerStats:
    dim: int = 0
    fit_s: float = 0.0
    transform_s: float = 0.0  # all embedding passes (unmasked and each masked one) together
    peak_mb: float = 0.0  # the largest resident-memory (RSS) rise over its level before a fit or pass


@dataclass
class Peers:
    """The fitted peers of one region: ``embed(region)`` gives every peer's vectors in the region's order."""

    names: tuple[str, ...]
    models: dict = field(default_factory=dict)
    stats: dict[str, PeerStats] = field(default_factory=dict)

    def embed(self, region: Region, ids: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every peer's vectors of the tiles ``ids`` (default all, in the region's order), embedded in
        ``region`` (their neighbours' features included); counts as log(1 + count) (``LOG_COUNTS``)."""
        ids = list(region.regions.index) if ids is None else ids
        out = {}
        for name in self.names:
            with _measure(self.stats[name], "transform_s"), _quiet():
                df = _transform(name, self.models[name], region, ids)
            if lost := len(set(ids) - set(df.index)):
                raise RuntimeError(f"peer {name} gave no vector for {lost} of {len(ids)} tiles")
            x = df.loc[ids].to_numpy(np.float32)
            if name in LOG_COUNTS:
                x = np.log1p(x)
            self.stats[name].dim = x.shape[1]
            out[name] = x
        return out


def fit(region: Region, names: tuple[str, ...], epochs: int, seed: int, radius: int = 4,
        neighbourhood_distance: int = 2) -> Peers:
    """The peers ``names`` for ``region``: Count and ContextualCount need no fit; Hex2Vec and GeoVeX are
    trained on the region's training tiles with all their tags (``epochs``, seeded; the process's random
    states are left as they were). A region without training tiles is an error: nothing to fit on."""
    from srai.embedders import ContextualCountEmbedder, CountEmbedder

    if not region.train:
        raise ValueError("no training tiles to fit the peers on")
    peers = Peers(names, stats={n: PeerStats() for n in names})
    trainer = {"max_epochs": epochs, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False}
    train = region.subset(region.train)
    progress = Progress("evaluate: fitting SRAI peers", len(names), "peers", every=0)
    for name in names:
        with _measure(peers.stats[name], "fit_s"), _quiet(), _seeded(seed):
            if name == "count":
                m = CountEmbedder(expected_output_features=region.names, count_subcategories=True)
            elif name == "contextual_count":
                m = ContextualCountEmbedder(grid_neighbourhood(region.grid), neighbourhood_distance,
                                            expected_output_features=region.names, count_subcategories=True,
                                            num_of_multiprocessing_workers=0)
            elif name == "hex2vec":
                m = _classes()[0](expected_output_features=region.names, count_subcategories=True)
                m.fit(train.regions, train.features, train.joint, grid_neighbourhood(train.grid),
                      batch_size=64, trainer_kwargs=dict(trainer))
            elif name == "geovex":
                m = _SquareGeoVex(region.names, radius)
                m.fit_grid(train, dict(trainer))
            else:
                raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
        peers.models[name] = m
        progress.update()
    progress.close()
    return peers


def _transform(name: str, model, region: Region, ids: list[str]):
    if name == "geovex":
        return model.transform_grid(region, ids)
    if name == "contextual_count":  # the neighbourhood of the region being embedded
        model.neighbourhood = grid_neighbourhood(region.grid)
    return model.transform(region.regions, region.features, region.joint)


@functools.cache
def _classes():
    """(Hex2Vec, GeoVeX) as used here, made on first use (SRAI is optional). SRAI's counts come out in an order
    that changes from call to call (polars' group-by); both take them in the region's order, so a seeded fit
    is repeatable."""
    from srai.embedders import GeoVexEmbedder, Hex2VecEmbedder

    class OrderedHex2Vec(Hex2VecEmbedder):
        def _get_raw_counts(self, regions_gdf, features_gdf, joint_gdf):
            return super()._get_raw_counts(regions_gdf, features_gdf, joint_gdf).loc[regions_gdf.index]

    class SquareGeoVex(GeoVexEmbedder):
        """SRAI's GeoVeX on a square grid (``square_grid_dataset``); model, loss and training unchanged."""

        def __init__(self, names: list[str], radius: int):
            super().__init__(target_features=names, count_subcategories=True, batch_size=64,
                             neighbourhood_radius=radius)

        def _get_raw_counts(self, regions_gdf, features_gdf, joint_gdf):
            return super()._get_raw_counts(regions_gdf, features_gdf, joint_gdf).loc[regions_gdf.index]

        def fit_grid(self, region: Region, trainer_kwargs: dict) -> None:
            import pytorch_lightning as pl
            from torch.utils.data import DataLoader

            counts = self._get_raw_counts(region.regions, region.features, region.joint)
            dataset = square_grid_dataset(counts, region.grid, self._r)
            self._prepare_model(counts, 0.001)
            _train_hexagonal_kernels(self._model)
            pl.Trainer(**trainer_kwargs).fit(self._model, DataLoader(dataset, batch_size=self._batch_size,
                                                                     shuffle=True))
            self._is_fitted = True

        def transform_grid(self, region: Region, ids: list[str]):
            import pandas as pd
            import torch

            self._check_is_fitted()
            counts = self._get_raw_counts(region.regions, region.features, region.joint)
            dataset = square_grid_dataset(counts, region.grid, self._r, centres=ids)
            self._model.eval()
            with torch.no_grad():
                x = [self._model.encoder(torch.stack([dataset[i] for i in range(a, min(a + 256, len(dataset)))]))
                     for a in range(0, len(dataset), 256)]
            return pd.DataFrame(torch.cat(x).numpy() if x else np.zeros((0, self._embedding_size)),
                                index=dataset.get_valid_cells())

    return OrderedHex2Vec, SquareGeoVex


def _SquareGeoVex(names, radius):  # noqa: N802 - the class is made on first use
    return _classes()[1](names, radius)


def _train_hexagonal_kernels(model) -> None:
    """SRAI 0.10.2's ``HexagonalConv2d.forward`` sets ``conv.weight = Parameter(conv.weight * mask)`` at every
    call: the optimiser, built before the first call, holds the replaced tensor, so the convolutions keep their
    initial weights. Here the mask is a parametrisation of the weight the optimiser trains (the same masked
    kernel in every forward pass) and the layer calls its convolution directly."""
    from srai.embedders.geovex.model import HexagonalConv2d
    from torch import nn
    from torch.nn.utils import parametrize

    class Masked(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w):
            return w * self.mask

    for m in model.modules():
        if isinstance(m, HexagonalConv2d) and not parametrize.is_parametrized(m.conv, "weight"):
            parametrize.register_parametrization(m.conv, "weight", Masked(m.hexagonal_mask))
            m.forward = m.conv.forward


@contextlib.contextmanager
def _seeded(seed: int):
    """Lightning's ``seed_everything`` inside the block (torch, numpy and ``random``, which Hex2Vec's negative
    sampling draws from); the process's random states and environment as they were after it."""
    import pytorch_lightning as pl
    import torch

    py, np_state = random.getstate(), np.random.get_state()
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    with torch.random.fork_rng(devices=[]):
        pl.seed_everything(seed, verbose=False)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextlib.contextmanager
def _measure(stats: PeerStats, attr: str):
    """Adds the block's seconds to ``stats.<attr>`` and keeps the largest resident-memory rise (sampled every
    10 ms on a thread; Linux's /proc, else not measured)."""
    peak, stop = [0.0], threading.Event()
    try:
        base = _rss_mb()
    except OSError:
        base = None

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _rss_mb() - base)

    sampler = threading.Thread(target=sample, daemon=True) if base is not None else None
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        setattr(stats, attr, getattr(stats, attr) + time.perf_counter() - t0)
        stop.set()
        if sampler:
            sampler.join()
            stats.peak_mb = max(stats.peak_mb, peak[0], _rss_mb() - base)


TQDM_MODULES = ("srai.embedders.geovex.dataset", "srai.embedders.hex2vec.neighbour_dataset",
                "srai.embedders.contextual_count_embedder")  # SRAI's modules that draw progress bars


def _silent_tqdm(iterable=None, *args, **kwargs):
    """tqdm without a bar: SRAI's bars redraw with carriage returns thousands of times into the logs."""
    from tqdm import tqdm

    return tqdm(iterable, *args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def _quiet():
    """Lightning's advice, the libraries' warnings and SRAI's progress bars off while a peer fits or embeds
    (each SRAI module that draws one gets a disabled ``tqdm`` for the block, and its own back after)."""
    import importlib

    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    patched = []
    for mod_name in TQDM_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if hasattr(mod, "tqdm"):
            patched.append((mod, mod.tqdm))
            mod.tqdm = _silent_tqdm
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for mod, original in patched:
            mod.tqdm = original
        for n, lv in zip(names, levels, strict=True):
            logging.getLogger(n).setLevel(lv)
