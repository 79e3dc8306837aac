"""Attention FLOPs and KV-cache entries of a (converted or original) model, per layer and in total.

FLOPs per head at T tokens (causal half of the score/value products, projections included):
dense 8·D·d·T + 2·d·T², MoSA 8·D·d·k + 2·d·k² + 2·D·T (router), local 8·D·d·T + 4·d·P(T, w) where
P = T·w - w(w-1)/2 is the number of query-key pairs of a causal window of w (T²/2 for w = T), pruned 0.
KV entries count one key/value pair per query head and cached token: T (dense), k (MoSA), min(w, T) (local).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .families import family_of
from .sparse import tokens_per_head


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


def equal_compute_window(T: int, sparsity: float) -> int:
    """The window w whose causal query-key pairs over T tokens best match a MoSA head's k(k+1)/2 pairs.

    This is the equal-compute local baseline of the retrofit study: same attention-score work at length T
    (the local head still projects all T tokens, which the FLOP ratios show).
    """
    k = tokens_per_head(T, sparsity)
    target = k * (k + 1) // 2
    return min(range(1, T + 1), key=lambda w: (abs(window_pairs(T, w) - target), w))


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
    kv: int
    kv_original: int


def attention_costs(model: nn.Module, T: int) -> list[LayerCost]:
    from .surgery import attention_layers

    fam = family_of(model)
    rows = []
    for idx, (_, m) in sorted(attention_layers(model, fam).items()):
        H, _, d = fam.dims(m)
        D = fam.head_weights(m).wq.shape[2]
        plan = getattr(m, "mosa_plan", None)
        f0, kv0 = H * dense_flops(D, d, T), H * T
        if plan is None:
            rows.append(LayerCost(idx, H, 0, 0, 0, None, f0, f0, kv0, kv0))
            continue
        w = min(plan.local_window, T)
        n = {"dense": 0, "local": 0, "mosa": 0, "pruned": 0}
        n[plan.kept_heads] += len(plan.dense)
        n[plan.sparse_heads] += len(plan.mosa)
        k = tokens_per_head(T, plan.sparsity) if n["mosa"] else None
        f = (n["dense"] * dense_flops(D, d, T) + n["local"] * local_flops(D, d, T, w)
             + (n["mosa"] * mosa_flops(D, d, T, k) if k else 0))
        kv = n["dense"] * T + n["local"] * w + (n["mosa"] * k if k else 0)
        rows.append(LayerCost(idx, n["dense"], n["local"], n["mosa"], n["pruned"], k, f, f0, kv, kv0))
    return rows


def ratios(rows: list[LayerCost]) -> tuple[float, float]:
    """(attention FLOPs, KV-cache entries) of all ``rows`` relative to the unconverted original."""
    return (sum(r.flops for r in rows) / sum(r.flops_original for r in rows),
            sum(r.kv for r in rows) / sum(r.kv_original for r in rows))


def cost_ratios(model: nn.Module, T: int) -> tuple[float, float]:
    """(attention FLOPs, KV-cache entries) of ``model`` relative to its unconverted original at T tokens."""
    return ratios(attention_costs(model, T))
