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
from geojepa.model.sizes import ModelConfig  # defined there (torch-free, read by geojepa.config); used from here

MODALITIES = {"tags": 0, "geometry": 1, "image": 2}


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
        self.pos = PositionMLP(cfg.width, fourier=cfg.pos_fourier)
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
        self.pos = PositionMLP(cfg.pred_width, fourier=cfg.pos_fourier)
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


def target_relative_terms(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anti-collapse measured against the targets' own statistics (no reward for a shared component): a hinge
    on each dimension's std of the predictions at the targets' (detached) std, and the squared difference of
    the predictions' off-diagonal covariance from the targets' (per dimension). A perfect predictor pays 0."""
    p = pred.float() - pred.float().mean(0)
    t = target.float().detach() - target.float().detach().mean(0)
    std_p = torch.sqrt(p.var(0) + 1e-4)
    std_t = torch.sqrt(t.var(0) + 1e-4)
    var = F.relu(std_t - std_p).mean()
    n = max(len(p) - 1, 1)
    diff = (p.T @ p - t.T @ t) / n
    off = diff - torch.diag(torch.diag(diff))
    return var, off.pow(2).sum() / p.shape[1]


def _group_mean(x: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """(n, width) mean of the rows of ``x`` in each group (zero for an empty group)."""
    total = torch.zeros(n, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, group, x)
    return total / torch.bincount(group, minlength=n).clamp_min(1)[:, None].to(x.dtype)


@torch.no_grad()
def _context_mean(target: torch.Tensor, group: torch.Tensor, context: torch.Tensor, src: torch.Tensor,
                  doc: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """The trivial prediction of each target ``src``: the mean target of the context tokens of its (tile,
    modality); of its tile's context tokens when the modality has none there; of the batch's otherwise."""
    k = len(MODALITIES)
    by_group = _group_mean(target[context], group[context], n_tiles * k)
    n_group = torch.bincount(group[context], minlength=n_tiles * k)
    by_tile = _group_mean(target[context], doc[context], n_tiles)
    n_tile = torch.bincount(doc[context], minlength=n_tiles)
    fallback = target[context].mean(0) if len(context) else target.mean(0)
    out = torch.where((n_tile[doc[src]] > 0)[:, None], by_tile[doc[src]], fallback)
    return torch.where((n_group[group[src]] > 0)[:, None], by_group[group[src]], out)


@torch.no_grad()
def within_share(z: torch.Tensor, doc: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """The share of the rows' total variance that is within their tiles: 1 - between / total (1: tiles alike
    on average, every difference inside them; near 0: each tile one vector)."""
    z = z.float()
    centred = z - z.mean(0)
    total = centred.pow(2).sum()
    inside = (z - _group_mean(z, doc, n_tiles)[doc]).pow(2).sum()
    return inside / total.clamp_min(1e-12)


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
def tile_means(encoder: Encoder, b: TokenBatch, tokens: bool = False):
    """(tiles, width) mean of the encoder's layer-normed outputs over each tile's tokens (all of them); with
    ``tokens``, also the outputs themselves."""
    out = encoder(encoder.embed(b), Packing(b.doc, b.n_tiles, b.pad_to_max)).float()
    out = F.layer_norm(out, (out.shape[-1],))
    means = _group_mean(out, b.doc, b.n_tiles)
    return (means, out) if tokens else means


class GeoJEPA(nn.Module):
    def __init__(self, cfg: ModelConfig, tile_head: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        # With centred targets the predictor earns nothing for the tile's own meaning; this head (training only,
        # not part of the encoder) predicts each tile's mean target from its context's mean output.
        self.tile_head = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.width)) if tile_head else None
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)

    def forward(self, b: TokenBatch, vicreg_scale: float = 0.02, var_weight: float = 25.0,
                cov_weight: float = 1.0, regulariser: str = "vicreg", target_centre: bool = False,
                tile_head: float = 0.0) -> dict[str, torch.Tensor]:
        """The loss and its parts. ``regulariser``: ``vicreg`` (VICReg terms on the predictions and on the tiles'
        mean context embeddings) or ``target`` (on the predictions only, measured against the targets' own
        statistics: see ``target_relative_terms``). Diagnostics (no gradient): ``trivial``, the loss of predicting each
        target as the mean of its (tile, modality)'s *context* tokens' targets; ``jepa_gain`` = trivial - jepa
        (what the predictor knows beyond the tile's gist; the trivial baseline reads target-encoder outputs
        that saw the whole tile, the masked tokens included, so it is a strict bar); ``within_share``, the
        share of the targets' variance that is within tiles (a shared tile-wide component lowers it).
        ``target_centre`` subtracts from every target that same context mean (the trivial prediction is then
        0, and ``trivial`` the same number as without centring). ``tile_head`` > 0 (a model built with the head)
        adds that weight times the loss of predicting each tile's mean (uncentred) target, over all its tokens,
        from its context tokens' mean output (``tile``), with the regulariser's terms on those predictions
        when it is ``target``; ``tile_gain``: the loss of predicting every tile as the batch's mean minus it."""
        with torch.no_grad():
            raw = self.target_encoder(self.target_encoder.embed(b), Packing(b.doc, b.n_tiles, b.pad_to_max))
            raw = F.layer_norm(raw, (raw.shape[-1],)).float()
            group = b.doc * len(MODALITIES) + b.modality  # (tile, modality) of every token
            target = raw
            if target_centre:  # minus what the context shows of the tile: the trivial prediction becomes 0
                every = torch.arange(len(raw), device=raw.device)
                target = raw - _context_mean(raw, group, b.context, every, b.doc, b.n_tiles)
        x = self.encoder.embed(b)[b.context]
        context_out = self.encoder(x, Packing(b.doc[b.context], b.n_tiles, b.pad_to_max))
        pred = self.predictor(context_out, b).float()
        src = b.pred_src[b.pred_is_target]
        wanted = target[src]
        jepa = F.smooth_l1_loss(pred, wanted, beta=1.0)
        zero = jepa.new_zeros(())
        if regulariser == "target":
            var, cov = target_relative_terms(pred, wanted) if len(pred) >= 2 else (zero, zero)
            tile = None
        else:
            # VICReg where collapse would hurt: the predictions (as the reference) and the tiles' mean context
            # embeddings (what a tile embedding is made of).
            tile = torch.zeros(b.n_tiles, context_out.shape[1], device=pred.device, dtype=torch.float32)
            doc = b.doc[b.context]
            tile = tile.index_add_(0, doc, context_out.float()) / torch.bincount(
                doc, minlength=b.n_tiles).clamp_min(1)[:, None]
            # A spread needs two rows: a micro-batch of one tile has no tile term.
            terms = [vicreg_terms(z) for z in (pred, tile) if len(z) >= 2]
            var = torch.stack([t[0] for t in terms]).mean() if terms else zero
            cov = torch.stack([t[1] for t in terms]).mean() if terms else zero
        loss = jepa + vicreg_scale * (var_weight * var + cov_weight * cov)
        extra = {}
        if tile_head and self.tile_head is None:
            raise ValueError("tile_head > 0 needs a model built with its head: GeoJEPA(cfg, tile_head=True)")
        if tile_head:
            tile_target = _group_mean(raw, b.doc, b.n_tiles)
            tile_pred = self.tile_head(_group_mean(context_out.float(), b.doc[b.context], b.n_tiles)).float()
            tile_loss = F.smooth_l1_loss(tile_pred, tile_target, beta=1.0)
            tile_reg = zero
            if regulariser == "target" and b.n_tiles >= 2:
                tv, tc = target_relative_terms(tile_pred, tile_target)
                tile_reg = vicreg_scale * (var_weight * tv + cov_weight * tc)
            loss = loss + tile_head * (tile_loss + tile_reg)
            with torch.no_grad():
                mean_only = F.smooth_l1_loss(tile_target.mean(0).expand_as(tile_target), tile_target, beta=1.0)
            extra = {"tile": tile_loss.detach(), "tile_gain": mean_only - tile_loss.detach()}
        with torch.no_grad():  # on the uncentred targets (centred, the same value: the trivial prediction is 0)
            trivial = F.smooth_l1_loss(_context_mean(raw, group, b.context, src, b.doc, b.n_tiles), raw[src], beta=1.0)
        out = {"loss": loss, "jepa": jepa.detach(), "var": var.detach(), "cov": cov.detach(),
               "std": pred.detach().std(0, correction=0).mean(), "trivial": trivial,
               "jepa_gain": trivial - jepa.detach(), "within_share": within_share(raw, b.doc, b.n_tiles), **extra}
        if tile is not None:
            out["tile_std"] = tile.detach().std(0, correction=0).mean()
        return out

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


def encoder_from_checkpoint(
    path, untrained: bool = False, seed: int = 0, which: str = "target"
) -> tuple[Encoder, dict]:
    """An encoder of a training checkpoint (``which``: the EMA ``target`` or the ``context`` encoder) and its
    resolved train config; ``untrained``: the same architecture freshly initialised with ``seed`` (the
    baseline a trained model must beat)."""
    if which not in ("target", "context"):
        raise ValueError(f"which encoder: 'target' or 'context', not {which!r}")
    state = load_checkpoint(path)
    c, weights = state["config"], state["model"]
    dims = tuple(weights[f"encoder.proj.{i}.weight"].shape[1] if f"encoder.proj.{i}.weight" in weights else 0
                 for i in range(len(MODALITIES)))
    cfg = ModelConfig(dims=dims, width=c["width"], depth=c["depth"], heads=c["heads"], mlp=c["mlp"],
                      pos_fourier=c.get("pos_fourier", 0))
    torch.manual_seed(seed)
    encoder = Encoder(cfg)
    if not untrained:
        prefix = "target_encoder." if which == "target" else "encoder."
        encoder.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
    return encoder.eval(), c
