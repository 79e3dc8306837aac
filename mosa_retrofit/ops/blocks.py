"""The blocked layout the CPU key-selection kernels share (keys_cpu.py, keys.math_key_selection): queries in
blocks of c, each unit's G query heads folded into a block's c·G rows, the band of block n read as an
overlapping view of the padded keys, and the masks of its partial blocks and far keys. See keys.py for the rule.

Shape legend: B batch, E units (K/V heads), G query heads per unit, H = E·G, T tokens, d head dim, w window,
M far keys per unit, c query block, N blocks, Tp = N·c, L = c + w - 1 band keys per block.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import key_visible


class FarKeys(NamedTuple):
    """Keys outside the band, per unit: k, v (B, E, M, d) (values already gated), pos (B, E, M) positions in
    ascending order among the valid ones, valid (B, E, M) bool or None (invalid slots anywhere)."""

    k: Tensor
    v: Tensor
    pos: Tensor
    valid: Tensor | None = None


class Layout(NamedTuple):
    """The block layout both CPU backends use (see the module docstring for the letters)."""

    B: int
    E: int
    G: int
    T: int
    d: int
    w: int
    c: int
    N: int
    L: int

    @property
    def Tp(self) -> int:
        return self.N * self.c


def layout(q: Tensor, k: Tensor, window: int, block: int, group: int = 1) -> Layout:
    """Blocks of ``block`` queries (fewer for short inputs), their count rounded up to a multiple of ``group``."""
    B, H, T, d = q.shape
    E = k.shape[1]
    c = max(1, min(block, T))
    N = -(-T // c)
    N = -(-N // group) * group
    return Layout(B, E, H // E, T, d, window, c, N, c + window - 1)


def blocked_queries(q: Tensor, lay: Layout) -> Tensor:
    """(B·E, N, c·G, d): each unit's queries by block, a block's rows position-major (t, g)."""
    B, E, G, T, d = lay.B, lay.E, lay.G, lay.T, lay.d
    qb = q.new_empty(B, E, lay.Tp, G, d)
    qb[:, :, :T] = q.reshape(B, E, G, T, d).transpose(2, 3)  # one copy of q
    qb[:, :, T:] = 0
    return qb.view(B * E, lay.N, lay.c * G, d)


def padded_keys(k: Tensor, lay: Layout) -> Tensor:
    """(B·E, w - 1 + Tp + c, d): w - 1 zero rows, the T keys, zeros; block n's band is rows n·c .. n·c + L."""
    B, E, T, d, w = lay.B, lay.E, lay.T, lay.d, lay.w
    kp = k.new_empty(B, E, w - 1 + lay.Tp + lay.c, d)
    kp[:, :, : w - 1] = 0
    kp[:, :, w - 1: w - 1 + T] = k
    kp[:, :, w - 1 + T:] = 0
    return kp.view(B * E, -1, d)


def band_view(kp: Tensor, lay: Layout) -> Tensor:
    """(B·E, N, L, d): overlapping views of the padded keys, block n's band (no copy)."""
    return kp.as_strided((kp.shape[0], lay.N, lay.L, lay.d), (kp.stride(0), lay.c * lay.d, lay.d, 1))


def fold_band(grad: Tensor, lay: Layout) -> Tensor:
    """Sum a (B·E, N, L, d) gradient of ``band_view`` back into the (B·E, T, d) keys it viewed."""
    BE, N, L, d = grad.shape
    c = lay.c
    out = grad.new_zeros(BE, lay.w - 1 + lay.Tp + c, d)
    for a in range(-(-L // c)):  # rows a·c .. of every block land at n·c + a·c + r
        rows = min(c, L - a * c)
        out[:, a * c: a * c + N * c].view(BE, N, c, d)[:, :, :rows] += grad[:, :, a * c: a * c + rows]
    return out[:, lay.w - 1: lay.w - 1 + lay.T]


def band_allowed(lay: Layout, device) -> Tensor:
    """(c, L) bool: the band of any block, before padding: 0 <= (query i) - (key position) < w."""
    i = torch.arange(lay.c, device=device)[:, None]
    j = torch.arange(lay.L, device=device)[None, :]
    return key_visible(i + lay.w - 1 - j, lay.w)


def partial_blocks(lay: Layout, key_valid: Tensor | None, device) -> int:
    """n0: blocks 0 .. n0 - 1 need per-row band masks (keys before position 0, or padding a real query of the
    block could see); blocks from n0 on take the one (c, L) band."""
    n0 = min(lay.N, -(-(lay.w - 1) // lay.c))  # bands that reach before position 0
    if key_valid is None:
        return n0
    B, T, c = key_valid.shape[0], lay.T, lay.c
    invalid = ~key_valid
    pos = torch.arange(T, device=device)
    big = torch.full_like(pos, T)
    # first invalid key at or after each position, and the last real query of each block
    nxt = torch.where(invalid, pos, big).flip(-1).cummin(-1).values.flip(-1)  # (B, T)
    nxt = torch.cat((nxt, big[:1].expand(B, 1)), dim=1)
    starts = (torch.arange(lay.N, device=device) * c - lay.w + 1).clamp(min=0)  # (N,)
    real_q = torch.where(key_valid, pos, -1)
    real_q = F.pad(real_q, (0, lay.Tp - T), value=-1).view(B, lay.N, c).amax(-1)  # (B, N)
    dirty = (nxt[:, starts] < real_q).any(0)  # (N,)
    if bool(dirty.any()):
        n0 = max(n0, int(dirty.nonzero().max()) + 1)
    return n0


def partial_band_mask(lay: Layout, n0: int, key_valid: Tensor | None, device) -> Tensor:
    """(B | 1, n0, c, L) bool for the first n0 blocks: band, key position >= 0, key valid, or the query itself."""
    band = band_allowed(lay, device)  # (c, L)
    n = torch.arange(n0, device=device)
    kpos = n[:, None] * lay.c - (lay.w - 1) + torch.arange(lay.L, device=device)  # (n0, L)
    qpos = n[:, None] * lay.c + torch.arange(lay.c, device=device)  # (n0, c)
    ok = (kpos >= 0)[None, :, None, :]  # (1, n0, 1, L)
    if key_valid is not None:
        kv = F.pad(key_valid, (0, lay.Tp + lay.L))  # positions beyond T: invalid (never real queries' keys)
        ok = ok & kv[:, kpos.clamp(min=0)][:, :, None, :]  # (B, n0, 1, L)
    self_ = qpos[:, :, None] == kpos[:, None, :]  # (n0, c, L)
    return (band[None, None] & ok) | self_[None]


def far_allowed(far: FarKeys, lay: Layout, reach: int | None) -> Tensor:
    """(B, E, Tp, M) bool: query t sees far key i iff valid, t - pos >= w and t - pos < reach."""
    t = torch.arange(lay.Tp, device=far.pos.device)[None, None, :, None]
    dist = t - far.pos[:, :, None, :]
    kept = far.valid[:, :, None, :] if far.valid is not None else True
    return key_visible(dist, lay.w, kept, reach) & (dist >= lay.w)  # the band sees the rest


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def unblocked(o: Tensor, lay: Layout) -> Tensor:
    """(B·E, N, c·G, d) -> (B, T, H, d)."""
    B, E, G, d = lay.B, lay.E, lay.G, lay.d
    return o.reshape(B, E, lay.Tp, G, d)[:, :, :lay.T].permute(0, 2, 1, 3, 4).reshape(B, lay.T, E * G, d)
