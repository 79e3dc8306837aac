"""Causal sliding-window attention for queries that follow a cached prefix, as one explicit band mask (kept
'local' heads decoding through the model's cache). Full forwards of windowed heads run the key-selection
kernels of keys.py.

Shape legend: B batch, n query heads, T new tokens, S = cached + new keys, d head dim, w window.
Query t sees keys t-w+1 .. t (never padding; always itself, so no row is empty).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
