"""Causal sliding-window attention in O(T·w): queries in blocks of w attend their block and the one before.

Shape legend: B batch, n heads, T tokens, d head dim, w window, c = w block length, N = ceil(T / c) blocks,
M extra keys.
Query t sees keys t-w+1 .. t (never padding; always itself, so no row is empty), and optionally *extra* keys
at given positions before its window: the attention sinks of streaming heads (the first tokens), or the routed
tokens of key-selection MoSA heads. One softmax covers the band and the extra keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                             key_valid: Tensor | None = None, dropout_p: float = 0.0, extra: Extra | None = None,
                             reach: int | None = None) -> Tensor:
    """q, k, v (B, n, T, d) (K/V already expanded to the n query heads); key_valid (B, T) bool or None;
    ``extra``: keys query t also sees when they lie before its window (position <= t - w), and within ``reach``
    (t - position < reach) if given. Returns (B, n, T, d)."""
    B, n, T, d = q.shape
    c = max(1, min(window, T))
    N = -(-T // c)
    pad = N * c - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb = q.reshape(B, n, N, c, d)

    def with_previous(t: Tensor) -> Tensor:  # (B, n, N, 2c, d): block b-1 then block b
        tb = t.reshape(B, n, N, c, d)
        return torch.cat((torch.cat((torch.zeros_like(tb[:, :, :1]), tb[:, :, :-1]), dim=2), tb), dim=3)

    kk, vv = with_previous(k), with_previous(v)
    dev = q.device
    i = torch.arange(N, device=dev)[:, None] * c + torch.arange(c, device=dev)  # (N, c) query positions
    j = torch.arange(N, device=dev)[:, None] * c - c + torch.arange(2 * c, device=dev)  # (N, 2c) key positions
    rel = i[:, :, None] - j[:, None, :]  # (N, c, 2c)
    allowed = (rel >= 0) & (rel < window) & (j[:, None, :] >= 0)  # (N, c, 2c)
    if key_valid is not None:
        keys = F.pad(key_valid.bool(), (c, pad), value=False)  # (B, c + N·c): position p at index p + c
        ok = keys[:, j + c]  # (B, N, 2c)
        allowed = (allowed[None] & ok[:, :, None, :]) | (rel == 0)[None]  # (B, N, c, 2c)
        allowed = allowed[:, None].expand(B, n, N, c, 2 * c)
    else:
        allowed = allowed.expand(B, n, N, c, 2 * c)
    if extra is not None:
        M = extra.k.shape[2]
        far = i.view(1, 1, N, c, 1) - extra.pos.view(B, n, 1, 1, M)  # (B, n, N, c, M) distance to each extra key
        ok = far >= window
        if reach is not None:
            ok = ok & (far < reach)
        if extra.valid is not None:
            ok = ok & extra.valid.view(B, n, 1, 1, M)
        allowed = torch.cat((allowed, ok), dim=-1)  # (B, n, N, c, 2c + M)
        kk = torch.cat((kk, extra.k[:, :, None].expand(B, n, N, M, d)), dim=3)  # (B, n, N, 2c + M, d)
        vv = torch.cat((vv, extra.v[:, :, None].expand(B, n, N, M, d)), dim=3)
    S = kk.shape[3]
    out = F.scaled_dot_product_attention(qb.reshape(B, n * N, c, d), kk.reshape(B, n * N, S, d),
                                         vv.reshape(B, n * N, S, d), attn_mask=allowed.reshape(B, n * N, c, S),
                                         dropout_p=dropout_p, scale=scale)
    return out.reshape(B, n, N * c, d)[:, :, :T]


class Extra(NamedTuple):
    """Keys outside the band: (B, n, M, d) keys and values, (B, n, M) positions, (B, n, M) bool or None."""

    k: Tensor
    v: Tensor
    pos: Tensor
    valid: Tensor | None = None


def banded_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, key_valid: Tensor | None = None,
                     dropout_p: float = 0.0, groups: int = 1) -> Tensor:
    """The same band as an explicit mask, for queries that follow a cached prefix: q (B, n, T, d), k, v
    (B, n / groups, S, d) with S - T cached tokens before the queries; key_valid (B, T) of the new tokens.
    Returns (B, n, T, d)."""
    T, S = q.shape[2], k.shape[2]
    off = S - T
    i = torch.arange(T, device=q.device)[:, None] + off
    j = torch.arange(S, device=q.device)[None, :]
    allowed = (j <= i) & (j > i - window)  # (T, S)
    if key_valid is not None:
        keys = torch.ones(key_valid.shape[0], S, dtype=torch.bool, device=q.device)
        keys[:, off:] = key_valid
        allowed = (allowed & keys[:, None, None, :]) | (j == i)  # keep the diagonal: no empty rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=groups > 1)
