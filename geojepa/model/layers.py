"""Small single-purpose layers: packed attention, transformer block, token embedding.

Sequences are packed: the tokens of many tiles in one (T, D) tensor with a
``doc`` id per token; attention never crosses documents. On CUDA (or when
``flex`` is asked for), attention runs on the packed tensor with FlexAttention
and a document block mask, compiled once with dynamic shapes (eager
FlexAttention would materialise every score); elsewhere the documents are
padded to the batch's longest (the batches are bucketed by length, so little
is wasted) and SDPA runs with a key-padding mask. ``pad_to_max`` forces the
padded path (the benchmark's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Packing:
    """Document layout of a packed sequence (tokens of a document are contiguous)."""

    doc: torch.Tensor  # (T,) document index, non-decreasing
    n_docs: int
    pad_to_max: bool = False
    flex: bool | None = None  # FlexAttention; None: on CUDA

    def __post_init__(self):
        counts = torch.bincount(self.doc, minlength=self.n_docs)
        self.lengths = counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.max_len = int(counts.max()) if len(counts) else 0
        self.offset = torch.arange(len(self.doc), device=self.doc.device) - self.starts[self.doc]
        self._block_mask = None

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.n_docs, self.max_len, *x.shape[1:])
        out[self.doc, self.offset] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.doc, self.offset]

    def key_mask(self) -> torch.Tensor:
        """(docs, 1, 1, max_len) True where a key is a real token."""
        ar = torch.arange(self.max_len, device=self.doc.device)
        return (ar[None, :] < self.lengths[:, None])[:, None, None, :]

    def flex_block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc

            def same_doc(b, h, q, kv):
                return doc[q] == doc[kv]

            # Compiled on CUDA, the mask is built block by block instead of as a (T, T) tensor.
            self._block_mask = create_block_mask(same_doc, None, None, len(doc), len(doc), device=doc.device,
                                                 _compile=doc.is_cuda)
        return self._block_mask


def use_flex(x: torch.Tensor, packing: Packing) -> bool:
    if packing.pad_to_max:
        return False
    return packing.flex if packing.flex is not None else x.is_cuda


_flex_attention = None


def flex_attention(q, k, v, block_mask):
    """FlexAttention, compiled on first use (dynamic shapes: one compilation for every packed length)."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as eager

        _flex_attention = torch.compile(eager, dynamic=True)
    return _flex_attention(q, k, v, block_mask=block_mask)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        t, d = x.shape
        h = self.heads
        if use_flex(x, packing):
            q, k, v = self.qkv(x).view(t, 3, h, d // h).permute(1, 2, 0, 3).unsqueeze(1)
            y = flex_attention(q, k, v, block_mask=packing.flex_block_mask())[0].transpose(0, 1).reshape(t, d)
            return self.proj(y)
        qkv = packing.pad(self.qkv(x))  # (docs, L, 3D)
        b, length, _ = qkv.shape
        q, k, v = qkv.view(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask())
        return self.proj(packing.unpad(y.transpose(1, 2).reshape(b, length, d)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), packing)
        return x + self.mlp(self.norm2(x))


class PositionMLP(nn.Module):
    """The 8 numbers of a token's position (rotated-bbox corners, tile coordinates in about [0, 1]) -> the model
    width. ``fourier`` > 0 adds their sines and cosines at pi x 2^i (i < fourier; the finest a wavelength of
    2 / 2^(fourier-1) of the tile): a small MLP on raw coordinates resolves fine positions poorly (the
    spectral bias of Tancik et al., 2020)."""

    def __init__(self, dim: int, hidden: int = 128, fourier: int = 0):
        super().__init__()
        if fourier:
            self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(fourier, dtype=torch.float32),
                                 persistent=False)
        else:
            self.freqs = None
        # Normalised output: position is one part of a token's input, on the same scale as its content.
        self.net = nn.Sequential(nn.Linear(8 * (1 + 2 * fourier), hidden), nn.GELU(), nn.Linear(hidden, dim),
                                 nn.LayerNorm(dim))

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if self.freqs is not None:
            angles = (pos[..., None] * self.freqs.to(pos.dtype)).flatten(-2)  # (..., 8 x fourier)
            pos = torch.cat([pos, torch.sin(angles), torch.cos(angles)], dim=-1)
        return self.net(pos)
