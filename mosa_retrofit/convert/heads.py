"""Head groups: what the heads of a converted attention layer run, one class per kind, found in a registry.

A converted layer holds two groups, built from its ``LayerPlan``: the *kept* heads (``plan.dense``; kind
``plan.config.kept_heads``: 'dense' or 'local') and the *sparse* heads (``plan.mosa``; kind ``plan.config.sparse_heads``:
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

from ..ops.masks import key_padding
from ..ops.rope import apply_rope
from ..ops.sparse import (
    fill_output,
    logit_quantile,
    mosa_attention,
    router_gates,
    select_tokens,
    tokens_per_head,
)
from ..ops.keys import FarKeys, key_selection_attention
from ..ops.window import banded_attention
from .cache import LayerStore, layer_store, mosa_attention_cached
from .costs import Dims, GroupCost, dense_flops, keys_flops, local_flops, mosa_flops
from .families import HeadWeights, dense_kv_layout, head_to_kv

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
    store: LayerStore | None = None  # the layer's sparse state in ``cache`` (set by ``prepare``)


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
        groups.append(HEAD_GROUPS[plan.config.kept_heads](plan.dense, plan, "kept"))
    if plan.mosa:
        groups.append(HEAD_GROUPS[plan.config.sparse_heads](plan.mosa, plan, "sparse"))
    return tuple(groups)


# ---------------------------------------------------------------------------------- full / windowed heads


@register_heads("dense")
class DenseHeads(HeadGroup):
    """Full causal attention on the model's own backend (sdpa, eager, flash, ...), cached in its KV cache."""

    window: int | None = None

    def forward(self, layer, call: Call, out: Tensor | None) -> Tensor:
        x, W = call.x, call.W
        B, T, _ = x.shape
        d = W.head_dim
        kv_heads, groups = dense_kv_layout(self.heads, W.num_heads, W.num_kv_heads)
        w_qkv, b_qkv, wo = layer.mosa_memo(self.role, lambda: _head_weights(W, self.heads, kv_heads))
        q, k, v = _project(layer, call, w_qkv, b_qkv, len(kv_heads), d)  # (B, n, T, d), 2 x (B, n_kv, T, d)
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
        from transformers.modeling_utils import (
            ALL_ATTENTION_FUNCTIONS,  # (transformers' registry, read per call)
        )

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
    """Sliding-window heads: query t attends keys t - w + 1 .. t (w = ``plan.config.local_window``). Kept, they cache
    through the model's cache; as the study's sparse baseline they are never cached (full forwards only)."""

    def attend(self, layer, call: Call, q, k, v, groups: int) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        w = self.plan.config.local_window
        scale = layer.mosa_family.scaling(layer)
        dropout = layer.mosa_family.dropout(layer) if layer.training else 0.0
        valid = key_padding(call.mask, T) if call.mask is not None else None
        if S == T and w < T:  # no cached prefix: the key-selection kernel's band, K/V shared by each group
            return key_selection_attention(q, k, v, w, scale, None, valid, None, dropout,
                                           self.plan.config.attn_backend)  # (B, T, n, d)
        return banded_attention(q, k, v, w, scale, valid, dropout, groups).transpose(1, 2)

    def check_decode(self, layer, call: Call) -> None:
        if self.role == "sparse" and call.cache is not None and call.cache.get_seq_length(layer.layer_idx) > 0:
            raise ValueError("layers with sparse_heads='local' (a study baseline) do not decode token by token; "
                             "run full forwards (use_cache=False)")

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, w = len(self.heads), min(self.plan.config.local_window, T)
        rows = len(dense_kv_layout(self.heads, dims.H, dims.KV)[0]) * w
        return GroupCost(n * local_flops(dims.D, dims.d, T, w), n * w, rows)


@register_heads("pruned")
class PrunedHeads(HeadGroup):
    """Removed heads (a study baseline): nothing, or their calibrated mean output with ``fill='mean'``."""

    def forward(self, layer, call: Call, out: Tensor | None) -> Tensor | None:
        if self.plan.config.fill != "mean":
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

    routed: ClassVar[bool] = True  # the group has routers (``layer.mosa_router``)

    @property
    def units(self) -> list[list[int]]:
        G = self.plan.heads_per_unit
        return [list(self.heads[i: i + G]) for i in range(0, len(self.heads), G)]

    def check_decode(self, layer, call: Call) -> None:
        if (self.plan.config.routing != "causal" and call.cache is not None
                and call.cache.get_seq_length(layer.layer_idx) > 0):
            raise ValueError(
                "MoSA heads with expert-choice routing cannot decode token by token (top-k looks at the whole "
                "sequence); convert with MoSAConfig(routing='causal') to generate, or run full forwards "
                "(use_cache=False)")

    def prepare(self, layer, call: Call) -> None:
        """Takes the layer's sparse K/V store in this forward's cache (causal routing) before the kept heads
        write the cache."""
        if self.plan.config.routing == "causal" and call.cache is not None:
            call.store = layer_store(call.cache, layer.layer_idx)

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
        opts = dict(heads_per_unit=plan.heads_per_unit, b_qkv=b_qkv, include_first=plan.config.include_first,
                    router_score=plan.config.router_score, rope=rope, q_norm=q_norm, k_norm=k_norm,
                    scale=fam.scaling(layer) * fam.query_prescale(layer), softcap=fam.softcap(layer),
                    sliding_window=fam.sliding_window(layer), add_to=out,
                    fill=layer.mosa_fill if plan.config.fill == "mean" else None)
        valid = key_padding(call.mask, T)
        causal = plan.config.routing == "causal"
        if causal and call.store is not None:
            return mosa_attention_cached(x, layer.mosa_router, w_qkv, w_o, call.store, threshold=layer.mosa_threshold,
                                         valid=valid, **opts)
        y = mosa_attention(x, layer.mosa_router, w_qkv, w_o, sparsity=plan.config.sparsity, attention_mask=valid,
                           dropout_p=fam.dropout(layer) if layer.training else 0.0,
                           threshold=layer.mosa_threshold if causal else None, **opts)
        if causal and layer.training and plan.config.sparsity > 1 and plan.config.threshold_momentum > 0:
            self.track_threshold(layer, x, valid, y)
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
    def track_threshold(self, layer, x: Tensor, valid: Tensor | None, y: Tensor) -> None:
        """Move each unit's threshold toward the batch's (1 - 1/sparsity) quantile of its router logits.

        The new value is written when the backward pass reaches this group's output ``y`` (at once when no
        backward will come): activation checkpointing recomputes the forward in between, and that recomputation
        must select with the threshold the forward selected with."""
        target = logit_quantile(layer.mosa_router, x, valid, self.plan.config.sparsity,
                                self.plan.config.include_first)  # (E,)
        m = self.plan.config.threshold_momentum
        t = layer.mosa_threshold
        target = torch.where(torch.isnan(target), t.float(), target)  # rows of only padding
        layer._mosa_threshold_next = t * (1 - m) + m * target.to(t.dtype)
        if y.requires_grad:
            y.register_hook(lambda grad: _commit_threshold(layer))
        else:
            _commit_threshold(layer)

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, k = len(self.heads), tokens_per_head(T, self.plan.config.sparsity)
        return GroupCost(n * mosa_flops(dims.D, dims.d, T, k), n * k, len(self.units) * k)


@torch.no_grad()
def _commit_threshold(layer) -> None:
    """Write the threshold a training forward computed (see ``MoSAHeads.track_threshold``); once."""
    nxt = layer.__dict__.pop("_mosa_threshold_next", None)
    if nxt is not None:
        layer.mosa_threshold.copy_(nxt)


def _project(layer, call: Call, w_qkv: Tensor, b_qkv: Tensor | None, n_kv: int,
             d: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, n, T, d) and k, v (B, n_kv, T, d) of a group's heads from one fused projection: prescaled, normed,
    rotated."""
    fam, x = layer.mosa_family, call.x
    B, T, _ = x.shape
    qkv = F.linear(x, w_qkv, b_qkv).view(B, T, -1, d)  # (B, T, n + 2·n_kv, d)
    n = qkv.shape[2] - 2 * n_kv
    q, k, v = (t.transpose(1, 2) for t in qkv.split((n, n_kv, n_kv), dim=2))
    pre = fam.query_prescale(layer)
    q = q * pre if pre != 1.0 else q
    q_norm, k_norm = fam.norms(layer)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if call.cos is not None:
        cos, sin = call.cos[:, None], call.sin[:, None]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


def _head_weights(W: HeadWeights, heads: tuple[int, ...], kv_heads: tuple[int, ...]) -> tuple:
    """(fused (n·d + 2·n_kv·d, D) Q/K/V rows of ``heads`` and of their ``kv_heads``, its bias or None, the (D, n·d)
    columns of o), as matrices for F.linear."""
    D = W.wq.shape[2]
    dense = torch.tensor(heads, device=W.wq.device)
    kv = torch.tensor(kv_heads, device=W.wq.device)
    w_qkv = torch.cat((W.wq[dense].reshape(-1, D), W.wk[kv].reshape(-1, D), W.wv[kv].reshape(-1, D)))
    b_qkv = None
    if W.bq is not None or W.bk is not None or W.bv is not None:
        pick = lambda t, i, n: t[i].reshape(-1) if t is not None else W.wq.new_zeros(n * W.head_dim)
        b_qkv = torch.cat((pick(W.bq, dense, len(heads)), pick(W.bk, kv, len(kv_heads)), pick(W.bv, kv, len(kv_heads))))
    return w_qkv, b_qkv, W.wo[:, dense].reshape(D, -1)


class WindowedHeads(MoSAHeads):
    """Heads whose every query sees the first ``plan.config.sink_tokens`` real tokens of its row (attention sinks), its
    last ``plan.config.local_window`` tokens and, for key-selection MoSA heads, the tokens its unit routed: one softmax
    over those keys, an output at every token (no fill). With a cache, a store keeps per unit exactly the rows a
    later query can still see (window_store.py), so prefill + token-by-token decoding computes what a full
    forward computes. Units are the MoSA units of the plan (a KV group's heads share K/V, or one head each)."""

    routed: ClassVar[bool] = False

    def check_decode(self, layer, call: Call) -> None:
        if not self.routed or call.cache is None or call.cache.get_seq_length(layer.layer_idx) == 0:
            return
        super().check_decode(layer, call)  # expert choice cannot decode
        if self.plan.config.router_score != "straight_through":
            raise ValueError("MoSA heads 'mosa_keys' decode token by token with router_score='straight_through' "
                             "only (sigmoid gates scale routed values differently inside and beyond the window); "
                             "run full forwards (use_cache=False)")

    def prepare(self, layer, call: Call) -> None:
        if call.cache is not None and (not self.routed or self.plan.config.routing == "causal"):
            call.store = layer_store(call.cache, layer.layer_idx)

    def forward(self, layer, call: Call, out: Tensor | None) -> Tensor:
        fam, plan, x, W = layer.mosa_family, self.plan, call.x, call.W
        B, T, _ = x.shape
        d, units = W.head_dim, self.units
        kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
        unit_kv = tuple(kv_of[u[0]] for u in units)  # (E,) the K/V head each unit reads
        w_qkv, b_qkv, wo = layer.mosa_memo(self.kind, lambda: _head_weights(W, self.heads, unit_kv))
        q, k, v = _project(layer, call, w_qkv, b_qkv, len(unit_kv), d)  # (B, E·G, T, d), 2 x (B, E, T, d)

        host = call.store  # the layer's LayerStore (None: no cache)
        valid = key_padding(call.mask, T)
        real = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        offset, seen_real = host.advance(real) if host is not None else (0, torch.zeros(B, dtype=torch.long,
                                                                                         device=x.device))
        index = seen_real[:, None] + real.long().cumsum(-1) - 1  # (B, T) index among the row's real tokens
        sink = real & (index < plan.config.sink_tokens)
        chosen, gate = self.route(layer, x, valid, real & (index == 0))  # (E, B, T) bool, (E, B, T) or None
        keep = chosen | sink  # (E, B, T) rows every later query sees
        w = plan.config.local_window
        reach = fam.sliding_window(layer)  # the layer's own window (Gemma, Mistral), if any
        w = min(w, reach or w)
        scale, dropout = fam.scaling(layer), (fam.dropout(layer) if layer.training else 0.0)
        store = host.window_store(w, reach) if host is not None else None
        if store is not None:  # what the store takes: K/V as they are, values of sinks ungated
            g = None if gate is None else torch.where(sink[None], torch.ones_like(gate), gate).detach()
            k_e, v_e = k.detach().transpose(0, 1), v.detach().transpose(0, 1)  # (E, B, T, d)
        if store is None or store.k is None:  # nothing cached before these tokens: the key-selection kernel
            a = self.attend_full(q, k, v, keep, sink, gate, valid, w, reach, scale, dropout, plan.config.attn_backend)
            a = a.reshape(B, T, -1)  # (B, T, E·G·d)
            if store is not None:
                store.next_pos = offset
                store.absorb(k_e, v_e, keep, g, real)
        elif T == 1:  # decoding: one ring slot written, [ring | far rows] read in one call
            store.absorb(k_e, v_e, keep, g, real)
            a = store.attend_step(q, scale)
        else:  # a chunk after earlier tokens
            a = store.attend_chunk(q, k_e, v_e, keep, g, real, scale, plan.config.attn_backend)
            store.absorb(k_e, v_e, keep, g, real)
        bias = W.bo if out is None else None
        y = F.linear(a, wo, bias)  # (B, T, D)
        if self.routed and plan.config.routing == "causal" and layer.training and plan.config.sparsity > 1 and (
                plan.config.threshold_momentum > 0):
            self.track_threshold(layer, x, valid, y)
        return y if out is None else out + y

    def route(self, layer, x: Tensor, valid: Tensor | None, first: Tensor) -> tuple[Tensor, Tensor | None]:
        """(E, B, T) tokens each unit routes, and the gates of their values (None: no router)."""
        E, (B, T) = len(self.units), x.shape[:2]
        return torch.zeros(E, B, T, dtype=torch.bool, device=x.device), None

    @staticmethod
    def attend_full(q, k, v, keep, sink, gate, valid, w, reach, scale, dropout, backend) -> Tensor:
        """Window + far keys (the kept rows: sinks and routed tokens, gathered once per unit): (B, T, E·G, d)."""
        E, B, T = keep.shape
        M = int(keep.sum(-1).max()) if keep.numel() else 0
        far = None
        if M:
            at_pos = torch.arange(T, device=q.device)
            key = torch.where(keep, at_pos, at_pos + T).sort(dim=-1).values[..., :M]  # (E, B, M) kept first
            idx = key.remainder(T).transpose(0, 1)  # (B, E, M) positions, ascending
            at = idx[..., None].expand(B, E, M, k.shape[-1])
            ve = v.gather(2, at)
            if gate is not None:  # routed values carry the router gate (sinks do not)
                g = torch.where(sink[None].expand_as(gate), torch.ones_like(gate), gate)  # (E, B, T)
                ve = ve * g.transpose(0, 1).gather(-1, idx)[..., None].to(ve.dtype)
            far = FarKeys(k.gather(2, at), ve, idx, (key < T).transpose(0, 1))
        return key_selection_attention(q, k, v, w, scale, far, valid, reach, dropout, backend)


@register_heads("streaming")
class StreamingHeads(WindowedHeads):
    """DuoAttention's streaming heads (a baseline): sinks + a recent window, no router. They decode with a cache
    of (sinks + window) rows per unit."""

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, w = len(self.heads), min(self.plan.config.local_window, T)
        s = min(self.plan.config.sink_tokens, max(T - w, 0))
        return GroupCost(n * keys_flops(dims.D, dims.d, T, w, s), n * (w + s), len(self.units) * (w + s))


@register_heads("mosa_keys")
class MoSAKeysHeads(WindowedHeads):
    """Key-selection MoSA heads (a departure from the paper): each unit's router selects tokens as *keys*; every
    query attends the sinks, its recent window and the routed tokens before it. Routed values are multiplied by
    the router gate (its gradient path; ×1 forward with straight-through scores). Attention costs T·(w + s + k)
    instead of k², the cache holds window + sinks + routed rows."""

    routed = True

    def route(self, layer, x: Tensor, valid: Tensor | None, first: Tensor) -> tuple[Tensor, Tensor | None]:
        plan = self.plan
        logits = torch.einsum("ed,btd->ebt", layer.mosa_router, x)  # (E, B, T)
        if plan.config.routing == "causal":
            chosen = logits.detach() > layer.mosa_threshold.view(-1, 1, 1).to(logits.dtype)
            if valid is not None:
                chosen = chosen & valid
            if plan.config.include_first:
                chosen = chosen | first
        else:
            sel = select_tokens(logits, plan.config.sparsity, plan.config.include_first, valid)
            hit = torch.ones_like(sel.idx, dtype=torch.bool) if sel.live is None else sel.live
            chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, sel.idx, hit)
        return chosen, router_gates(logits, plan.config.router_score)

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, w, k = len(self.heads), min(self.plan.config.local_window, T), tokens_per_head(T, self.plan.config.sparsity)
        far = max(T - w, 0)
        s = min(self.plan.config.sink_tokens, far)
        k_far = min(k, far)  # routed tokens that can lie before a window
        rows = len(self.units) * (w + s + k_far)
        return GroupCost(n * keys_flops(dims.D, dims.d, T, w, s + k_far / 2) + len(self.units) * 2 * dims.D * T,
                         n * (w + s + k_far), rows)
