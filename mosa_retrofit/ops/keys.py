"""Key-selection attention: every query attends its recent window and a few far keys, in one softmax.

This is the attention of windowed MoSA heads (``mosa_keys``: sinks + window + routed tokens), of streaming heads
(sinks + window) and of sliding-window heads (window only). Query t of unit e sees

* band keys j with t - w < j <= t, where ``key_valid[b, j]`` (a padded query still sees itself: no empty row);
* far keys i of its unit (sinks, routed tokens) with ``t - pos[i] >= w`` (before its window) and, for layers
  with a window of their own, ``t - pos[i] < reach``; far values arrive already gated by the router.

One op, three backends behind ``key_selection_attention(..., backend=)``, exact against the same rule:

* ``'flash'`` (CPU): PyTorch's fused CPU flash kernel over query blocks of the exact band (c + w - 1 keys per
  block of c queries, the unit's query heads folded into the block's rows, so K/V are never copied per head),
  the far keys in a second call over query chunks, merged by log-sum-exp; its backward is the kernel's own
  backward on the merged output (keys_cpu.py). Masks are built only for blocks that are partial.
* ``'flex'``: FlexAttention (compiled) over [the unit's far keys | the sequence] with a BlockMask built from
  block indices (keys_flex.py): the kernel the field uses for structured sparsity, on CUDA and CPU.
* ``'math'``: plain PyTorch on the same blocks (any device, attention dropout): the fallback.

``'auto'`` takes flex on CUDA and flash on CPU (measured fastest there, docs/speed.md), math where neither
applies (attention dropout, no fused CPU kernel in this torch).

Shape legend: B batch, E units (K/V heads), G query heads per unit, H = E·G, T tokens, d head dim, w window,
M far keys per unit, c query block, N = ceil(T / c) blocks, L = c + w - 1 band keys per block.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "flash", "flex", "math")
BLOCK = 64  # queries per band block (flash and math); measured best on CPU at w = 256 (docs/speed.md)


class FarKeys(NamedTuple):
    """Keys outside the band, per unit: k, v (B, E, M, d) (values already gated), pos (B, E, M) positions in
    ascending order among the valid ones, valid (B, E, M) bool or None (invalid slots anywhere)."""

    k: Tensor
    v: Tensor
    pos: Tensor
    valid: Tensor | None = None


def key_selection_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, far: FarKeys | None = None,
                            key_valid: Tensor | None = None, reach: int | None = None, dropout_p: float = 0.0,
                            backend: str = "auto") -> Tensor:
    """q (B, H, T, d), k / v (B, E, T, d) with H = E·G (query head h reads unit h // G); ``key_valid`` (B, T)
    bool or None; ``far`` the units' far keys. Returns (B, T, H, d)."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if far is not None and far.k.shape[2] == 0:
        far = None
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    chosen = resolve_backend(backend, q, dropout_p)
    if chosen == "flex":
        from .keys_flex import flex_key_selection

        out = flex_key_selection(q, k, v, window, scale, far, key_valid, reach)
        if out is not None:
            return out
        chosen = "flash" if _flash_cpu_available(q, dropout_p) else "math"
    if chosen == "flash":
        from .keys_cpu import flash_key_selection

        return flash_key_selection(q, k, v, window, scale, far, key_valid, reach, BLOCK)
    return math_key_selection(q, k, v, window, scale, far, key_valid, reach, dropout_p, BLOCK)


def resolve_backend(backend: str, q: Tensor, dropout_p: float = 0.0) -> str:
    """The backend ``backend`` means for this input: 'auto' picks flex on CUDA, flash on CPU, else math."""
    if backend == "auto":
        if q.is_cuda and dropout_p == 0.0:
            return "flex"
        return "flash" if _flash_cpu_available(q, dropout_p) else "math"
    if backend == "flash" and not _flash_cpu_available(q, dropout_p):
        _warn_once(f"attn_backend='flash' needs a CPU tensor, no attention dropout and torch's fused CPU flash "
                   f"kernel; using 'math' for this call ({q.device.type}, dropout {dropout_p})")
        return "math"
    if backend == "flex" and dropout_p > 0:
        _warn_once("attn_backend='flex' does not apply attention dropout; using 'math' while dropout is on")
        return "math"
    return backend


def _flash_cpu_available(q: Tensor, dropout_p: float) -> bool:
    return (q.device.type == "cpu" and dropout_p == 0.0
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------- shared layout


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
    rel = i + lay.w - 1 - j
    return (rel >= 0) & (rel < lay.w)


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
    ok = dist >= lay.w
    if reach is not None:
        ok = ok & (dist < reach)
    if far.valid is not None:
        ok = ok & far.valid[:, :, None, :]
    return ok


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def unblocked(o: Tensor, lay: Layout) -> Tensor:
    """(B·E, N, c·G, d) -> (B, T, H, d)."""
    B, E, G, d = lay.B, lay.E, lay.G, lay.d
    return o.reshape(B, E, lay.Tp, G, d)[:, :, :lay.T].permute(0, 2, 1, 3, 4).reshape(B, lay.T, E * G, d)


# ------------------------------------------------------------------------------------------- math backend


def math_key_selection(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, far: FarKeys | None,
                       key_valid: Tensor | None, reach: int | None, dropout_p: float, block: int) -> Tensor:
    """Plain PyTorch on the blocked layout: [far keys | band] scores per block, one softmax, autograd backward."""
    lay = layout(q, k, window, block)
    B, E, G, N, c, L, d = lay.B, lay.E, lay.G, lay.N, lay.c, lay.L, lay.d
    qb = blocked_queries(q, lay).view(B, E, N, c * G, d)
    kb = band_view(padded_keys(k, lay), lay).view(B, E, N, L, d)
    vb = band_view(padded_keys(v, lay), lay).view(B, E, N, L, d)
    n0 = partial_blocks(lay, key_valid, q.device)
    band = band_allowed(lay, q.device)[None, None].expand(B, N, c, L).clone()  # (B, N, c, L)
    if n0:
        band[:, :n0] = partial_band_mask(lay, n0, key_valid, q.device)
    s = (qb @ kb.transpose(-1, -2)).view(B, E, N, c, G, L) * scale  # (B, E, N, c, G, L)
    s = s.masked_fill(~band[:, None, :, :, None], -math.inf)
    parts = [s]
    if far is not None:
        M = far.k.shape[2]
        sf = torch.einsum("benrd,bemd->benrm", qb, far.k).view(B, E, N, c, G, M) * scale
        ok = far_allowed(far, lay, reach).view(B, E, N, c, 1, M)
        parts.insert(0, sf.masked_fill(~ok, -math.inf))
    p = torch.cat(parts, dim=-1).float().softmax(-1).to(q.dtype)  # (B, E, N, c, G, [M +] L)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    p = p.view(B, E, N, c * G, -1)
    o = p[..., -L:] @ vb  # (B, E, N, c·G, d)
    if far is not None:
        o = o + torch.einsum("benrm,bemd->benrd", p[..., :-L], far.v)
    return unblocked(o.view(B * E, N, c * G, d), lay)
