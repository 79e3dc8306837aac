"""Rotary position embeddings (split-halves / GPT-NeoX layout) on a leading fraction of each head's dims.

Angles are always computed in float32 from integer positions, whatever the model dtype: the reference
MoSA casts positions to bf16 with the module, which rounds every position above 256 (257 -> 256).
Nothing here is a buffer, so ``module.to(dtype_or_device)`` cannot corrupt or strand it.

Shape legend: ``...`` any leading dims, d head dim, R rotated dims (even, R <= d).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotated_dims(head_dim: int, rotate_fraction: float) -> int:
    """Number of leading dims that RoPE rotates: ``int(rotate_fraction * head_dim)`` rounded down to even."""
    n = int(rotate_fraction * head_dim)
    return n - n % 2


def rope_cos_sin(
    positions: Tensor, n_rotate: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos/sin tables at integer ``positions`` (any shape): each ``(..., R)``, in float32 (or float64 when
    ``dtype`` is float64; any lower precision is raised to float32).

    ``inv_freq_j = base ** (-2j / R)``; the exponent is relative to R (not d), as in the reference.
    """
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponent = torch.arange(0, n_rotate, 2, device=positions.device, dtype=dtype) / n_rotate
    inv_freq = 1.0 / (float(base) ** exponent)  # (R/2,)
    angles = positions.to(dtype)[..., None] * inv_freq  # (..., R/2)
    emb = torch.cat((angles, angles), dim=-1)  # (..., R)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``R = cos.shape[-1]`` dims of ``x (..., d)``; the remaining ``d - R`` pass through.

    ``cos``/``sin`` broadcast against ``x[..., :R]`` and are cast to ``x.dtype`` (as transformers does).
    """
    n_rotate = cos.shape[-1]
    if n_rotate == 0:
        return x
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if n_rotate == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :n_rotate], x[..., n_rotate:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)
