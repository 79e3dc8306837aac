"""Sparse KV cache for MoSA heads, kept in project-owned stores beside transformers' ``DynamicCache``.

With causal routing (``MoSAConfig(routing="causal")``) a MoSA unit caches keys/values only for the tokens it
selected; windowed units (``streaming`` / ``mosa_keys``) keep sinks, routed tokens and their recent window.
That state lives in a ``LayerStore`` per attention layer, which the project owns: ``RoutedStore`` (K/V of
routed tokens, their positions and counts) and ``window_store.WindowStore``, plus how many tokens (and real,
non-padding tokens per row) the layer has seen. The seam with transformers is one cache layer per converted
attention layer: on first use ``layer_store(cache, i)`` puts a ``MoSA<LayerClass>`` (the stock layer class
with ``MoSACacheLayerMixin`` in front, same state) in ``cache.layers[i]``; it holds the store as
``.mosa`` and answers what transformers asks a layer: sequence length and mask sizes (counting every token,
so they stay right when the layer has no dense heads), beam-search ``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices`` (applied to the store too) and ``reset``; ``crop``
(assisted / speculative decoding) raises. The dense heads keep using the stock storage.

The stores hold and update tensors; the heads' attention reads them (ops/sparse.mosa_attention with a
``past``, ops/keys for the windowed kinds), for any number of new tokens, prefill and decoding alike.

Shape legend: B batch, T new tokens, E units, G query heads per unit, K selected new tokens (max over
units and rows), L stored tokens, d head dim, h model width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .window_store import WindowStore


def _nbytes(t: Tensor | None) -> int:
    return t.numel() * t.element_size() if isinstance(t, Tensor) else 0


class RoutedStore:
    """K/V of the tokens each routed unit selected: k, v (E, B, capacity, d), pos (E, B, capacity) cache
    positions, count (E, B) live slots (they come first). Grows by doubling."""

    def __init__(self):
        self.k = self.v = self.pos = self.count = None

    def append(self, k: Tensor, v: Tensor, pos: Tensor, live: Tensor | None) -> tuple[Tensor, Tensor]:
        """Append the new selected K/V (E, B, K, d) at positions (E, B, K); returns (count before, after)."""
        E, B, K, d = k.shape
        if self.k is None:
            self.k, self.v = k.new_zeros(E, B, max(K, 16), d), v.new_zeros(E, B, max(K, 16), d)
            self.pos = torch.zeros(E, B, max(K, 16), dtype=torch.long, device=k.device)
            self.count = torch.zeros(E, B, dtype=torch.long, device=k.device)
        before = self.count
        need = int(before.max()) + K
        cap = self.k.shape[2]
        if need > cap:  # grow by doubling: amortised O(1) per appended token
            new_cap = max(need, 2 * cap)
            grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], new_cap - cap, *t.shape[3:])], dim=2)
            self.k, self.v, self.pos = grow(self.k), grow(self.v), grow(self.pos)
        slot = before[..., None] + torch.arange(K, device=k.device)  # (E, B, K): live slots come first
        self.k.scatter_(2, slot[..., None].expand(E, B, K, d), k)
        self.v.scatter_(2, slot[..., None].expand(E, B, K, d), v)
        self.pos.scatter_(2, slot, pos)
        self.count = before + (torch.full_like(before, K) if live is None else live.sum(-1))
        return before, self.count

    def map(self, fn) -> None:
        """Apply ``fn(tensor, batch_dim)`` to every stored tensor (beam search reorders, batch expansion)."""
        if self.k is not None:
            self.k, self.v, self.pos, self.count = (fn(t, 1) for t in (self.k, self.v, self.pos, self.count))

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the K/V rows held, bytes allocated by every tensor of the store)."""
        if self.k is None:
            return 0, 0
        held = int(self.count.sum()) * self.k.shape[-1] * self.k.element_size() * 2
        return held, sum(_nbytes(t) for t in (self.k, self.v, self.pos, self.count))


class LayerStore:
    """Everything one converted attention layer keeps between forwards besides the dense heads' K/V."""

    def __init__(self, seen: int = 0):
        self.seen = seen  # tokens this layer has processed (cache positions)
        self.seen_real: Tensor | None = None  # (B,) real (non-padding) tokens seen per row
        self.routed: RoutedStore | None = None  # paper-form MoSA heads (cache.mosa_attention_cached)
        self.window: WindowStore | None = None  # windowed heads (streaming / mosa_keys)

    def advance(self, valid: Tensor) -> tuple[int, Tensor]:
        """Count T new tokens (``valid``: (B, T) real ones); returns (cache position of the first new token,
        (B,) real tokens seen before them)."""
        B, T = valid.shape
        before = self.seen_real if self.seen_real is not None else torch.zeros(B, dtype=torch.long,
                                                                                device=valid.device)
        offset = self.seen
        self.seen += T
        self.seen_real = before + valid.long().sum(-1)
        return offset, before

    def routed_store(self) -> RoutedStore:
        if self.routed is None:
            self.routed = RoutedStore()
        return self.routed

    def window_store(self, window: int, reach: int | None) -> WindowStore:
        if self.window is None:
            self.window = WindowStore(window, reach)
        return self.window

    def map(self, fn) -> None:
        if self.seen_real is not None:
            self.seen_real = fn(self.seen_real, 0)
        for store in (self.routed, self.window):
            if store is not None:
                store.map(fn)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of K/V rows held, bytes allocated by every tensor)."""
        parts = [s.nbytes() for s in (self.routed, self.window) if s is not None]
        return sum(h for h, _ in parts), sum(a for _, a in parts) + _nbytes(self.seen_real)


class MoSACacheLayerMixin:
    """In front of a stock cache layer class: the layer of a converted attention layer, holding its
    ``LayerStore`` as ``self.mosa``."""

    mosa: LayerStore

    # -- what generate() and the masks ask
    def get_seq_length(self) -> int:
        return self.mosa.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if getattr(self, "is_sliding", False):
            self.cumulative_length = self.mosa.seen
            return super().get_mask_sizes(query_length)
        return self.mosa.seen + query_length, 0

    # -- generate()'s cache-wide operations: the stock storage (if the dense heads wrote it) and the store
    def _has_dense(self) -> bool:
        return self.is_initialized and self.keys is not None and self.keys.numel() > 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self._has_dense():
            super().reorder_cache(beam_idx)
        self.mosa.map(lambda t, dim: t.index_select(dim, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._has_dense():
            super().batch_repeat_interleave(repeats)
        self.mosa.map(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._has_dense():
            super().batch_select_indices(indices)
        self.mosa.map(lambda t, dim: t.index_select(dim, indices.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a MoSA sparse KV cache cannot be cropped (assisted / speculative decoding and other cache rollbacks "
            "are not supported); generate without an assistant model")

    def reset(self) -> None:
        super().reset()
        self.mosa = LayerStore()


_LAYER_CLASSES: dict[type, type] = {}


def layer_store(cache, layer_idx: int) -> LayerStore:
    """The ``LayerStore`` of ``layer_idx`` in a transformers ``DynamicCache`` (its cache layer is replaced on
    first use by the MoSA-aware subclass of the same layer class, carrying the same state)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise ValueError(f"MoSA layers need a transformers DynamicCache with a layer {layer_idx}; got "
                         f"{type(cache).__name__}")
    layer = layers[layer_idx]
    if isinstance(layer, MoSACacheLayerMixin):
        return layer.mosa
    base = type(layer)
    if not hasattr(layer, "batch_select_indices") or getattr(base, "is_compileable", False):
        raise ValueError(f"MoSA sparse caching needs a dynamic cache; got {base.__name__} "
                         "(use the default cache, not cache_implementation='static')")
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"MoSA{base.__name__}", (MoSACacheLayerMixin, base), {})
    mosa_layer = object.__new__(_LAYER_CLASSES[base])
    mosa_layer.__dict__.update(layer.__dict__)  # the stock layer's state (keys, values, window, ...) as it was
    mosa_layer.mosa = LayerStore(seen=layer.get_seq_length())
    layers[layer_idx] = mosa_layer
    return mosa_layer.mosa


def layer_stores(cache) -> dict[int, LayerStore]:
    """``{layer index: LayerStore}`` of the converted layers a cache has served."""
    return {i: layer.mosa for i, layer in enumerate(getattr(cache, "layers", []))
            if isinstance(layer, MoSACacheLayerMixin)}


class CacheBytes(NamedTuple):
    dense: int  # K/V of the dense (and sliding) heads in the stock storage
    mosa: int  # K/V rows the MoSA stores hold (selected tokens, windows)
    allocated: int  # every tensor the cache holds: K/V storage with its unused capacity, positions, counts


def cache_bytes(cache) -> CacheBytes:
    """Bytes of a cache: dense K/V, MoSA K/V holding tokens, and all of its allocated storage."""
    dense = mosa = allocated = 0
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            dense += _nbytes(layer.keys) + _nbytes(layer.values)
        if isinstance(layer, MoSACacheLayerMixin):
            held, total = layer.mosa.nbytes()
            mosa += held
            allocated += total
    return CacheBytes(dense, mosa, dense + allocated)
