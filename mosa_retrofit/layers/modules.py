"""Standalone attention layers with the official MoSA repository's interface.

``PureMoSA``: a layer of MoSA heads only. ``MoSA``: MoSA heads beside dense or local (sliding-window)
heads, the sum of both parts, as in the paper's hybrids. Arguments follow the official README (pass them
by keyword: the official code's own positional order differs from its README).

Known bugs of the reference that are fixed here: ``rotate_fraction = 0`` works; no position or
frequency state is cached (moving the module between devices or dtypes is safe, positions stay exact in
bf16); local heads accept any sequence length, not only multiples of the window.

Shape legend: B batch, T tokens, h model width, n heads in a part, d head dim (h_prim).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.rope import apply_rope, rope_cos_sin, rotated_dims
from ..kinds import ROUTER_SCORES
from ..ops.sparse import mosa_attention

HYBRID_TYPES = ("dense", "local")


# ---------------------------------------------------------------------------------------------- checks


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_common(h, h_prim, sparsity, rotate_fraction, rope_base, router_score) -> None:
    _check_int("h", h, 1)
    _check_int("h_prim", h_prim, 1)
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not sparsity >= 1:
        raise ValueError(f"sparsity must be a number >= 1 (each head keeps T // sparsity tokens), got {sparsity!r}")
    if isinstance(rotate_fraction, bool) or not isinstance(rotate_fraction, Real) or not 0 <= rotate_fraction <= 1:
        raise ValueError(f"rotate_fraction must be in [0, 1], got {rotate_fraction!r}")
    if isinstance(rope_base, bool) or not isinstance(rope_base, Real) or not rope_base > 0:
        raise ValueError(f"rope_base must be a number > 0, got {rope_base!r}")
    if router_score not in ROUTER_SCORES:
        raise ValueError(f"router_score must be one of {ROUTER_SCORES}, got {router_score!r}")


def _check_input(x: Tensor, h: int, attention_mask: Tensor | None, position_ids: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != h or x.shape[1] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (B, T >= 1, h={h}), got {shape}")
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} must have shape (B, T) = {tuple(x.shape[:2])}, got {tuple(t.shape)}")


def _positions(attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor | None:
    """(B, T) positions, or None for 0..T-1. Left padding: real tokens count from 0, as in transformers."""
    if position_ids is not None:
        return position_ids
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return None


# ------------------------------------------------------------------------------------------- MoSA heads


class PureMoSA(nn.Module):
    """A layer of MoSA heads: each head routes its own top-(T/sparsity) tokens (expert choice).

    Args:
        h: model width.
        h_prim: per-head width d.
        num_mosa_heads: number of MoSA heads E.
        max_seq_len: accepted for interface compatibility (only local hybrids use it).
        sparsity: ρ >= 1; each head attends K = min(max(T // ρ, 2), T) tokens.
        include_first: always select the first token (the paper's IsoFLOP setting).
        rotate_fraction: fraction of each head's dims that RoPE rotates (split-halves layout).
        rope_base: RoPE base.
        router_score: ``'sigmoid'`` (paper: outputs scaled by σ(score)) or ``'straight_through'``
            (forward multiplier exactly 1, gradient of σ/σ.detach(); lets converted models start
            function-preserving).

    Parameters (E heads): ``router (E, h)``, ``w_qkv (E, h, 3d)`` with columns ``[q | k | v]`` applied as
    ``x @ W``, ``w_o (E, d, h)``: the official layout of ``r.0.weight``, ``QKV.W``, ``O.W``.
    """

    def __init__(
        self,
        h: int,
        h_prim: int,
        num_mosa_heads: int,
        max_seq_len: int | None = None,
        sparsity: float = 8,
        include_first: bool = False,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000,
        router_score: str = "sigmoid",
    ):
        super().__init__()
        _check_common(h, h_prim, sparsity, rotate_fraction, rope_base, router_score)
        _check_int("num_mosa_heads", num_mosa_heads, 1)
        self.h, self.h_prim, self.num_heads = h, h_prim, num_mosa_heads
        self.max_seq_len, self.sparsity, self.include_first = max_seq_len, sparsity, bool(include_first)
        self.rotate_fraction, self.rope_base, self.router_score = rotate_fraction, rope_base, router_score
        self.n_rotate = rotated_dims(h_prim, rotate_fraction)
        self.router = nn.Parameter(torch.empty(num_mosa_heads, h))
        self.w_qkv = nn.Parameter(torch.empty(num_mosa_heads, h, 3 * h_prim))
        self.w_o = nn.Parameter(torch.empty(num_mosa_heads, h_prim, h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Fan-in bounds, as nn.Linear (the reference bounds by fan-out and shrinks w_o with E).
        nn.init.uniform_(self.router, -1 / math.sqrt(self.h), 1 / math.sqrt(self.h))
        nn.init.uniform_(self.w_qkv, -1 / math.sqrt(self.h), 1 / math.sqrt(self.h))
        bound = 1 / math.sqrt(self.num_heads * self.h_prim)
        nn.init.uniform_(self.w_o, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"h={self.h}, h_prim={self.h_prim}, num_mosa_heads={self.num_heads}, sparsity={self.sparsity}, "
            f"include_first={self.include_first}, n_rotate={self.n_rotate}, router_score={self.router_score!r}"
        )

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """x (B, T, h) -> (B, T, h). ``attention_mask`` (B, T): 1 for real tokens, 0 for padding."""
        _check_input(x, self.h, attention_mask, position_ids)
        positions = _positions(attention_mask, position_ids)
        rope = None
        if self.n_rotate > 0:

            def rope(idx: Tensor) -> tuple[Tensor, Tensor]:  # (E, B, K) -> 2 x (E, B, K, R)
                pos = idx if positions is None else positions.expand(idx.shape[0], -1, -1).gather(-1, idx)
                return rope_cos_sin(pos, self.n_rotate, self.rope_base, x.dtype)

        return mosa_attention(
            x, self.router, self.w_qkv, self.w_o,
            sparsity=self.sparsity, include_first=self.include_first, router_score=self.router_score,
            rope=rope, attention_mask=attention_mask,
        )


# ------------------------------------------------------------------------------- dense and local heads


class _Heads(nn.Module):
    """Shared projections of the dense/local parts: ``qkv`` (head-major, ``[q|k|v]`` per head) and ``out``."""

    def __init__(self, h: int, h_prim: int, num_heads: int):
        super().__init__()
        _check_int("num_other_heads", num_heads, 1)
        self.h, self.h_prim, self.num_heads = h, h_prim, num_heads
        self.qkv = nn.Linear(h, 3 * h_prim * num_heads, bias=False)
        self.out = nn.Linear(h_prim * num_heads, h, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.num_heads, 3, self.h_prim).permute(3, 0, 2, 1, 4)  # (3, B, n, T, d)
        return qkv[0], qkv[1], qkv[2]

    def _finish(self, a: Tensor, attention_mask: Tensor | None) -> Tensor:
        B, _, T, _ = a.shape
        y = self.out(a.transpose(1, 2).reshape(B, T, self.num_heads * self.h_prim))  # (B, T, h)
        return y if attention_mask is None else y * attention_mask[..., None].to(y.dtype)  # pads get 0


class DenseHeadsModule(_Heads):
    """Causal full-attention heads with the same partial RoPE as the MoSA heads."""

    def __init__(self, h: int, h_prim: int, num_heads: int, rotate_fraction: float = 0.5, rope_base: float = 10000):
        super().__init__(h, h_prim, num_heads)
        self.n_rotate, self.rope_base = rotated_dims(h_prim, rotate_fraction), rope_base

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self._project(x)  # (B, n, T, d)
        if self.n_rotate > 0:
            pos = _positions(attention_mask, position_ids)
            pos = torch.arange(T, device=x.device).expand(B, T) if pos is None else pos
            cos, sin = rope_cos_sin(pos[:, None], self.n_rotate, self.rope_base, x.dtype)  # (B, 1, T, R)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attention_mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=x.device)  # pad queries keep one key: no NaN rows
            mask = (causal & attention_mask.bool()[:, None, None, :]) | eye  # (B, 1, T, T)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._finish(a, attention_mask)


class LocalHeadsModule(_Heads):
    """Causal sliding-window heads via ``local_attention.LocalAttention`` (its defaults, as in the reference:
    query i sees keys from the start of the previous window of size w to i; RoPE over all d dims, base
    10000). Any T works (autopad); attention runs in float32 so rotary positions stay exact in bf16."""

    def __init__(self, h: int, h_prim: int, num_heads: int, window: int):
        from local_attention import LocalAttention

        super().__init__(h, h_prim, num_heads)
        _check_int("window (max_seq_len // sparsity)", window, 1)
        self.window = window
        self.local_attention = LocalAttention(dim=h_prim, window_size=window, causal=True, autopad=True)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        rel_pos = self.local_attention.rel_pos
        if rel_pos is not None and rel_pos.inv_freq.dtype != torch.float32:  # undo a .to(bf16) of the buffer
            d = self.h_prim
            rel_pos.inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device).float() / d))
        q, k, v = self._project(x)  # (B, n, T, d)
        mask = None if attention_mask is None else attention_mask.bool()
        a = self.local_attention(q.float(), k.float(), v.float(), mask=mask).to(x.dtype)
        return self._finish(a, attention_mask)


# ---------------------------------------------------------------------------------------------- hybrid


class MoSA(nn.Module):
    """Hybrid layer: ``num_mosa_heads`` MoSA heads plus ``num_other_heads`` dense or local heads.

    Args (besides those of :class:`PureMoSA`):
        num_other_heads: number of dense/local heads (0 for none).
        max_seq_len: training length; local heads use the window ``max_seq_len // sparsity``.
        hybrid_type: ``'dense'`` (causal full attention, same RoPE settings as the MoSA heads) or
            ``'local'`` (sliding window via the local-attention package).

    Example:
        >>> layer = MoSA(h=128, h_prim=16, num_mosa_heads=4, num_other_heads=3, max_seq_len=512,
        ...              sparsity=16, hybrid_type="dense")
        >>> layer(torch.randn(2, 512, 128)).shape
        torch.Size([2, 512, 128])
    """

    def __init__(
        self,
        h: int,
        h_prim: int,
        num_mosa_heads: int,
        num_other_heads: int,
        max_seq_len: int | None = None,
        sparsity: float = 8,
        hybrid_type: str = "dense",
        include_first: bool = False,
        rotate_fraction: float = 0.5,
        rope_base: float = 10000,
        router_score: str = "sigmoid",
    ):
        super().__init__()
        _check_common(h, h_prim, sparsity, rotate_fraction, rope_base, router_score)
        _check_int("num_mosa_heads", num_mosa_heads, 0)
        _check_int("num_other_heads", num_other_heads, 0)
        if hybrid_type not in HYBRID_TYPES:
            raise ValueError(f"hybrid_type must be one of {HYBRID_TYPES}, got {hybrid_type!r}")
        if num_mosa_heads + num_other_heads == 0:
            raise ValueError("num_mosa_heads + num_other_heads must be >= 1, got 0 heads in total")
        if hybrid_type == "local" and num_other_heads > 0:
            _check_int("max_seq_len (required for hybrid_type='local')", max_seq_len, 1)
            if max_seq_len // sparsity < 1:
                raise ValueError(f"max_seq_len // sparsity must be >= 1 for local heads, got {max_seq_len} // {sparsity}")
        self.h, self.hybrid_type = h, hybrid_type
        self.mosa_heads = None
        if num_mosa_heads > 0:
            self.mosa_heads = PureMoSA(
                h=h, h_prim=h_prim, num_mosa_heads=num_mosa_heads, max_seq_len=max_seq_len, sparsity=sparsity,
                include_first=include_first, rotate_fraction=rotate_fraction, rope_base=rope_base,
                router_score=router_score,
            )
        self.other_heads = None
        if num_other_heads > 0 and hybrid_type == "dense":
            self.other_heads = DenseHeadsModule(h, h_prim, num_other_heads, rotate_fraction, rope_base)
        elif num_other_heads > 0:
            self.other_heads = LocalHeadsModule(h, h_prim, num_other_heads, window=int(max_seq_len // sparsity))

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """x (B, T, h) -> (B, T, h): MoSA heads + dense/local heads."""
        _check_input(x, self.h, attention_mask, position_ids)
        parts = [m(x, attention_mask, position_ids) for m in (self.mosa_heads, self.other_heads) if m is not None]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]
