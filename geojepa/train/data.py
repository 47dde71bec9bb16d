"""Token shards -> packed, masked batches (the collator runs in DataLoader workers).

Reads ``W/tokens/{split}-*.parquet`` with pyarrow only. Batches are formed from
tiles of similar length (the shards are sorted by length), shuffled per epoch
with a seed, and dealt to ranks so every rank gets the same number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from data_contracts import TOKENS, ContractError, open_artifact
from geojepa.model.jepa import MODALITIES, TokenBatch
from geojepa.train.masks import MaskConfig, make_mask


class ShardDataset(torch.utils.data.Dataset):
    """The tiles of one split, in memory as Arrow columns; items are per-modality numpy arrays."""

    def __init__(self, folder: Path, split: str, modalities: tuple[str, ...]):
        files = sorted(Path(folder).glob(f"{split}-*.parquet"))
        if not files:
            raise ContractError(f"{folder}: no {split}-*.parquet token shards; run `geojepa tokens` first")
        for f in files:
            open_artifact(f, TOKENS)
        meta = pq.read_schema(files[0]).metadata
        self.dims = {"tags": int(meta[b"tag_dim"]), "geometry": int(meta[b"geometry_dim"]),
                     "image": int(meta[b"image_dim"])}
        self.table = pq.read_table(files)
        if self.table.num_rows == 0:
            raise ContractError(f"{folder}: the {split} token shards hold no tiles")
        self.modalities = modalities
        if "image" in modalities and self.dims["image"] == 0:
            raise ContractError(f"{folder}: modality 'image' asked for, but the shards have no image tokens "
                                "(tile with --imagery, or drop 'image' from train.modalities)")
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


class LengthBatches(torch.utils.data.Sampler):
    """Batches of ``batch_tiles`` tiles of similar length, shuffled per epoch, dealt round-robin to ranks."""

    def __init__(self, lengths: np.ndarray, batch_tiles: int, seed: int, rank: int = 0, world: int = 1):
        self.lengths, self.batch_tiles, self.seed, self.rank, self.world = lengths, batch_tiles, seed, rank, world
        self.epoch = 0

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.argsort(self.lengths + rng.random(len(self.lengths)) * 0.5, kind="stable")  # ties shuffled
        chunks = [order[i : i + self.batch_tiles].tolist() for i in range(0, len(order), self.batch_tiles)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        usable = len(chunks) // self.world * self.world
        return chunks[:usable][self.rank :: self.world]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_tiles) // self.world


class Collator:
    """Packs tiles and draws their masks; deterministic per (seed, epoch, tiles), whatever the worker."""

    def __init__(self, modalities: tuple[str, ...], dims: dict[str, int], seed: int, masks: MaskConfig = MaskConfig(),
                 pad_to_max: bool = False):
        self.modalities, self.dims, self.seed, self.masks, self.pad_to_max = modalities, dims, seed, masks, pad_to_max
        self.epoch = 0

    def __call__(self, items: list[dict]) -> TokenBatch:
        rng = np.random.default_rng([self.seed, self.epoch, *(it["index"] for it in items)])
        packed = pack(items, self.modalities)
        context, pred_src, pred_target, pred_doc = [], [], [], []
        n_pred = 0
        for start, tok_mod, tok_pos in packed.pop("tiles"):
            n = len(tok_mod)
            mask = make_mask(tok_pos.reshape(n, 4, 2).mean(1), tok_mod, rng, self.masks)
            context.append(start + mask.context)
            for block in mask.targets:  # one predictor document per (tile, block): the context, then the block
                pred_src += [start + mask.context, start + block]
                pred_target += [np.zeros(len(mask.context), bool), np.ones(len(block), bool)]
                pred_doc.append(np.full(len(mask.context) + len(block), n_pred))
                n_pred += 1
        cat = np.concatenate
        return TokenBatch(**packed, context=torch.from_numpy(cat(context)).long(),
                          pred_src=torch.from_numpy(cat(pred_src)).long(),
                          pred_is_target=torch.from_numpy(cat(pred_target)),
                          pred_doc=torch.from_numpy(cat(pred_doc)).long(), n_pred_docs=n_pred,
                          pad_to_max=self.pad_to_max)


def pack(items: list[dict], modalities: tuple[str, ...]) -> dict:
    """The tiles' tokens in one sequence: per tile, its tags tokens, then geometry, then image (the order the
    encoder's outputs come back in). Returns TokenBatch fields plus ``tiles``: (first token, modality, positions)
    per tile."""
    feats = {m: [] for m in modalities}
    rows = {m: 0 for m in modalities}
    modality, slot, pos, doc, tiles = [], [], [], [], []
    offset = 0
    for t, it in enumerate(items):
        tok_mod, tok_slot, tok_pos = [], [], []
        for m in modalities:
            x = it[m]
            feats[m].append(x)
            tok_mod.append(np.full(len(x), MODALITIES[m]))
            tok_slot.append(rows[m] + np.arange(len(x)))
            tok_pos.append(it["ppos"] if m == "image" else it["epos"])
            rows[m] += len(x)
        tok_mod, tok_slot, tok_pos = map(np.concatenate, (tok_mod, tok_slot, tok_pos))
        modality.append(tok_mod)
        slot.append(tok_slot)
        pos.append(tok_pos)
        doc.append(np.full(len(tok_mod), t))
        tiles.append((offset, tok_mod, tok_pos))
        offset += len(tok_mod)
    cat = np.concatenate
    return {"features": {MODALITIES[m]: torch.from_numpy(cat(feats[m]).astype(np.float32)) for m in modalities},
            "modality": torch.from_numpy(cat(modality)).long(), "slot": torch.from_numpy(cat(slot)).long(),
            "pos": torch.from_numpy(cat(pos).astype(np.float32)), "doc": torch.from_numpy(cat(doc)).long(),
            "n_tiles": len(items), "tiles": tiles}
