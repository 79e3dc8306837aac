"""Attention FLOPs, KV-cache entries and KV-cache bytes of a (converted or original) model, per layer and in total.

FLOPs per head at T tokens (causal half of the score/value products, projections included):
dense 8·D·d·T + 2·d·T², MoSA 8·D·d·k + 2·d·k² + 2·D·T (router), local 8·D·d·T + 4·d·P(T, w) where
P = T·w - w(w-1)/2 is the number of query-key pairs of a causal window of w (T²/2 for w = T), streaming local
+ 4·d·s·T (s sinks), key-selection MoSA streaming + 4·d·T·k/2 (on average half of the k routed tokens precede a
query) + 2·D·T, pruned 0.

KV entries (the paper's measure) count one key/value pair per *query head* and cached token: T (dense), k
(MoSA), min(w, T) (local), min(w, T) + s (streaming), min(w, T) + s + k (key-selection MoSA: window, sinks
and routed tokens, an upper bound: routed tokens inside the window are cached once). KV bytes count what a cache really holds under GQA: 2·d·(bytes per value) per
cached *K/V row*: the original caches KV rows of T tokens; kept heads cache each K/V head they read once when
they fill whole groups (else one copy per head, see ``attention.dense_kv_layout``); a MoSA unit (one head, or
one KV group with ``router_granularity='kv_group'``) caches one K/V row per selected token (k of T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from ..ops.routing import tokens_per_head
from .families import attention_layers, family_of


def dense_flops(D: int, d: int, T: int) -> int:
    return 8 * D * d * T + 2 * d * T * T


def mosa_flops(D: int, d: int, T: int, k: int) -> int:
    return 8 * D * d * k + 2 * d * k * k + 2 * D * T


def window_pairs(T: int, w: int) -> int:
    """Query-key pairs of causal sliding-window attention over T tokens (window w includes the query)."""
    w = min(w, T)
    return T * w - w * (w - 1) // 2


def local_flops(D: int, d: int, T: int, w: int) -> int:
    return 8 * D * d * T + 4 * d * window_pairs(T, w)


def keys_flops(D: int, d: int, T: int, w: int, extra: float) -> int:
    """Key-selection / streaming head: projections at every token, its causal window, and ``extra`` keys per
    query on average (sinks, routed tokens before the window) plus the router (2·D·T, counted by the caller)."""
    return 8 * D * d * T + 4 * d * (window_pairs(T, w) + int(extra * T))


def equal_compute_window(T: int, sparsity: float) -> int:
    """The window w whose causal query-key pairs over T tokens best match a MoSA head's k(k+1)/2 pairs.

    This is the equal-compute local baseline of the retrofit study: same attention-score work at length T
    (the local head still projects all T tokens, which the FLOP ratios show).
    """
    k = tokens_per_head(T, sparsity)
    target = k * (k + 1) // 2
    return min(range(1, T + 1), key=lambda w: (abs(window_pairs(T, w) - target), w))


@dataclass(frozen=True)
class Dims:
    D: int  # width
    d: int  # head dim
    H: int  # query heads
    KV: int  # key/value heads
    reach: int | None = None  # the layer's own sliding window (Gemma, Mistral), if any

    def span(self, T: int) -> int:
        """Tokens a query of this layer can see at T tokens (its own window, if any, bounds them)."""
        return T if self.reach is None else min(T, self.reach)

    def flops(self, T: int) -> int:
        """Attention FLOPs of one unconverted head of this layer over T tokens (a sliding window where it has one)."""
        return dense_flops(self.D, self.d, T) if self.span(T) == T else local_flops(self.D, self.d, T, self.span(T))


@dataclass(frozen=True)
class GroupCost:
    flops: int
    entries: int  # KV-cache entries: cached tokens summed over query heads (the paper's count)
    rows: int  # K/V rows a cache holds (one key and one value vector each)


@dataclass(frozen=True)
class LayerCost:
    layer: int
    dense: int  # heads running full attention
    local: int  # heads running a sliding window
    mosa: int
    pruned: int
    k: int | None
    flops: int
    flops_original: int
    kv: int  # entries: cached tokens summed over query heads
    kv_original: int
    kv_bytes: int  # bytes of K and V rows a cache holds
    kv_bytes_original: int


class CostRatios(NamedTuple):
    """Costs of a model relative to its unconverted original."""

    flops: float
    kv: float  # KV-cache entries (per query head, the paper's measure)
    kv_bytes: float  # KV-cache bytes (what a cache holds under GQA)


def attention_costs(model: nn.Module, T: int) -> list[LayerCost]:
    """Per attention layer, the costs at T tokens of ``model`` and of its unconverted original: the sum of what
    each head group of a converted layer reports (heads/)."""
    fam = family_of(model)
    rows = []
    for idx, (_, m) in sorted(attention_layers(model, fam).items()):
        H, KV, d = fam.dims(m)
        W = fam.head_weights(m)
        dims = Dims(W.wq.shape[2], d, H, KV, fam.sliding_window(m))
        row_bytes = 2 * d * W.wq.element_size()  # one key and one value vector
        span = dims.span(T)  # a layer with its own window caches its last ``reach`` rows only (HF's sliding cache)
        f0, kv0, b0 = H * dims.flops(T), H * span, KV * span * row_bytes
        groups = getattr(m, "mosa_groups", ())
        if not groups:
            rows.append(LayerCost(idx, H, 0, 0, 0, None, f0, f0, kv0, kv0, b0, b0))
            continue
        plan = m.mosa_plan
        n = {"dense": 0, "local": 0, "mosa": 0, "pruned": 0}
        for g in groups:  # the table's columns, as each kind declares
            n[g.column] += len(g.heads)
        costs = [g.cost(T, dims) for g in groups]
        k = tokens_per_head(T, plan.config.sparsity) if n["mosa"] else None
        rows.append(LayerCost(idx, n["dense"], n["local"], n["mosa"], n["pruned"], k, sum(c.flops for c in costs),
                              f0, sum(c.entries for c in costs), kv0, sum(c.rows for c in costs) * row_bytes, b0))
    return rows


def ratios(rows: list[LayerCost]) -> CostRatios:
    """Attention FLOPs, KV-cache entries and KV-cache bytes of all ``rows`` relative to the unconverted original."""
    return CostRatios(sum(r.flops for r in rows) / sum(r.flops_original for r in rows),
                      sum(r.kv for r in rows) / sum(r.kv_original for r in rows),
                      sum(r.kv_bytes for r in rows) / sum(r.kv_bytes_original for r in rows))


def cost_ratios(model: nn.Module, T: int) -> CostRatios:
    """Attention FLOPs, KV entries and KV bytes of ``model`` relative to its unconverted original at T tokens."""
    return ratios(attention_costs(model, T))
