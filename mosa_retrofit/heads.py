"""Head groups: what the heads of a converted attention layer run, one class per kind, found in a registry.

A converted layer holds two groups, built from its ``LayerPlan``: the *kept* heads (``plan.dense``; kind
``plan.kept_heads``: 'dense' or 'local') and the *sparse* heads (``plan.mosa``; kind ``plan.sparse_heads``:
'mosa', or the study baselines 'local' and 'pruned'). Each group answers three questions:

* ``forward(layer, call, out)``: its contribution to the layer output, added to ``out`` (None: nothing yet);
* ``cost(T, dims)``: attention FLOPs, KV entries (per query head) and cached K/V rows at T tokens;
* ``check_decode(layer, call)``: whether it can run on a cache that already holds tokens (raises if not).

A new kind of head is a subclass registered with ``@register_heads("name")``; the layer's forward does not
change. The groups hold no parameters: they read the layer's own weights (per-head views, families.py) and its
``mosa_router`` / ``mosa_fill`` / ``mosa_threshold``, so checkpoints keep their names.

Shape legend: B batch, T tokens, D width, H query heads, KV key/value heads, d head dim, n heads of the group,
E routed units, G query heads per unit, K selected tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import mosa_attention_cached, mosa_cache_layer
from .costs import Dims, GroupCost, dense_flops, local_flops, mosa_flops
from .families import HeadWeights, dense_kv_layout, head_to_kv
from .masks import key_padding
from .rope import apply_rope
from .sparse import fill_output, logit_quantile, mosa_attention, tokens_per_head
from .window import banded_attention, sliding_window_attention

HEAD_GROUPS: dict[str, type[HeadGroup]] = {}


def register_heads(kind: str):
    """Class decorator: ``kind`` is the word a ``MoSAConfig`` uses for this group (kept_heads / sparse_heads)."""
    def wrap(cls):
        HEAD_GROUPS[kind] = cls
        cls.kind = kind
        return cls
    return wrap


@dataclass
class Call:
    """What one forward of a converted layer gives its groups."""

    x: Tensor  # (B, T, D) layer input
    W: HeadWeights
    mask: object  # the attention mask transformers passed (4D tensor, 2D tensor, BlockMask or None)
    cache: object  # the transformers Cache of this forward, or None
    cos: Tensor | None  # RoPE tables (B, T, R), or None for families without RoPE
    sin: Tensor | None
    extra: dict  # the backend's extra keyword arguments
    store: object = None  # the layer's sparse K/V store in ``cache`` (causal MoSA heads, set by ``prepare``)


@dataclass
class HeadGroup:
    heads: tuple[int, ...]
    plan: object  # the layer's LayerPlan
    role: str  # 'kept' (plan.dense) or 'sparse' (plan.mosa)

    kind: ClassVar[str]

    def forward(self, layer, call: Call, out: Tensor | None) -> Tensor | None:
        raise NotImplementedError

    def cost(self, T: int, dims: Dims) -> GroupCost:
        raise NotImplementedError

    def check_decode(self, layer, call: Call) -> None:
        """Raise if this group cannot continue a cache that already holds tokens."""

    def prepare(self, layer, call: Call) -> None:
        """Runs for every group before any group writes the cache."""


def head_groups(plan) -> tuple[HeadGroup, ...]:
    """The kept and the sparse group of a layer (either may be absent), from the registry."""
    groups = []
    if plan.dense:
        groups.append(HEAD_GROUPS[plan.kept_heads](plan.dense, plan, "kept"))
    if plan.mosa:
        groups.append(HEAD_GROUPS[plan.sparse_heads](plan.mosa, plan, "sparse"))
    return tuple(groups)


# ---------------------------------------------------------------------------------- full / windowed heads


@register_heads("dense")
class DenseHeads(HeadGroup):
    """Full causal attention on the model's own backend (sdpa, eager, flash, ...), cached in its KV cache."""

    window: int | None = None

    def forward(self, layer, call: Call, out: Tensor | None) -> Tensor:
        fam, x, W = layer.mosa_family, call.x, call.W
        B, T, _ = x.shape
        d = W.head_dim
        kv_heads, groups = dense_kv_layout(self.heads, W.num_heads, W.num_kv_heads)
        wq, bq, wk, bk, wv, bv, wo = layer.mosa_memo(self.role, lambda: _head_weights(W, self.heads, kv_heads))
        q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
        q = q.view(B, T, -1, d).transpose(1, 2)  # (B, n, T, d)
        k, v = (t.view(B, T, -1, d).transpose(1, 2) for t in (k, v))  # (B, n_kv, T, d)
        pre = fam.query_prescale(layer)
        q = q * pre if pre != 1.0 else q
        q_norm, k_norm = fam.norms(layer)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if call.cos is not None:
            cos, sin = call.cos[:, None], call.sin[:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cached and call.cache is not None:
            k, v = call.cache.update(k, v, layer.layer_idx)
        a = self.attend(layer, call, q, k, v, groups)  # (B, T, n, d)
        bias = W.bo if out is None else None  # the output bias is added once, by the first group that writes
        y = F.linear(a.reshape(B, T, -1), wo, bias)  # (B, T, D)
        return y if out is None else out + y

    @property
    def cached(self) -> bool:
        return self.role == "kept"

    def attend(self, layer, call: Call, q, k, v, groups: int) -> Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # (transformers' registry, read per call)

        fam = layer.mosa_family
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(layer.config._attn_implementation, layer.mosa_eager)
        opt = {k_: v_ for k_, v_ in (("sliding_window", fam.sliding_window(layer)),
                                     ("softcap", fam.softcap(layer))) if v_ is not None}
        dropout = fam.dropout(layer) if layer.training else 0.0
        a, _ = attend(layer, q, k, v, call.mask, dropout=dropout, scaling=fam.scaling(layer), **opt, **call.extra)
        return a

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n = len(self.heads)
        rows = len(dense_kv_layout(self.heads, dims.H, dims.KV)[0]) * T
        return GroupCost(n * dense_flops(dims.D, dims.d, T), n * T, rows)


@register_heads("local")
class LocalHeads(DenseHeads):
    """Sliding-window heads: query t attends keys t - w + 1 .. t (w = ``plan.local_window``). Kept, they cache
    through the model's cache; as the study's sparse baseline they are never cached (full forwards only)."""

    def attend(self, layer, call: Call, q, k, v, groups: int) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        w = self.plan.local_window
        scale = layer.mosa_family.scaling(layer)
        dropout = layer.mosa_family.dropout(layer) if layer.training else 0.0
        valid = key_padding(call.mask, T) if call.mask is not None else None
        if S == T and w < T:  # no cached prefix: blocked O(T·w) kernel
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return sliding_window_attention(q, k, v, w, scale, valid, dropout).transpose(1, 2)  # (B, T, n, d)
        return banded_attention(q, k, v, w, scale, valid, dropout, groups).transpose(1, 2)

    def check_decode(self, layer, call: Call) -> None:
        if self.role == "sparse" and call.cache is not None and call.cache.get_seq_length(layer.layer_idx) > 0:
            raise ValueError("layers with sparse_heads='local' (a study baseline) do not decode token by token; "
                             "run full forwards (use_cache=False)")

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, w = len(self.heads), min(self.plan.local_window, T)
        rows = len(dense_kv_layout(self.heads, dims.H, dims.KV)[0]) * w
        return GroupCost(n * local_flops(dims.D, dims.d, T, w), n * w, rows)


@register_heads("pruned")
class PrunedHeads(HeadGroup):
    """Removed heads (a study baseline): nothing, or their calibrated mean output with ``fill='mean'``."""

    def forward(self, layer, call: Call, out: Tensor | None) -> Tensor | None:
        if self.plan.fill != "mean":
            return out
        ids = torch.tensor(self.heads, device=call.x.device)
        f = fill_output(layer.mosa_fill, call.W.wo[:, ids].permute(1, 2, 0))  # (D,) from (n, d) and (n, d, D)
        return f.expand_as(call.x) if out is None else out + f

    def cost(self, T: int, dims: Dims) -> GroupCost:
        return GroupCost(0, 0, 0)


# ---------------------------------------------------------------------------------- MoSA heads


@register_heads("mosa")
class MoSAHeads(HeadGroup):
    """Routed heads: each unit (a head, or a KV group) attends the tokens its router selects (sparse.py); with
    causal routing a cache keeps only those tokens' K/V (cache.py)."""

    @property
    def units(self) -> list[list[int]]:
        G = self.plan.heads_per_unit
        return [list(self.heads[i: i + G]) for i in range(0, len(self.heads), G)]

    def check_decode(self, layer, call: Call) -> None:
        if (self.plan.routing != "causal" and call.cache is not None
                and call.cache.get_seq_length(layer.layer_idx) > 0):
            raise ValueError(
                "MoSA heads with expert-choice routing cannot decode token by token (top-k looks at the whole "
                "sequence); convert with MoSAConfig(routing='causal') to generate, or run full forwards "
                "(use_cache=False)")

    def prepare(self, layer, call: Call) -> None:
        """Takes the layer's sparse K/V store in this forward's cache (causal routing) before the kept heads
        write the cache."""
        if self.plan.routing == "causal" and call.cache is not None:
            call.store = mosa_cache_layer(call.cache, layer.layer_idx)

    def forward(self, layer, call: Call, out: Tensor | None) -> Tensor:
        fam, plan, x, W = layer.mosa_family, self.plan, call.x, call.W
        B, T, _ = x.shape
        w_qkv, b_qkv, w_o = layer.mosa_memo("mosa", lambda: self.weights(W))
        E = w_qkv.shape[0]
        rope = None
        if call.cos is not None:
            cos, sin, R = call.cos, call.sin, call.cos.shape[-1]

            def rope(idx: Tensor) -> tuple[Tensor, Tensor]:  # (E, B, K) -> 2 x (E, B, K, R)
                at = idx.unsqueeze(-1).expand(*idx.shape, R)
                return tuple(t.expand(B, T, R).unsqueeze(0).expand(E, B, T, R).gather(2, at) for t in (cos, sin))

        q_norm, k_norm = fam.norms(layer)
        opts = dict(heads_per_unit=plan.heads_per_unit, b_qkv=b_qkv, include_first=plan.include_first,
                    router_score=plan.router_score, rope=rope, q_norm=q_norm, k_norm=k_norm,
                    scale=fam.scaling(layer) * fam.query_prescale(layer), softcap=fam.softcap(layer),
                    sliding_window=fam.sliding_window(layer), add_to=out,
                    fill=layer.mosa_fill if plan.fill == "mean" else None)
        valid = key_padding(call.mask, T)
        causal = plan.routing == "causal"
        if causal and call.store is not None:
            return mosa_attention_cached(x, layer.mosa_router, w_qkv, w_o, call.store, threshold=layer.mosa_threshold,
                                         valid=valid, **opts)
        y = mosa_attention(x, layer.mosa_router, w_qkv, w_o, sparsity=plan.sparsity, attention_mask=valid,
                           dropout_p=fam.dropout(layer) if layer.training else 0.0,
                           threshold=layer.mosa_threshold if causal else None, **opts)
        if causal and layer.training and plan.sparsity > 1 and plan.threshold_momentum > 0:
            self.track_threshold(layer, x, valid)
        return y

    def weights(self, W: HeadWeights) -> tuple:
        """Per unit: fused (E, D, (G+2)·d) Q/K/V projection, its bias (or None) and (E, G·d, D) output."""
        G, D, d = self.plan.heads_per_unit, W.wq.shape[2], W.head_dim
        ids = torch.tensor(self.heads, device=W.wq.device)  # (E·G,) query heads, grouped by unit
        kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
        kv = torch.tensor([kv_of[h] for h in self.heads[::G]], device=W.wq.device)  # (E,) K/V head of each unit
        E = kv.shape[0]
        wq = W.wq[ids].view(E, G * d, D)
        w_qkv = torch.cat((wq, W.wk[kv], W.wv[kv]), dim=1).transpose(1, 2)  # (E, D, (G+2)·d)
        b_qkv = None
        if W.bq is not None or W.bk is not None or W.bv is not None:
            z = W.wq.new_zeros(E, d)
            b_qkv = torch.cat((W.bq[ids].view(E, G * d) if W.bq is not None else W.wq.new_zeros(E, G * d),
                               W.bk[kv] if W.bk is not None else z, W.bv[kv] if W.bv is not None else z), dim=1)
        w_o = W.wo[:, ids].permute(1, 2, 0).reshape(E, G * d, D)  # (E, G·d, D)
        return w_qkv, b_qkv, w_o

    @torch.no_grad()
    def track_threshold(self, layer, x: Tensor, valid: Tensor | None) -> None:
        """Move each unit's threshold toward the batch's (1 - 1/sparsity) quantile of its router logits."""
        target = logit_quantile(layer.mosa_router, x, valid, self.plan)  # (E,)
        m = self.plan.threshold_momentum
        target = torch.where(torch.isnan(target), layer.mosa_threshold.float(), target)  # rows of only padding
        layer.mosa_threshold.mul_(1 - m).add_(m * target.to(layer.mosa_threshold.dtype))

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, k = len(self.heads), tokens_per_head(T, self.plan.sparsity)
        return GroupCost(n * mosa_flops(dims.D, dims.d, T, k), n * k, len(self.units) * k)


def _head_weights(W: HeadWeights, heads: tuple[int, ...], kv_heads: tuple[int, ...]) -> tuple:
    """Rows of q/k/v of ``heads`` (and of their ``kv_heads``) and columns of o, as matrices for F.linear."""
    D = W.wq.shape[2]
    dense = torch.tensor(heads, device=W.wq.device)
    kv = torch.tensor(kv_heads, device=W.wq.device)
    pick = lambda t, i: None if t is None else t[i].reshape(-1)
    return (W.wq[dense].reshape(-1, D), pick(W.bq, dense), W.wk[kv].reshape(-1, D), pick(W.bk, kv),
            W.wv[kv].reshape(-1, D), pick(W.bv, kv), W.wo[:, dense].reshape(D, -1))
