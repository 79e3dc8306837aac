"""Sparse KV cache for MoSA heads inside transformers' ``DynamicCache``, and the cached attention step.

With causal routing (``MoSAConfig(routing="causal")``) a MoSA unit caches keys/values only for the tokens it
selected. On first use a converted layer turns its ``DynamicCache`` layer into ``MoSA<LayerClass>`` (the
class is swapped in, the dense heads keep using the stock storage, sliding-window layers stay sliding) and
adds a store per unit and row: keys/values (E, B, capacity, d), their positions, and counts (E, B). The
layer counts every token it has seen, so ``get_seq_length`` and the mask sizes stay right when a layer
has no dense heads. Beam search (``reorder_cache``), ``batch_repeat_interleave`` and
``batch_select_indices`` keep the store in step; ``crop`` (assisted / speculative decoding) raises.

The cached step handles any number of new tokens (prefill and decoding alike): select among the new
tokens, project Q/K/V for the selected ones, append K/V to the store, attend each new selected query to
every earlier stored key and to the new keys up to itself.

Shape legend: B batch, T new tokens, E units, G query heads per unit, K selected new tokens (max over
units and rows), L stored tokens, d head dim, h model width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .sparse import (base_output, gated_output, project_selected, router_gates, select_tokens_causal,
                     softcap_attention)


class MoSACacheLayerMixin:
    """Mixed in front of a ``DynamicLayer`` (sub)class; holds the MoSA store of one attention layer."""

    __slots__ = ()  # the layer's own __dict__ holds the store

    def _mosa_init(self) -> None:
        self.mosa_k = self.mosa_v = self.mosa_pos = self.mosa_count = None
        self.mosa_seen = 0  # tokens this layer has processed (cache positions)
        self.mosa_seen_real = None  # (B,) real (non-padding) tokens seen per row
        self.mosa_window_store = None  # the rows of windowed heads (streaming / mosa_keys), window_store.py

    # -- what generate() and the masks ask
    def get_seq_length(self) -> int:
        return self.mosa_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if getattr(self, "is_sliding", False):
            self.cumulative_length = self.mosa_seen
            return super(type(self), self).get_mask_sizes(query_length)
        return self.mosa_seen + query_length, 0

    # -- generate()'s cache-wide operations
    def _mosa_map(self, fn) -> None:
        if self.mosa_k is not None:
            self.mosa_k, self.mosa_v = fn(self.mosa_k, 1), fn(self.mosa_v, 1)
            self.mosa_pos, self.mosa_count = fn(self.mosa_pos, 1), fn(self.mosa_count, 1)
        if self.mosa_seen_real is not None:
            self.mosa_seen_real = fn(self.mosa_seen_real, 0)
        if self.mosa_window_store is not None:
            self.mosa_window_store.map(fn)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.is_initialized and self.keys is not None and self.keys.numel():
            super(type(self), self).reorder_cache(beam_idx)
        self._mosa_map(lambda t, dim: t.index_select(dim, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self.keys is not None and self.keys.numel():
            super(type(self), self).batch_repeat_interleave(repeats)
        self._mosa_map(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized and self.keys is not None and self.keys.numel():
            super(type(self), self).batch_select_indices(indices)
        self._mosa_map(lambda t, dim: t.index_select(dim, indices.to(t.device)) if dim == 1 else t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a MoSA sparse KV cache cannot be cropped (assisted / speculative decoding and other cache rollbacks "
            "are not supported); generate without an assistant model")

    def reset(self) -> None:
        super(type(self), self).reset()
        self._mosa_init()

    # -- the store
    def mosa_append(self, k: Tensor, v: Tensor, pos: Tensor, live: Tensor | None) -> tuple[Tensor, Tensor]:
        """Append the new selected K/V (E, B, K, d) at positions (E, B, K); returns (count before, after)."""
        E, B, K, d = k.shape
        if self.mosa_k is None:
            self.mosa_k = k.new_zeros(E, B, max(K, 16), d)
            self.mosa_v = v.new_zeros(E, B, max(K, 16), d)
            self.mosa_pos = torch.zeros(E, B, max(K, 16), dtype=torch.long, device=k.device)
            self.mosa_count = torch.zeros(E, B, dtype=torch.long, device=k.device)
        before = self.mosa_count
        need = int(before.max()) + K
        cap = self.mosa_k.shape[2]
        if need > cap:  # grow by doubling: amortised O(1) per appended token
            new_cap = max(need, 2 * cap)
            grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], new_cap - cap, *t.shape[3:])], dim=2)
            self.mosa_k, self.mosa_v, self.mosa_pos = grow(self.mosa_k), grow(self.mosa_v), grow(self.mosa_pos)
        slot = before[..., None] + torch.arange(K, device=k.device)  # (E, B, K): live slots come first
        self.mosa_k.scatter_(2, slot[..., None].expand(E, B, K, d), k)
        self.mosa_v.scatter_(2, slot[..., None].expand(E, B, K, d), v)
        self.mosa_pos.scatter_(2, slot, pos)
        n_new = torch.full_like(before, K) if live is None else live.sum(-1)
        self.mosa_count = before + n_new
        return before, self.mosa_count


_LAYER_CLASSES: dict[type, type] = {}


def mosa_cache_layer(cache, layer_idx: int) -> MoSACacheLayerMixin:
    """The MoSA-aware cache layer of ``layer_idx`` in a ``DynamicCache`` (converted on first use)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise ValueError(f"MoSA layers need a transformers DynamicCache with a layer {layer_idx}; got "
                         f"{type(cache).__name__}")
    layer = layers[layer_idx]
    if isinstance(layer, MoSACacheLayerMixin):
        return layer
    base = type(layer)
    if not hasattr(layer, "batch_select_indices") or getattr(base, "is_compileable", False):
        raise ValueError(f"MoSA sparse caching needs a dynamic cache; got {base.__name__} "
                         "(use the default cache, not cache_implementation='static')")
    if base not in _LAYER_CLASSES:
        # the mixin's methods are copied into the class body (so they win over the base's) and the mixin is
        # listed after the base: the instance layout stays the base's, so __class__ can be swapped in place
        methods = {k: v for k, v in vars(MoSACacheLayerMixin).items() if callable(v)}
        _LAYER_CLASSES[base] = type(f"MoSA{base.__name__}", (base, MoSACacheLayerMixin), methods)
    seen = layer.get_seq_length()
    layer.__class__ = _LAYER_CLASSES[base]
    layer._mosa_init()
    layer.mosa_seen = seen
    return layer


class CacheBytes(NamedTuple):
    dense: int  # K/V of the dense (and sliding) heads in the stock storage
    mosa: int  # K/V rows the MoSA stores hold (selected tokens)
    allocated: int  # every tensor the cache holds: K/V storage with its unused capacity, positions, counts


def cache_bytes(cache) -> CacheBytes:
    """Bytes of a cache: dense K/V, MoSA K/V holding tokens, and all of its allocated storage."""
    dense = mosa = allocated = 0
    size = lambda t: t.numel() * t.element_size() if isinstance(t, Tensor) else 0
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            dense += size(layer.keys) + size(layer.values)
        if isinstance(layer, MoSACacheLayerMixin) and layer.mosa_k is not None:
            per_token = layer.mosa_k.shape[-1] * layer.mosa_k.element_size() * 2
            mosa += int(layer.mosa_count.sum()) * per_token
            allocated += sum(size(t) for t in (layer.mosa_k, layer.mosa_v, layer.mosa_pos, layer.mosa_count,
                                               layer.mosa_seen_real))
        if isinstance(layer, MoSACacheLayerMixin) and getattr(layer, "mosa_window_store", None) is not None:
            held, total = layer.mosa_window_store.nbytes()
            mosa += held
            allocated += total
    return CacheBytes(dense, mosa, dense + allocated)


@torch.no_grad()
def mosa_attention_cached(
    x: Tensor, router: Tensor, w_qkv: Tensor, w_o: Tensor, store: MoSACacheLayerMixin, *, threshold: Tensor,
    heads_per_unit: int = 1, b_qkv: Tensor | None = None, include_first: bool = False,
    router_score: str = "sigmoid", rope=None, q_norm=None, k_norm=None, scale: float | None = None,
    softcap: float | None = None, sliding_window: int | None = None, valid: Tensor | None = None,
    add_to: Tensor | None = None, fill: Tensor | None = None,
) -> Tensor:
    """Causal-routing MoSA over T new tokens with the earlier selected tokens' K/V read from ``store``.

    Same arguments as ``sparse.mosa_attention`` (``valid``: (B, T) real tokens of this chunk); computes
    exactly what a full forward computes for these tokens, and appends their selected K/V to the store.
    """
    B, T, h = x.shape
    E, G = router.shape[0], heads_per_unit
    d = w_o.shape[1] // G
    v_mask = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
    if store.mosa_seen_real is None:
        store.mosa_seen_real = torch.zeros(B, dtype=torch.long, device=x.device)
    # the row's first real token, if it is in this chunk
    first = v_mask & (v_mask.long().cumsum(-1) + store.mosa_seen_real[:, None] == 1)
    store.mosa_seen_real = store.mosa_seen_real + v_mask.long().sum(-1)
    offset = store.mosa_seen
    store.mosa_seen += T

    logits = torch.matmul(router, x.reshape(B * T, h).t()).view(E, B, T)  # (E, B, T)
    idx, live = select_tokens_causal(logits, threshold, include_first, v_mask, first)  # (E, B, K)
    K = idx.shape[-1]
    add_to = base_output(x, w_o, fill, add_to)
    out = x.new_zeros(B, T, h) if add_to is None else add_to.clone()
    if K == 0:
        return out

    flat = (idx + T * torch.arange(B, device=x.device).view(1, B, 1)).reshape(-1)  # (E·B·K,)
    xs = x.reshape(B * T, h).index_select(0, flat).view(E, B * K, h)
    qf, k, v = project_selected(xs, w_qkv, b_qkv, idx, G, q_norm, k_norm, rope)  # (E·B, G|1, K, d)
    pos = idx + offset  # (E, B, K) cache positions
    before, after = store.mosa_append(k.reshape(E, B, K, d), v.reshape(E, B, K, d), pos, live)
    L = int(after.max())
    keys, values = store.mosa_k[:, :, :L], store.mosa_v[:, :, :L]  # (E, B, L, d)
    slot = torch.arange(L, device=x.device)  # (L,)
    j = torch.arange(K, device=x.device)
    old = slot.view(1, 1, 1, L) < before[..., None, None]  # (E, B, 1, L) stored earlier
    new = (slot.view(1, 1, 1, L) - before[..., None, None] <= j.view(1, 1, K, 1)) & (
        slot.view(1, 1, 1, L) < after[..., None, None])  # (E, B, K, L) new keys up to the query itself
    allowed = old | new
    if sliding_window is not None:
        kpos = store.mosa_pos[:, :, :L]
        allowed = allowed & (pos[..., None] - kpos[:, :, None, :] < sliding_window)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf, vf = keys.reshape(E * B, 1, L, d), values.reshape(E * B, 1, L, d)
    mask = allowed.reshape(E * B, 1, K, L)
    if softcap is not None:
        a = softcap_attention(qf, kf, vf, scale, softcap, 0.0, mask)  # (E·B, G, K, d)
    else:
        a = F.scaled_dot_product_attention(qf, kf.expand(-1, G, -1, -1), vf.expand(-1, G, -1, -1),
                                           attn_mask=mask, scale=scale)  # (E·B, G, K, d)
    gate = router_gates(logits.gather(-1, idx), router_score)  # (E, B, K)
    if live is not None:
        gate = gate.masked_fill(~live, 0.0)
    y = gated_output(a.nan_to_num(0.0), gate, w_o, fill)  # dead slots: fully masked rows -> 0, then gate 0
    return out.view(B * T, h).index_add_(0, flat, y).view(B, T, h)
