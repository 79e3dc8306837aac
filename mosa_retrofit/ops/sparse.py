"""Mixture-of-Sparse-Attention heads: the math, top to bottom (arXiv 2505.00315, §2.2).

Each routed unit e (a MoSA head, or a KV group whose query heads share one selection) owns a router
row ``w_r``. It scores every token with ``sigmoid(x @ w_r)``, keeps its top-K tokens (expert choice),
projects Q/K/V for those tokens only, rotates them at their *original* positions, attends causally among
them, multiplies each output row by its router score (the router's only gradient path), projects it out
and scatter-adds it back. Tokens no unit selects get exactly zero (the paper), or, with a ``fill``, each
unit's fill vector (a selected token then gets fill + gate·(attention − fill)).

Shape legend
    B  batch                 T  tokens in the sequence          h  model width
    E  routed units          G  query heads per unit (1 = one selection per head)
    K  tokens per unit: min(max(T // sparsity, 2), T)           d  head dim
    R  rotated dims per head

Speed notes (they are why the code looks the way it does):
  * indices are sorted by position, so "key position <= query position" is exactly the causal triangle
    of the K x K block and a plain ``is_causal`` SDPA is exact (no K x K mask is built);
  * one ``index_select`` gathers all units' tokens straight into the (E, B*K, h) layout that a single
    batched matmul wants, and one fused (h -> (G+2)·d) projection per unit produces Q, K and V;
  * the output is written with one ``index_add`` (no zero-filled per-unit buffers).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import key_visible
from .rope import apply_rope
from .routing import first_real, router_gates, router_logits, select_tokens, select_tokens_causal

RopeFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # token idx (E, B, K) -> cos, sin (E, B, K, R)


class Past(NamedTuple):
    """What a cached forward continues (causal routing only): the tokens a layer has seen and its units'
    selected K/V. ``kv`` holds them and takes the new ones: ``kv.append(k, v, pos, live)`` with k, v
    (E, B, K, d) and cache positions (E, B, K) returns each unit's count of rows before and after (E, B), the
    rows living first in its ``k``/``v`` (E, B, capacity, d) and ``pos`` (E, B, capacity) buffers
    (convert/cache.RoutedStore). ``offset``: cache position of the first new token; ``seen_real`` (B,): real
    tokens each row had before them."""

    kv: object
    offset: int
    seen_real: Tensor


class _GatherSelected(torch.autograd.Function):
    """Rows ``x[flat]`` and the selected router logits ``logits[idx]``, with one fused backward.

    The router gets gradient only at selected tokens. Plain autograd would zero-fill a (B·T, h)
    gradient for the gather, run a full (B·T, h) router-matmul gradient and add the two; here the router
    term (a small (B·T, E) @ (E, h) product) is written first and the gathered rows' gradient is
    index-added into it in place: one (B·T, h) buffer instead of three.
    """

    @staticmethod
    def forward(ctx, x2d: Tensor, router: Tensor, logits: Tensor, idx: Tensor, flat: Tensor):
        xs = x2d.index_select(0, flat)  # (E·B·K, h)
        ctx.save_for_backward(xs, router, flat)
        ctx.n_rows = x2d.shape[0]
        return xs, logits.gather(-1, idx)  # (E·B·K, h), (E, B, K)

    @staticmethod
    def backward(ctx, g_xs: Tensor | None, g_r: Tensor | None):
        xs, router, flat = ctx.saved_tensors
        E, h = router.shape
        g_x = g_router = None
        if g_r is not None:
            g_r = g_r.reshape(E, -1)  # (E, B·K)
            if ctx.needs_input_grad[0]:
                g_tok = g_r.new_zeros(E, ctx.n_rows).scatter_add_(1, flat.view(E, -1), g_r)  # (E, B·T)
                g_x = torch.mm(g_tok.t(), router.to(g_tok.dtype)).to(xs.dtype)  # (B·T, h); autocast: mixed dtypes
            if ctx.needs_input_grad[1]:
                g_router = torch.bmm(g_r.unsqueeze(1), xs.view(E, -1, h).to(g_r.dtype)).squeeze(1).to(router.dtype)
        if g_xs is not None and ctx.needs_input_grad[0]:
            g_x = xs.new_zeros(ctx.n_rows, h) if g_x is None else g_x
            g_x.index_add_(0, flat, g_xs.to(g_x.dtype))
        return g_x, g_router, None, None, None


def _window_mask(idx: Tensor, window: int) -> Tensor:
    """(E·B, 1, K, K) bool: slot j is visible to slot i iff j <= i and I_i - I_j < window.

    (Slot order, not only positions: dead slots sit after every live slot, so live queries never see them.)
    """
    E, B, K = idx.shape
    gap = idx.view(E * B, 1, K, 1) - idx.view(E * B, 1, 1, K)  # I_i - I_j
    slots = torch.ones(K, K, dtype=torch.bool, device=idx.device).tril()
    return slots & key_visible(gap, window)


def softcap_logits(s: Tensor, cap: float) -> Tensor:
    """Gemma2's attention logit soft-capping: cap · tanh(s / cap)."""
    return cap * torch.tanh(s / cap)


def softcap_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, dropout_p: float, mask: Tensor | None
) -> Tensor:
    """Attention with soft-capped logits (the SDPA kernels have none, so it is spelled out); q (N, G, K, d),
    k, v (N, G or 1, L, d), mask broadcastable to (N, G, K, L) (None: causal K = L). A fully masked row gives
    NaN, for the caller to zero."""
    s = softcap_logits(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap)  # (N, G, K, L)
    if mask is None:
        n = s.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    p = s.float().masked_fill(~mask, -math.inf).softmax(-1).to(v.dtype)
    p = F.dropout(p, dropout_p) if dropout_p > 0 else p
    return torch.matmul(p, v)


def project_selected(xs: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, idx: Tensor, G: int, q_norm=None,
                     k_norm=None, rope: RopeFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V of the gathered tokens ``xs`` (E, B·K, h) at positions ``idx`` (E, B, K), normed and rotated.

    Returns q (E·B, G, K, d), k and v (E·B, 1, K, d).
    """
    E, B, K = idx.shape
    d = w_qkv.shape[-1] // (G + 2)
    if b_qkv is None:
        qkv = torch.bmm(xs, w_qkv)  # (E, B·K, (G+2)·d)
    else:
        qkv = torch.baddbmm(b_qkv.unsqueeze(1), xs, w_qkv)
    # split (not slicing) so that backward concatenates the gradients instead of zero-filling
    q, k, v = (
        t.view(E, B, K, -1, d).permute(0, 1, 3, 2, 4).reshape(E * B, -1, K, d)  # views, no copies
        for t in qkv.split([G * d, d, d], dim=-1)
    )
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if rope is not None:
        cos, sin = rope(idx)  # (E, B, K, R)
        cos, sin = cos.reshape(E * B, 1, K, -1), sin.reshape(E * B, 1, K, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


def gated_output(a: Tensor, gate: Tensor, w_o: Tensor, fill: Tensor | None = None) -> Tensor:
    """Scale attended rows a (E·B, G, K, d) by their gates (E, B, K) and project out: (E·B·K, h) rows.

    With ``fill`` (E, G·d) the rows are gate·(a − fill): what a selected token adds on top of the fill that
    every token gets (see :func:`fill_output`).
    """
    EB, G, K, d = a.shape
    E = w_o.shape[0]
    if fill is not None:
        B = EB // E
        f = fill.view(E, 1, G, 1, d).expand(E, B, G, 1, d).reshape(EB, G, 1, d)
        a = a - f.to(a.dtype)
    a = a * gate.reshape(EB, 1, K, 1).to(a.dtype)
    a = a.transpose(1, 2).reshape(E, -1, G * d)  # (E, B·K, G·d)
    return torch.bmm(a, w_o).view(-1, w_o.shape[-1])  # (E·B·K, h)


def fill_output(fill: Tensor, w_o: Tensor) -> Tensor:
    """(h,): Σ_e fill_e @ w_o_e, what the units write at every token (fill (E, G·d), w_o (E, G·d, h))."""
    return torch.einsum("ec,ech->h", fill.to(w_o.dtype), w_o)


def base_output(x: Tensor, w_o: Tensor, fill: Tensor | None, add_to: Tensor | None) -> Tensor | None:
    """``add_to`` plus the units' fill at every token (None when there is neither)."""
    if fill is None:
        return add_to
    f = fill_output(fill, w_o)  # (h,)
    return f.expand_as(x) if add_to is None else add_to + f


def route(x: Tensor, router: Tensor, sparsity: float, include_first: bool, valid: Tensor | None,
          threshold: Tensor | None, past: Past | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Router logits (E, B, T) of every token (no autograd: the gates carry the router's gradient) and each
    unit's selected tokens (E, B, K), sorted by position: expert-choice top-K, or with ``threshold`` causal
    routing (after the tokens of ``past``: a row's first real token may lie there); ``live`` (E, B, K) is False
    at dead slots (rows or units that select fewer), None if none is."""
    with torch.no_grad():
        logits = router_logits(router, x)  # (E, B, T)
    if threshold is None:
        if past is not None:
            raise ValueError("mosa_attention continues a cache (past) with causal routing only: give threshold")
        idx, live = select_tokens(logits, sparsity, include_first, valid)  # (E, B, K)
    else:
        first = None if past is None else first_real(valid, past.seen_real, x.shape[:2], x.device)  # (B, T)
        idx, live = select_tokens_causal(logits, threshold, include_first, valid, first)
    return logits, idx, live


def attend_selected(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None, dropout_p: float,
                    mask: Tensor | None) -> Tensor:
    """Causal attention among the selected tokens: q (E·B, G, K, d), k and v (E·B, 1, K, d). Sorted indices make
    the plain causal triangle exact; ``mask`` (a sliding window on original positions) replaces it when given."""
    if softcap is not None:
        return softcap_attention(q, k, v, scale, softcap, dropout_p, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          dropout_p=dropout_p, enable_gqa=q.shape[1] > k.shape[1])


def attend_units(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, live: Tensor | None, T: int, scale: float,
                 softcap: float | None, dropout_p: float, sliding_window: int | None, past: Past | None) -> Tensor:
    """Each unit's selected queries against its selected keys (E·B, G, K, d), tokens ``idx`` (E, B, K) of T:
    among themselves (sorted indices => plain causal triangle; only a sliding window shorter than the sequence
    needs an explicit mask on original positions), or, continuing a cache, also against the earlier ones."""
    if past is not None:
        return attend_past(q, k, v, idx + past.offset, live, past, scale, softcap, sliding_window)
    mask = _window_mask(idx, sliding_window) if sliding_window is not None and sliding_window < T else None
    return attend_selected(q, k, v, scale, softcap, dropout_p, mask)


def attend_past(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, live: Tensor | None, past: Past, scale: float,
                softcap: float | None, sliding_window: int | None) -> Tensor:
    """The new selected queries q (E·B, G, K, d) against every earlier selected token of their unit and the new
    ones up to themselves: k, v (E·B, 1, K, d) at cache positions ``pos`` (E, B, K) are appended to ``past.kv``
    first (no gradient: the cache is for inference). Rows with no visible key (dead slots) are zero."""
    E, B, K = pos.shape
    G, d = q.shape[1], q.shape[-1]
    store = past.kv
    before, after = store.append(k.detach().reshape(E, B, K, d), v.detach().reshape(E, B, K, d), pos, live)
    L = int(after.max())
    slot = torch.arange(L, device=q.device).view(1, 1, 1, L)
    j = torch.arange(K, device=q.device).view(1, 1, K, 1)
    old = slot < before[..., None, None]  # (E, B, 1, L) stored earlier
    new = (slot - before[..., None, None] <= j) & (slot < after[..., None, None])  # (E, B, K, L) up to itself
    allowed = old | new
    if sliding_window is not None:
        allowed = allowed & key_visible(pos[..., None] - store.pos[:, :, None, :L], sliding_window)
    kf, vf = store.k[:, :, :L].reshape(E * B, 1, L, d), store.v[:, :, :L].reshape(E * B, 1, L, d)
    mask = allowed.reshape(E * B, 1, K, L)
    if softcap is not None:
        a = softcap_attention(q, kf, vf, scale, softcap, 0.0, mask)  # (E·B, G, K, d)
    else:
        a = F.scaled_dot_product_attention(q, kf.expand(-1, G, -1, -1), vf.expand(-1, G, -1, -1), attn_mask=mask,
                                           scale=scale)  # (E·B, G, K, d)
    return a.nan_to_num(0.0)  # dead slots: fully masked rows (their gate is 0 too)


def mosa_attention(x: Tensor, router: Tensor, w_qkv: Tensor, w_o: Tensor, *, sparsity: float, heads_per_unit: int = 1,
                   b_qkv: Tensor | None = None, include_first: bool = False, router_score: str = "sigmoid",
                   rope: RopeFn | None = None, q_norm: Callable[[Tensor], Tensor] | None = None,
                   k_norm: Callable[[Tensor], Tensor] | None = None, scale: float | None = None,
                   softcap: float | None = None, sliding_window: int | None = None, dropout_p: float = 0.0,
                   attention_mask: Tensor | None = None, add_to: Tensor | None = None,
                   threshold: Tensor | None = None, fill: Tensor | None = None, past: Past | None = None) -> Tensor:
    """All MoSA units of one layer, batched (no loop over heads), in one forward or continuing a cache (``past``).

    Args:
        x: (B, T, h) input. router: (E, h) router rows. w_o: (E, G·d, h) output projection.
        w_qkv: (E, h, (G+2)·d) fused projection, columns ``[q_1 … q_G | k | v]`` (applied as x @ W).
        sparsity: ρ (>= 1); see :func:`tokens_per_head`. b_qkv: optional (E, (G+2)·d) projection bias.
        heads_per_unit: G query heads sharing one selection and one K/V (GQA groups); 1 = per head.
        include_first / router_score: see :func:`select_tokens` / :func:`router_gates`.
        rope: maps selected token indices (E, B, K) to cos, sin (E, B, K, R); None = no RoPE.
        q_norm, k_norm: optional per-head norms applied to (…, d) before RoPE (Qwen3, Gemma3). scale: attention
            scale, default 1/sqrt(d). softcap: tanh logit cap (Gemma2), default none.
        sliding_window: a query at position i sees only keys with i - j < window (sliding-window layers).
        attention_mask: (B, T), nonzero/True for real tokens; padding is never selected.
        add_to: optional (B, T, h) tensor that the result is added to (e.g. the dense heads' output).
        threshold: (E,) per-unit thresholds: causal routing (:func:`select_tokens_causal`) instead of
            expert-choice top-K; ``sparsity`` is then only the target rate the thresholds are set for.
        fill: (E, G·d) what each unit outputs (before ``w_o``) at tokens it does not select; a selected token
            gets fill + gate·(attention − fill). None: zero, as in the paper.
        past: continue a cache (with ``threshold``): what one forward over the earlier tokens and these T computes
            for these T, their selected K/V appended to ``past.kv`` (no dropout; no gradient into the cache).

    Returns:
        (B, T, h): the sum over units of their scattered outputs (+ ``add_to``).
    """
    (B, T, h), E, G = x.shape, router.shape[0], heads_per_unit
    d = w_o.shape[1] // G
    valid = None if attention_mask is None else attention_mask.bool()

    # 1. route: score every token (no autograd here), expert-choice top-K per unit, sorted by position
    logits, idx, live = route(x, router, sparsity, include_first, valid, threshold, past)  # (E, B, T), (E, B, K)
    K = idx.shape[-1]
    add_to = base_output(x, w_o, fill, add_to)
    if K == 0:
        return x.new_zeros(B, T, h) if add_to is None else add_to

    # 2. gather the selected tokens and project Q, K, V for them only (one batched matmul)
    flat = (idx + T * torch.arange(B, device=x.device).view(1, B, 1)).view(-1)  # (E·B·K,) rows of x
    xs, r = _GatherSelected.apply(x.reshape(B * T, h), router, logits, idx, flat)  # (E·B·K, h), (E, B, K)
    # 3. ... with q/k norms and RoPE at the tokens' original positions
    q, k, v = project_selected(xs.view(E, B * K, h), w_qkv, b_qkv, idx, G, q_norm, k_norm, rope)
    gate = router_gates(r, router_score)  # (E, B, K)
    if live is not None:
        gate = gate.masked_fill(~live, 0.0)

    # 4. causal attention among the selected tokens (continuing a cache: and the unit's earlier ones)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    a = attend_units(q, k, v, idx, live, T, scale, softcap, dropout_p, sliding_window, past)  # (E·B, G, K, d)

    # 5. scale each row by its router score, project out, scatter-add back to the sequence
    y = gated_output(a, gate, w_o, fill)  # (E·B·K, h)
    if add_to is None:  # in place into fresh zeros: no copy of a (B·T, h) buffer (y's dtype: autocast's)
        return y.new_zeros(B * T, h).index_add_(0, flat, y).view(B, T, h)
    return add_to.reshape(B * T, h).index_add(0, flat, y.to(add_to.dtype)).view(B, T, h)


