"""Token shards -> packed, masked batches (the collator runs in DataLoader workers).

Reads ``W/tokens/{split}-*.parquet`` with pyarrow only. Batches mix the regions
(each region drawn per its quota) with tiles of similar length quantiles, are
shuffled per epoch with a seed, and are dealt to ranks so every rank gets the
same number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_contracts import TOKENS, ContractError, open_artifact
from geojepa.model.jepa import MODALITIES, TokenBatch
from geojepa.train.masks import make_mask
from geojepa.train.settings import MaskConfig


class ShardDataset(torch.utils.data.Dataset):
    """The tiles of one split of one or more regions (token folders), in memory as Arrow columns; items are
    per-modality numpy arrays. ``region[i]`` is the index of tile i's folder."""

    def __init__(self, folders: Path | list[Path], split: str, modalities: tuple[str, ...]):
        folders = [Path(folders)] if isinstance(folders, str | Path) else [Path(f) for f in folders]
        tables, region, self.dims = [], [], None
        for r, folder in enumerate(folders):
            files = sorted(folder.glob(f"{split}-*.parquet"))
            if not files:
                raise ContractError(f"{folder}: no {split}-*.parquet token shards; run `geojepa tokens` first")
            for f in files:
                open_artifact(f, TOKENS)
            meta = pq.read_schema(files[0]).metadata
            dims = {"tags": int(meta[b"tag_dim"]), "geometry": int(meta[b"geometry_dim"]),
                    "image": int(meta[b"image_dim"])}
            if self.dims is not None and any(dims[m] != self.dims[m] for m in modalities):
                raise ContractError(f"{folder}: token widths {dims} differ from {folders[0]}'s {self.dims}")
            self.dims = self.dims or dims
            if "image" in modalities and dims["image"] == 0:
                raise ContractError(f"{folder}: modality 'image' asked for, but the shards have no image tokens "
                                    "(tile with --imagery, or drop 'image' from train.modalities)")
            table = pq.read_table(files)
            if table.num_rows == 0:
                raise ContractError(f"{folder}: the {split} token shards hold no tiles")
            tables.append(table)
            region.append(np.full(table.num_rows, r))
        self.table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.region = np.concatenate(region)
        self.modalities = modalities
        self.rows = TokenRows(self.table, modalities)
        self.lengths = self.rows.lengths(modalities)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        return {"index": i, **self.rows.item(i)}


class TokenRows:
    """Token-shard rows as per-modality (tokens, width) arrays: each float column is held as one flat buffer
    with its row offsets, so an item is a few numpy views (no per-row conversion: this feeds the GPU)."""

    COLUMNS = {"epos": "entity_position", "tags": "tag", "geometry": "geometry", "image": "image",
               "ppos": "patch_position"}

    def __init__(self, table, modalities: tuple[str, ...]):
        wanted = ["epos", *(m for m in ("tags", "geometry", "image") if m in modalities)]
        wanted += ["ppos"] if "image" in modalities else []
        self.n_entities = np.diff(table["entity_position"].combine_chunks().offsets.to_numpy()) // 8
        self.n_patches = np.diff(table["patch_position"].combine_chunks().offsets.to_numpy()) // 8
        self.flat = {}  # name -> (values, row offsets, width)
        for name in wanted:
            col = table[self.COLUMNS[name]].combine_chunks()
            values = col.values.to_numpy(zero_copy_only=False)
            rows = (self.n_patches if name in ("image", "ppos") else self.n_entities).sum()
            self.flat[name] = (values, col.offsets.to_numpy(), len(values) // max(rows, 1))

    def lengths(self, modalities: tuple[str, ...]) -> np.ndarray:
        """Tokens per tile for these modalities."""
        return (self.n_entities * sum(m in modalities for m in ("tags", "geometry"))
                + self.n_patches * ("image" in modalities))

    def item(self, i: int) -> dict:
        out = {}
        for name, (values, offsets, width) in self.flat.items():
            rows = self.n_patches[i] if name in ("image", "ppos") else self.n_entities[i]
            out[name] = values[offsets[i] : offsets[i + 1]].reshape(rows, width)
        return out


def region_quotas(counts: np.ndarray, weights: np.ndarray | None = None, cap: float = 2.0) -> np.ndarray:
    """Tiles drawn from each region per epoch. Default: proportional to its tiles, but no region above ``cap``
    times the median region's count, so one large region cannot swamp the small ones. With ``weights``: the
    same total, shared in those proportions (a small region is then drawn with repetition)."""
    counts = np.asarray(counts, float)
    if weights is None:
        base = np.minimum(counts, cap * np.median(counts))
    else:
        weights = np.asarray(weights, float)
        base = weights / weights.sum() * counts.sum()
    return np.maximum(np.round(base), 1).astype(int)


def split_by_tokens(chunk: list[int], lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """The tiles ``chunk`` (in length order) in consecutive parts of at most ``max_tokens`` tokens (``lengths``:
    tokens a tile); a longer tile is a part alone."""
    parts, part, tokens = [], [], 0
    for i in chunk:
        if part and tokens + lengths[i] > max_tokens:
            parts.append(part)
            part, tokens = [], 0
        part.append(i)
        tokens += int(lengths[i])
    return [*parts, part] if part else parts


class MixedBatches(torch.utils.data.Sampler):
    """Batches of ``batch_tiles`` tiles with the regions mixed in every batch, dealt round-robin to ranks.

    Each epoch draws ``quotas[r]`` tiles of region r (with repetition only when the quota exceeds its tiles),
    orders each region's draw by length, and interleaves the regions by length quantile: a batch holds tiles
    of every region in proportion to its quota, of similar length quantiles. With ``max_tokens``, a batch whose
    tiles hold more tokens is split into consecutive parts of at most that many (a longer tile alone): the long
    tiles' batches no longer take many times a median step. The batch order is shuffled; all of it is a
    function of (seed, epoch), so a resumed run draws the same batches. With ``max_tokens`` every epoch has
    its first epoch's number of batches (a later one with more is cut, one with fewer repeats its first ones).
    """

    def __init__(self, lengths: np.ndarray, region: np.ndarray, batch_tiles: int, seed: int, rank: int = 0,
                 world: int = 1, quotas: np.ndarray | None = None, max_tokens: int | None = None):
        self.lengths, self.region, self.batch_tiles = np.asarray(lengths), np.asarray(region), batch_tiles
        self.seed, self.rank, self.world, self.max_tokens = seed, rank, world, max_tokens
        self._per_rank: int | None = None
        self.members = [np.flatnonzero(self.region == r) for r in range(int(self.region.max()) + 1)]
        self.quotas = np.array([len(m) for m in self.members]) if quotas is None else np.asarray(quotas)
        self.epoch = 0

    def _all(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in their shuffled order."""
        rng = np.random.default_rng([self.seed, epoch])
        order, key = [], []
        for members, q in zip(self.members, self.quotas, strict=True):
            reps = -(-q // len(members))
            drawn = np.concatenate([rng.permutation(members) for _ in range(reps)])[:q]
            drawn = drawn[np.argsort(self.lengths[drawn] + rng.random(q) * 0.5, kind="stable")]  # ties shuffled
            order.append(drawn)
            key.append((np.arange(q) + rng.random(q)) / q)  # length quantile within the region
        order, key = np.concatenate(order), np.concatenate(key)
        order = order[np.argsort(key, kind="stable")]
        chunks = [order[i : i + self.batch_tiles].tolist() for i in range(0, len(order), self.batch_tiles)]
        if self.max_tokens:
            chunks = [part for c in chunks for part in split_by_tokens(c, self.lengths, self.max_tokens)]
        return [chunks[i] for i in rng.permutation(len(chunks))]

    def batches(self) -> list[list[int]]:
        chunks = self._all(self.epoch)
        usable = len(chunks) // self.world * self.world
        mine = chunks[:usable][self.rank :: self.world]
        if self.max_tokens:  # the same number every epoch (the first epoch's), on every rank
            n = len(self)
            mine = (mine * -(-n // max(len(mine), 1)))[:n]
        return mine

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        if not self.max_tokens:
            return -(-int(self.quotas.sum()) // self.batch_tiles) // self.world
        if self._per_rank is None:
            self._per_rank = len(self._all(0)) // self.world  # 0: no batch (train names the problem)
        return self._per_rank


class Collator:
    """Packs tiles and draws their masks; deterministic per (seed, epoch, tiles), whatever the worker."""

    def __init__(self, modalities: tuple[str, ...], dims: dict[str, int], seed: int, masks: MaskConfig = MaskConfig(),
                 pad_to_max: bool = False, max_entities: int | None = None, entity_dropout: float = 0.0):
        self.modalities, self.dims, self.seed, self.masks, self.pad_to_max = modalities, dims, seed, masks, pad_to_max
        self.max_entities, self.entity_dropout = max_entities, entity_dropout
        self.epoch = 0

    def __call__(self, items: list[dict]) -> TokenBatch:
        rng = np.random.default_rng([self.seed, self.epoch, *(it["index"] for it in items)])
        if self.max_entities:
            items = [spatial_crop(it, self.max_entities, rng) for it in items]
        packed = pack(items, self.modalities)
        context, pred_src, pred_target, pred_doc = [], [], [], []
        n_pred = 0
        for start, tok_mod, tok_pos, tok_ent in packed.pop("tiles"):
            n = len(tok_mod)
            mask = make_mask(tok_pos.reshape(n, 4, 2).mean(1), tok_mod, rng, self.masks, tok_ent)
            ctx = mask.context
            if self.entity_dropout:
                ctx = entity_dropout(ctx, tok_mod, tok_ent, self.entity_dropout, rng)
            context.append(start + ctx)
            for block in mask.targets:  # one predictor document per (tile, block): the context, then the block
                pred_src += [start + ctx, start + block]
                pred_target += [np.zeros(len(ctx), bool), np.ones(len(block), bool)]
                pred_doc.append(np.full(len(ctx) + len(block), n_pred))
                n_pred += 1
        cat = np.concatenate
        pred_src, pred_target = torch.from_numpy(cat(pred_src)).long(), torch.from_numpy(cat(pred_target))
        pred_pos = packed["pos"][pred_src]
        if not self.masks.target_box:  # a target's position is its centre only: not its size, shape or heading
            pred_pos[pred_target] = pred_pos[pred_target].view(-1, 4, 2).mean(1).repeat(1, 4)
        return TokenBatch(**packed, context=torch.from_numpy(cat(context)).long(), pred_src=pred_src,
                          pred_pos=pred_pos, pred_is_target=pred_target,
                          pred_doc=torch.from_numpy(cat(pred_doc)).long(), n_pred_docs=n_pred,
                          pad_to_max=self.pad_to_max)


def entity_dropout(context: np.ndarray, modality: np.ndarray, entity: np.ndarray, p: float,
                   rng: np.random.Generator) -> np.ndarray:
    """The context tokens with, on a share ``p`` of the entities whose tags and geometry tokens are both in it,
    one of the two left out (which one at random): the reference's within-entity dropout, the corruption the
    masked evaluation applies (an entity known by its shape alone, or by its tags alone). Image patches and
    entities with a single context token are untouched; the context keeps its order."""
    ent_mod = {MODALITIES["tags"], MODALITIES["geometry"]}
    is_ent = np.isin(modality[context], list(ent_mod))
    ids, counts = np.unique(entity[context][is_ent], return_counts=True)
    both = ids[counts == 2]
    chosen = both[rng.random(len(both)) < p]
    if not len(chosen):
        return context
    drop_mod = np.where(rng.random(len(chosen)) < 0.5, MODALITIES["tags"], MODALITIES["geometry"])
    dropped = np.full(int(entity.max()) + 1, -1)
    dropped[chosen] = drop_mod
    return context[~(is_ent & (dropped[entity[context]] == modality[context]))]


def spatial_crop(item: dict, k: int, rng: np.random.Generator) -> dict:
    """A tile of more than ``k`` entities cut to the ``k`` whose centres are nearest a random one of them (in
    the tile's order): a spatially contiguous part of the tile, a different one each epoch. Long tiles cost
    the attention quadratically; this bounds a training step's worst case with tags and geometry. Positions
    stay the tile's (the masks' block sizes remain fractions of the whole tile, so a crop's blocks hold
    fewer entities) and image patches are untouched (with images the worst case is not bounded)."""
    n = len(item["epos"])
    if n <= k:
        return item
    centres = item["epos"].reshape(n, 4, 2).mean(1)
    anchor = centres[rng.integers(n)]
    keep = np.sort(np.argsort(((centres - anchor) ** 2).sum(1), kind="stable")[:k])
    out = dict(item)
    for name in ("epos", "tags", "geometry"):
        if name in item:
            out[name] = item[name][keep]
    return out


def pack(items: list[dict], modalities: tuple[str, ...]) -> dict:
    """The tiles' tokens in one sequence: per tile, its tags tokens, then geometry, then image (the order the
    encoder's outputs come back in). Returns TokenBatch fields plus ``tiles``: (first token, modality, positions,
    entity) per tile, where an entity's tags and geometry tokens share its index and each image patch is its own."""
    feats = {m: [] for m in modalities}
    rows = {m: 0 for m in modalities}
    modality, slot, pos, doc, tiles = [], [], [], [], []
    offset = 0
    for t, it in enumerate(items):
        tok_mod, tok_slot, tok_pos, tok_ent = [], [], [], []
        for m in modalities:
            x = it[m]
            feats[m].append(x)
            tok_mod.append(np.full(len(x), MODALITIES[m]))
            tok_slot.append(rows[m] + np.arange(len(x)))
            tok_pos.append(it["ppos"] if m == "image" else it["epos"])
            tok_ent.append(np.arange(len(x)) + (len(it["epos"]) if m == "image" else 0))
            rows[m] += len(x)
        tok_mod, tok_slot, tok_pos, tok_ent = map(np.concatenate, (tok_mod, tok_slot, tok_pos, tok_ent))
        modality.append(tok_mod)
        slot.append(tok_slot)
        pos.append(tok_pos)
        doc.append(np.full(len(tok_mod), t))
        tiles.append((offset, tok_mod, tok_pos, tok_ent))
        offset += len(tok_mod)
    cat = np.concatenate
    return {"features": {MODALITIES[m]: torch.from_numpy(cat(feats[m]).astype(np.float32)) for m in modalities},
            "modality": torch.from_numpy(cat(modality)).long(), "slot": torch.from_numpy(cat(slot)).long(),
            "pos": torch.from_numpy(cat(pos).astype(np.float32)), "doc": torch.from_numpy(cat(doc)).long(),
            "n_tiles": len(items), "tiles": tiles}
