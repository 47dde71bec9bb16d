"""GeoJEPA: context encoder, EMA target encoder and predictor over packed tile tokens.

Modalities: 0 tags, 1 geometry, 2 image. Each has its own linear projection
to the model width; every token adds its position (8 numbers through an MLP)
and a modality embedding. The context encoder sees the context tokens only;
the target encoder (an EMA copy, no gradients) sees whole tiles and its
outputs are layer-normed; the predictor gets the context encoder's outputs
plus a learned mask token at each target's position, one (tile, target block)
per document, and predicts the target encoder's outputs there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from geojepa.model.layers import Block, Packing, PositionMLP

MODALITIES = {"tags": 0, "geometry": 1, "image": 2}


@dataclass(frozen=True)
class ModelConfig:
    dims: tuple[int, int, int]  # input widths of tags, geometry, image tokens
    width: int = 384
    depth: int = 12
    heads: int = 8
    mlp: int = 1536
    pred_width: int = 192
    pred_depth: int = 4
    pred_heads: int = 6


@dataclass
class TokenBatch:
    """Packed tokens of a batch of tiles with their JEPA masks (built by the collator)."""

    features: dict[int, torch.Tensor]  # modality -> (rows, width)
    modality: torch.Tensor  # (T,)
    slot: torch.Tensor  # (T,) row of the token in features[modality]
    pos: torch.Tensor  # (T, 8)
    doc: torch.Tensor  # (T,) tile of each token
    n_tiles: int
    context: torch.Tensor  # (C,) token indices, grouped by tile
    pred_src: torch.Tensor  # (Q,) token index of each predictor token
    pred_is_target: torch.Tensor  # (Q,) bool
    pred_doc: torch.Tensor  # (Q,) (tile, block) document of each predictor token
    n_pred_docs: int
    pred_pos: torch.Tensor | None = None  # (Q, 8) their positions (a target's centre only, unless masks.target_box)
    pad_to_max: bool = False

    def to(self, device) -> TokenBatch:
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in vars(self).items()
                 if k != "features"}
        return TokenBatch(features={m: f.to(device, non_blocking=True) for m, f in self.features.items()}, **moved)

    @property
    def n_tokens(self) -> int:
        return len(self.doc)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, cfg.width) if d else nn.Identity() for d in cfg.dims)
        # Each modality's projection is normalised, and the modality embedding starts small (std 0.02): at
        # N(0, 1) it was a vector of length ~sqrt(width) beside content of length ~1, so the modality alone
        # explained most of the outputs' variance and the predictor could lower the loss by predicting it.
        self.proj_norm = nn.ModuleList(nn.LayerNorm(cfg.width) if d else nn.Identity() for d in cfg.dims)
        self.pos = PositionMLP(cfg.width)
        self.modality = nn.Embedding(len(MODALITIES), cfg.width)
        nn.init.normal_(self.modality.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.width = cfg.width

    def embed(self, b: TokenBatch) -> torch.Tensor:
        x = b.pos.new_zeros(b.n_tokens, self.width)
        for m, f in b.features.items():
            rows = b.modality == m
            x[rows] = self.proj_norm[m](self.proj[m](f))[b.slot[rows]].to(x.dtype)
        return x + self.pos(b.pos) + self.modality(b.modality)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, packing)
        return self.norm(x)


class Predictor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inp = nn.Linear(cfg.width, cfg.pred_width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.pred_width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pos = PositionMLP(cfg.pred_width)
        self.modality = nn.Embedding(len(MODALITIES), cfg.pred_width)
        nn.init.normal_(self.modality.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.pred_width, cfg.pred_heads, 4 * cfg.pred_width)
                                    for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(cfg.pred_width)
        self.out = nn.Linear(cfg.pred_width, cfg.width)

    def forward(self, context_out: torch.Tensor, b: TokenBatch) -> torch.Tensor:
        """Predictions (targets, width) for the target tokens, in ``pred_src[pred_is_target]`` order."""
        rank = torch.full((b.n_tokens,), -1, dtype=torch.long, device=b.doc.device)
        rank[b.context] = torch.arange(len(b.context), device=b.doc.device)
        src = b.pred_src
        pos = b.pos[src] if b.pred_pos is None else b.pred_pos
        x = self.pos(pos) + self.modality(b.modality[src])
        ctx = ~b.pred_is_target
        x[ctx] = x[ctx] + self.inp(context_out[rank[src[ctx]]]).to(x.dtype)
        x[b.pred_is_target] = x[b.pred_is_target] + self.mask_token.to(x.dtype)
        packing = Packing(b.pred_doc, b.n_pred_docs, b.pad_to_max)
        for block in self.blocks:
            x = block(x, packing)
        return self.out(self.norm(x[b.pred_is_target]))


def vicreg_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance (hinge on the per-dimension std) and covariance (off-diagonal) terms of VICReg."""
    z = z.float()
    z = z - z.mean(0)
    std = torch.sqrt(z.var(0) + 1e-4)
    var = F.relu(1 - std).mean()
    cov = (z.T @ z) / max(len(z) - 1, 1)
    off = cov - torch.diag(torch.diag(cov))
    return var, off.pow(2).sum() / z.shape[1]


def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """Collapse detectors over a set of embeddings (rows): effective rank (exp of the entropy of the centred
    singular values' shares; 1 = all on one axis) and mean pairwise cosine (1 = all the same direction)."""
    z = z.float()
    if not bool(torch.isfinite(z).all()):
        return {"erank": float("nan"), "mean_cos": float("nan")}
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    erank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    u = F.normalize(z[z.norm(dim=1) > 0], dim=1)  # an empty tile's zero vector has no direction
    n = len(u)
    cos = float(((u.sum(0) @ u.sum(0)) - n) / max(n * (n - 1), 1))
    return {"erank": erank, "mean_cos": cos}


@torch.no_grad()
def tile_means(encoder: Encoder, b: TokenBatch) -> torch.Tensor:
    """(tiles, width) mean of the encoder's layer-normed outputs over each tile's tokens (all of them)."""
    out = encoder(encoder.embed(b), Packing(b.doc, b.n_tiles, b.pad_to_max)).float()
    out = F.layer_norm(out, (out.shape[-1],))
    count = torch.bincount(b.doc, minlength=b.n_tiles).clamp_min(1).unsqueeze(1)
    return torch.zeros(b.n_tiles, out.shape[1], device=out.device).index_add_(0, b.doc, out) / count


class GeoJEPA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)

    def forward(self, b: TokenBatch, vicreg_scale: float = 0.02, var_weight: float = 25.0,
                cov_weight: float = 1.0) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.target_encoder(self.target_encoder.embed(b), Packing(b.doc, b.n_tiles, b.pad_to_max))
            target = F.layer_norm(target, (target.shape[-1],))
        x = self.encoder.embed(b)[b.context]
        context_out = self.encoder(x, Packing(b.doc[b.context], b.n_tiles, b.pad_to_max))
        pred = self.predictor(context_out, b)
        jepa = F.smooth_l1_loss(pred.float(), target[b.pred_src[b.pred_is_target]].float(), beta=1.0)
        # VICReg where collapse would hurt: the predictions (as the reference) and the tiles' mean context
        # embeddings (what a tile embedding is made of). Not on the context tokens themselves: after a LayerNorm
        # with a learned scale, the variance hinge is met for free (per-dimension std 1.00 while the loss rose).
        tile = torch.zeros(b.n_tiles, context_out.shape[1], device=pred.device, dtype=torch.float32)
        doc = b.doc[b.context]
        tile = tile.index_add_(0, doc, context_out.float()) / torch.bincount(doc, minlength=b.n_tiles).clamp_min(1)[:, None]
        # A spread needs two rows: a micro-batch of one tile (the remainder of an epoch's draw) has no tile term.
        terms = [vicreg_terms(z) for z in (pred, tile) if len(z) >= 2]
        zero = jepa.new_zeros(())
        var = torch.stack([t[0] for t in terms]).mean() if terms else zero
        cov = torch.stack([t[1] for t in terms]).mean() if terms else zero
        loss = jepa + vicreg_scale * (var_weight * var + cov_weight * cov)
        return {"loss": loss, "jepa": jepa.detach(), "var": var.detach(), "cov": cov.detach(),
                "std": pred.detach().float().std(0, correction=0).mean(),
                "tile_std": tile.detach().std(0, correction=0).mean()}

    def compile_blocks(self) -> GeoJEPA:
        """torch.compile every transformer block in place (dynamic shapes: one compilation serves every packed
        length); parameter names, state dicts and the EMA update are unchanged."""
        for part in (self.encoder, self.target_encoder, self.predictor):
            for block in part.blocks:
                block.compile(dynamic=True)
        return self

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        for t, s in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def load_checkpoint(path, device="cpu") -> dict:
    """A checkpoint's contents, loaded as plain data (weights only: no pickled code can run). A damaged or
    foreign file raises ``ValueError`` naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncation, bad zip, refused pickle: all mean "not a good checkpoint")
        raise ValueError(f"{path}: damaged or not a GeoJEPA checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= state.keys():
        raise ValueError(f"{path}: not a GeoJEPA training checkpoint (no model, config and step)")
    return state


def encoder_from_checkpoint(path, untrained: bool = False, seed: int = 0, which: str = "target") -> tuple[Encoder, dict]:
    """An encoder of a training checkpoint (``which``: the EMA ``target`` or the ``context`` encoder) and its
    resolved train config; ``untrained``: the same architecture freshly initialised with ``seed`` (the
    baseline a trained model must beat)."""
    if which not in ("target", "context"):
        raise ValueError(f"which encoder: 'target' or 'context', not {which!r}")
    state = load_checkpoint(path)
    c, weights = state["config"], state["model"]
    dims = tuple(weights[f"encoder.proj.{i}.weight"].shape[1] if f"encoder.proj.{i}.weight" in weights else 0
                 for i in range(len(MODALITIES)))
    cfg = ModelConfig(dims=dims, width=c["width"], depth=c["depth"], heads=c["heads"], mlp=c["mlp"])
    torch.manual_seed(seed)
    encoder = Encoder(cfg)
    if not untrained:
        prefix = "target_encoder." if which == "target" else "encoder."
        encoder.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
    return encoder.eval(), c
