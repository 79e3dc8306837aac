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

The same op continues a cache (convert/window_store.py holds the tensors): ``window_chunk_attention`` runs it
over [the store's last w tokens | the new ones] with the store's far rows added to the far keys;
``window_step_attention`` is its one-query case, one attention call over [ring | far rows]. ``far_keys``
builds the far keys of a sequence for both, from the rows it keeps (sinks and routed tokens).

``'auto'`` takes flex on CUDA and flash on CPU (measured fastest there, docs/speed.md), math where neither
applies (attention dropout, no fused CPU kernel in this torch).

Shape legend: B batch, E units (K/V heads), G query heads per unit, H = E·G, T tokens, d head dim, w window,
M far keys per unit, c query block, N = ceil(T / c) blocks, L = c + w - 1 band keys per block.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import (
    FarKeys,
    band_allowed,
    band_view,
    blocked_queries,
    far_allowed,
    layout,
    padded_keys,
    partial_band_mask,
    partial_blocks,
    unblocked,
)
from .keys_cpu import flash_key_selection
from .keys_flex import flex_key_selection
from .masks import key_visible
from .routing import kept_first

__all__ = ["BACKENDS", "FarKeys", "far_keys", "key_selection_attention", "resolve_backend", "window_chunk_attention",
           "window_step_attention"]

BACKENDS = ("auto", "flash", "flex", "math")
BLOCK = 64  # queries per band block (flash and math); measured best on CPU at w = 256 (docs/speed.md)


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
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *(far[:2] if far is not None else ())))
    chosen = resolve_backend(backend, q, dropout_p, grad)
    if chosen == "flex":
        out = flex_key_selection(q, k, v, window, scale, far, key_valid, reach)
        if out is not None:
            return out
        chosen = "flash" if _flash_cpu_available(q, dropout_p) else "math"
    if chosen == "flash":
        return flash_key_selection(q, k, v, window, scale, far, key_valid, reach, BLOCK)
    return math_key_selection(q, k, v, window, scale, far, key_valid, reach, dropout_p, BLOCK)


def far_keys(k: Tensor, v: Tensor, keep: Tensor, gate: Tensor | None = None,
             stored: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> FarKeys | None:
    """The far keys of a sequence k, v (E, B, S, d): its kept rows (``keep`` (E, B, S): sinks and routed tokens)
    in position order, values times ``gate`` (E, B, S) (None: ungated), after ``stored`` far rows of earlier
    tokens (k, v (E, B, n, d), positions relative to the sequence's start and rows in use (E, B, n)). None when
    there are none."""
    E, B, S, d = k.shape
    idx, live = kept_first(keep)  # (E, B, M)
    at = idx[..., None].expand(*idx.shape, d)
    fk, fv = k.gather(2, at), v.gather(2, at)  # (E, B, M, d)
    if gate is not None:
        fv = fv * gate.gather(2, idx)[..., None].to(fv.dtype)
    if stored is not None:
        sk, sv, spos, sheld = stored
        fk, fv, idx, live = (torch.cat(p, 2) for p in ((sk, fk), (sv, fv), (spos, idx), (sheld, live)))
    if fk.shape[2] == 0:
        return None
    return FarKeys(*(t.transpose(0, 1) for t in (fk, fv, idx, live)))  # (B, E, n + M, ...)


def window_chunk_attention(q: Tensor, seq: tuple[Tensor, ...], stored: tuple[Tensor, ...], window: int,
                           scale: float, reach: int | None, backend: str) -> Tensor:
    """T new queries q (B, H, T, d) after earlier tokens: key selection over ``seq`` = (k, v (E, B, w + T, d),
    valid (B, w + T), keep, gate (E, B, w + T)), the last w = ``window`` cached tokens then the new ones, with
    the ``stored`` far rows (see far_keys) before its own kept rows. Returns (B, T, H·d)."""
    k, v, valid, keep, gate = seq
    (B, H, T, d), w = q.shape, window
    far = far_keys(k, v, keep, gate, stored)
    qs = torch.cat((q.new_zeros(B, H, w, d), q), 2)  # the cached positions ask nothing
    a = key_selection_attention(qs, k.transpose(0, 1), v.transpose(0, 1), w, scale, far, valid, reach, 0.0,
                                backend)  # (B, w + T, H, d)
    return a[:, w:].reshape(B, T, H * d)


def window_step_attention(q: Tensor, k: Tensor, v: Tensor, ring_valid: Tensor, far_pos: Tensor, far_held: Tensor,
                          pos: int, scale: float, reach: int | None) -> Tensor:
    """One new query per row, at cache position ``pos`` (its K/V already in the ring), q (B, H, 1, d), against
    k, v (E, B, w + n, d): the ring's w slots (slot = position % w; ``ring_valid`` (B, w) holding a real token)
    then n far rows (``far_pos``, ``far_held`` (E, B, n)); one attention call for all units. Returns
    (B, 1, H·d)."""
    E, B, L, d = k.shape
    H, w = q.shape[1], ring_valid.shape[-1]
    G, n = H // E, L - w
    slot = pos % w
    if not bool(ring_valid[:, slot].all()):  # a padded query still sees itself
        ring_valid = ring_valid.clone()
        ring_valid[:, slot] = True
    ok = ring_valid[None].expand(E, B, w)
    if n:
        ok = torch.cat((ok, key_visible(pos - far_pos, w, far_held, reach)), dim=-1)  # far rows: >= w before
    qe = q.view(B, E, G, 1, d).transpose(0, 1).reshape(E * B, G, 1, d)
    kv = lambda t: t.reshape(E * B, 1, L, d).expand(E * B, G, L, d)
    a = F.scaled_dot_product_attention(qe, kv(k), kv(v), attn_mask=ok.reshape(E * B, 1, 1, L),
                                       scale=scale)  # (E·B, G, 1, d)
    return a.view(E, B, G, d).transpose(0, 1).reshape(B, 1, E * G * d)


def resolve_backend(backend: str, q: Tensor, dropout_p: float = 0.0, grad: bool = False) -> str:
    """The backend ``backend`` means for this input: 'auto' picks flex on CUDA, flash on CPU, else math; flex
    has no backward on CPU, so training there takes flash."""
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
    if backend == "flex" and grad and q.device.type == "cpu":
        _warn_once("attn_backend='flex' has no backward on CPU (FlexAttention); training runs the 'flash' kernel, "
                   "which computes the same attention")
        return "flash" if _flash_cpu_available(q, dropout_p) else "math"
    return backend


def _flash_cpu_available(q: Tensor, dropout_p: float) -> bool:
    return (q.device.type == "cpu" and dropout_p == 0.0
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


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
