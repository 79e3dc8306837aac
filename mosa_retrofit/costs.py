"""Attention FLOPs and KV-cache entries of a (converted or original) model, per layer and in total.

FLOPs per head at T tokens (causal half of the score/value products, projections included):
dense 8·D·d·T + 2·d·T², MoSA 8·D·d·k + 2·d·k² + 2·D·T (router), local 8·D·d·T + 2·d·T·w.
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


@dataclass(frozen=True)
class LayerCost:
    layer: int
    dense: int  # kept heads running full attention
    local: int  # kept heads running a sliding window
    mosa: int
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
            rows.append(LayerCost(idx, H, 0, 0, None, f0, f0, kv0, kv0))
            continue
        k = tokens_per_head(T, plan.sparsity)
        n_keep, n_mosa = len(plan.dense), len(plan.mosa)
        w = min(plan.local_window, T)
        local = plan.kept_heads == "local"
        keep_f = (8 * D * d * T + 2 * d * T * w) if local else dense_flops(D, d, T)
        f = n_keep * keep_f + n_mosa * mosa_flops(D, d, T, k)
        kv = n_keep * (w if local else T) + n_mosa * k
        rows.append(LayerCost(idx, 0 if local else n_keep, n_keep if local else 0, n_mosa, k, f, f0, kv, kv0))
    return rows


def ratios(rows: list[LayerCost]) -> tuple[float, float]:
    """(attention FLOPs, KV-cache entries) of all ``rows`` relative to the unconverted original."""
    return (sum(r.flops for r in rows) / sum(r.flops_original for r in rows),
            sum(r.kv for r in rows) / sum(r.kv_original for r in rows))


def cost_ratios(model: nn.Module, T: int) -> tuple[float, float]:
    """(attention FLOPs, KV-cache entries) of ``model`` relative to its unconverted original at T tokens."""
    return ratios(attention_costs(model, T))
