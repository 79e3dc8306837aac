"""The hybrid attention layer that ``convert_`` puts in place of a model's own attention.

The module keeps its class (a subclass is swapped in), its parameters and their names: dense heads and MoSA
heads both read the original q/k/v/o weights through per-head views (see families.py), so the checkpoint
stays a superset of the base one and the only new parameters are ``mosa_router`` (and ``mosa_fill`` with
``MoSAConfig(fill='mean')``). Dense heads run on the model's own attention backend
(``ALL_ATTENTION_FUNCTIONS``: sdpa, eager, flash, ...); MoSA heads run ``sparse.mosa_attention`` with the
model's RoPE tables, q/k norms, scaling, biases and soft-capping.

Shape legend: B batch, T tokens, D width, H query heads, KV key/value heads, d head dim, n dense heads,
E routed units (MoSA heads, or KV groups with router_granularity='kv_group'), G query heads per unit.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import mosa_attention_cached, mosa_cache_layer
from .compat import find_cache
from .families import Family, HeadWeights, dense_kv_layout, head_to_kv
from .rope import apply_rope
from .sparse import fill_output, logit_quantile, mosa_attention
from .window import sliding_window_attention


@dataclass(frozen=True)
class LayerPlan:
    """How one attention layer is split."""

    dense: tuple[int, ...]  # query heads kept dense/local
    mosa: tuple[int, ...]  # query heads turned into MoSA heads
    sparsity: float
    include_first: bool
    router_score: str
    granularity: str  # 'head' | 'kv_group'
    kept_heads: str  # 'dense' | 'local'
    local_window: int
    group_size: int = 1  # query heads per KV group of the model
    routing: str = "expert_choice"  # 'expert_choice' | 'causal'
    threshold_momentum: float = 0.05
    sparse_heads: str = "mosa"  # what the heads in ``mosa`` run: 'mosa' | 'local' | 'pruned' (baselines)
    fill: str = "zero"  # what MoSA / pruned heads write at tokens they skip: 'zero' | 'mean' (``mosa_fill``)

    @property
    def heads_per_unit(self) -> int:
        return 1 if self.granularity == "head" else self.group_size


def key_padding(mask, q_len: int) -> Tensor | None:
    """(B, T) bool, False for padded tokens, from whatever mask the model passes to attention; None if none.

    A token is real iff it may attend to itself (the diagonal of the 4D mask), which holds for causal and
    sliding-window masks alike; bool masks mean "may attend", float masks are additive (0 = attend).
    """
    if not isinstance(mask, Tensor):
        return None  # None, or a flex BlockMask: no padding information we can use
    if mask.dim() == 2:
        valid = mask[:, -q_len:].bool()
    else:
        off = mask.shape[-1] - q_len
        i = torch.arange(q_len, device=mask.device)
        diag = mask[:, 0, i, i + off]  # (B, T)
        valid = diag if diag.dtype == torch.bool else diag == 0
    return None if bool(valid.all()) else valid


class MoSAAttentionMixin:
    """Forward of a converted attention layer; mixed in front of the family's attention class."""

    mosa_plan: LayerPlan
    mosa_family: Family
    mosa_router: nn.Parameter  # (E, D)
    mosa_fill: nn.Parameter  # (E, G·d), only with plan.fill == 'mean'
    mosa_observer = None  # optional callable(module, x, W, mask, cos, sin), e.g. the router warm-up loss

    def forward(self, *args, **kwargs):
        p = self._mosa_bind(*args, **kwargs)
        x = p["hidden_states"]  # (B, T, D)
        mask = p.get("attention_mask")
        cache = find_cache(p)  # whatever transformers names it
        pe = p.get("position_embeddings")
        extra = p.get(self._mosa_var_kw, {})
        fam, plan = self.mosa_family, self.mosa_plan
        W = fam.head_weights(self)
        cos, sin = pe if pe is not None else (None, None)

        store = None
        routed = plan.mosa and plan.sparse_heads == "mosa"
        if plan.sparse_heads == "local" and cache is not None and cache.get_seq_length(self.layer_idx) > 0:
            raise ValueError("layers with sparse_heads='local' (a study baseline) do not decode token by token; "
                             "run full forwards (use_cache=False)")
        if routed and cache is not None:
            if plan.routing == "causal":
                store = mosa_cache_layer(cache, self.layer_idx)  # before the dense heads touch the cache
            elif cache.get_seq_length(self.layer_idx) > 0:
                raise ValueError(
                    "MoSA heads with expert-choice routing cannot decode token by token (top-k looks at the whole "
                    "sequence); convert with MoSAConfig(routing='causal') to generate, or run full forwards "
                    "(use_cache=False)")
        if routed and self.mosa_observer is not None:
            self.mosa_observer(self, x, W, mask, cos, sin)
        out = None
        if plan.dense:
            window = plan.local_window if plan.kept_heads == "local" else None
            out = self._mosa_kept_heads(x, W, mask, cache, cos, sin, extra, "dense", window, W.bo)
        if out is None and W.bo is not None:
            out = W.bo.expand_as(x)
        if routed:
            out = self._mosa_sparse_heads(x, W, mask, cos, sin, add_to=out, store=store)
        elif plan.mosa and plan.sparse_heads == "local":
            y = self._mosa_kept_heads(x, W, mask, None, cos, sin, extra, "local", plan.local_window, None)
            out = y if out is None else out + y
        elif plan.mosa and plan.fill == "mean":  # pruned heads, mean-ablated
            ids = torch.tensor(plan.mosa, device=x.device)
            f = fill_output(self.mosa_fill, W.wo[:, ids].permute(1, 2, 0))  # (D,) from (n, d) and (n, d, D)
            out = f.expand_as(x) if out is None else out + f
        if out is None:  # every head pruned, no output bias
            out = torch.zeros_like(x)
        return fam.output_dropout(self, out), None

    # ------------------------------------------------------------------------------ argument plumbing

    def _mosa_bind(self, *args, **kwargs) -> dict:
        bound = self._mosa_signature.bind(self, *args, **kwargs)
        return bound.arguments

    @classmethod
    def _mosa_setup_class(cls, base: type) -> None:
        cls._mosa_eager = staticmethod(sys.modules[base.__module__].eager_attention_forward)  # family's own
        cls._mosa_signature = inspect.signature(base.forward)
        cls._mosa_var_kw = next((n for n, q in cls._mosa_signature.parameters.items()
                                 if q.kind is inspect.Parameter.VAR_KEYWORD), "kwargs")

    # ------------------------------------------------------------------------------ dense / local heads

    def _mosa_kept_heads(self, x, W: HeadWeights, mask, cache, cos, sin, extra, which: str, window: int | None,
                         bias) -> Tensor:
        """Full-attention (``window`` None) or sliding-window heads: ``which`` is 'dense' (plan.dense, cached
        in the model's KV cache) or 'local' (plan.mosa of a sparse_heads='local' baseline, never cached)."""
        fam = self.mosa_family
        B, T, D = x.shape
        d = W.head_dim
        heads = self.mosa_plan.dense if which == "dense" else self.mosa_plan.mosa
        kv_heads, groups = (self._mosa_dense_kv if which == "dense"
                            else dense_kv_layout(heads, W.num_heads, W.num_kv_heads))
        wq, bq, wk, bk, wv, bv, wo = self._mosa_memo(which, lambda: self._mosa_head_weights(W, heads, kv_heads))
        q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
        q = q.view(B, T, -1, d).transpose(1, 2)  # (B, n, T, d)
        k, v = (t.view(B, T, -1, d).transpose(1, 2) for t in (k, v))  # (B, n_kv, T, d)
        pre = fam.query_prescale(self)
        q = q * pre if pre != 1.0 else q
        q_norm, k_norm = fam.norms(self)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = fam.dropout(self) if self.training else 0.0
        if window is not None:
            a = self._mosa_local(q, k, v, mask, dropout, groups, window)
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._mosa_eager)
            opt = {k_: v_ for k_, v_ in (("sliding_window", fam.sliding_window(self)),
                                         ("softcap", fam.softcap(self))) if v_ is not None}
            a, _ = attend(self, q, k, v, mask, dropout=dropout, scaling=fam.scaling(self), **opt, **extra)
        a = a.reshape(B, T, -1)  # (B, T, n·d)
        return F.linear(a, wo, bias)

    @staticmethod
    def _mosa_head_weights(W: HeadWeights, heads: tuple[int, ...], kv_heads: tuple[int, ...]) -> tuple:
        """Rows of q/k/v of ``heads`` (and of their ``kv_heads``) and columns of o, as matrices for F.linear."""
        D = W.wq.shape[2]
        dense = torch.tensor(heads, device=W.wq.device)
        kv = torch.tensor(kv_heads, device=W.wq.device)
        pick = lambda t, i: None if t is None else t[i].reshape(-1)
        return (W.wq[dense].reshape(-1, D), pick(W.bq, dense), W.wk[kv].reshape(-1, D), pick(W.bk, kv),
                W.wv[kv].reshape(-1, D), pick(W.bv, kv), W.wo[:, dense].reshape(D, -1))

    def _mosa_memo(self, name: str, build):
        """``build()``, reused across calls while no parameter of the layer changed and autograd is off.

        Gathering per-head rows copies weights; in training that is amortised over many tokens, but a decode
        step processes one token, so inference keeps the gathered copies (keyed by every parameter's storage
        and version counter: optimizer steps, loads and moves all invalidate them).
        """
        if torch.is_grad_enabled() or any(hasattr(m, "base_layer") for m in self.children()):
            return build()  # (LoRA-wrapped projections can be switched on and off without touching parameters)
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        memo = self.__dict__.setdefault("_mosa_cache_weights", {})
        if name in memo and memo[name][0] == key:
            return memo[name][1]
        value = build()
        memo[name] = (key, value)
        return value

    def _mosa_local(self, q, k, v, mask, dropout, groups, window: int) -> Tensor:
        """Sliding-window heads: query t attends keys t - window + 1 .. t (and never padding)."""
        T, S = q.shape[2], k.shape[2]
        off = S - T
        scale = self.mosa_family.scaling(self)
        if off == 0 and window < T:  # no cached prefix: blocked O(T·w) kernel
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            valid = key_padding(mask, T) if mask is not None else None
            a = sliding_window_attention(q, k, v, window, scale, valid, dropout)
            return a.transpose(1, 2)  # (B, T, n, d)
        i = torch.arange(T, device=q.device)[:, None] + off
        j = torch.arange(S, device=q.device)[None, :]
        allowed = (j <= i) & (j > i - window)  # (T, S)
        valid = key_padding(mask, T) if mask is not None else None
        if valid is not None:
            keys = torch.ones(valid.shape[0], S, dtype=torch.bool, device=q.device)
            keys[:, off:] = valid
            allowed = (allowed & keys[:, None, None, :]) | (j == i)  # keep the diagonal: no empty rows
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                           enable_gqa=groups > 1)
        return a.transpose(1, 2)  # (B, T, n, d)

    # ------------------------------------------------------------------------------ MoSA heads

    def _mosa_sparse_heads(self, x, W: HeadWeights, mask, cos, sin, add_to, store=None) -> Tensor:
        fam, plan = self.mosa_family, self.mosa_plan
        B, T, D = x.shape
        G = plan.heads_per_unit
        w_qkv, b_qkv, w_o = self._mosa_memo("mosa", lambda: self._mosa_sparse_weights(W))
        E = w_qkv.shape[0]

        rope = None
        if cos is not None:
            R = cos.shape[-1]

            def rope(idx: Tensor) -> tuple[Tensor, Tensor]:  # (E, B, K) -> 2 x (E, B, K, R)
                at = idx.unsqueeze(-1).expand(*idx.shape, R)
                return tuple(t.expand(B, T, R).unsqueeze(0).expand(E, B, T, R).gather(2, at) for t in (cos, sin))

        q_norm, k_norm = fam.norms(self)
        opts = dict(heads_per_unit=G, b_qkv=b_qkv, include_first=plan.include_first, router_score=plan.router_score,
                    rope=rope, q_norm=q_norm, k_norm=k_norm, scale=fam.scaling(self) * fam.query_prescale(self),
                    softcap=fam.softcap(self), sliding_window=fam.sliding_window(self), add_to=add_to,
                    fill=self.mosa_fill if plan.fill == "mean" else None)
        valid = key_padding(mask, T)
        causal = plan.routing == "causal"
        if causal and store is not None:
            return mosa_attention_cached(x, self.mosa_router, w_qkv, w_o, store, threshold=self.mosa_threshold,
                                         valid=valid, **opts)
        y = mosa_attention(x, self.mosa_router, w_qkv, w_o, sparsity=plan.sparsity, attention_mask=valid,
                           dropout_p=fam.dropout(self) if self.training else 0.0,
                           threshold=self.mosa_threshold if causal else None, **opts)
        if causal and self.training and plan.sparsity > 1 and plan.threshold_momentum > 0:
            self._mosa_track_threshold(x, valid)
        return y

    def _mosa_sparse_weights(self, W: HeadWeights) -> tuple:
        """Per unit: fused (E, D, (G+2)·d) Q/K/V projection, its bias (or None) and (E, G·d, D) output."""
        plan = self.mosa_plan
        G, D, d = plan.heads_per_unit, W.wq.shape[2], W.head_dim
        ids = torch.tensor(plan.mosa, device=W.wq.device)  # (E·G,) query heads, grouped by unit
        kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
        kv = torch.tensor([kv_of[h] for h in plan.mosa[::G]], device=W.wq.device)  # (E,) K/V head of each unit
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
    def _mosa_track_threshold(self, x: Tensor, valid: Tensor | None) -> None:
        """Move each unit's threshold toward the batch's (1 - 1/sparsity) quantile of its router logits."""
        target = logit_quantile(self.mosa_router, x, valid, self.mosa_plan)  # (E,)
        m = self.mosa_plan.threshold_momentum
        target = torch.where(torch.isnan(target), self.mosa_threshold.float(), target)  # rows of only padding
        self.mosa_threshold.mul_(1 - m).add_(m * target.to(self.mosa_threshold.dtype))


_CLASSES: dict[type, type] = {}


def mosa_class(base: type) -> type:
    """``MoSA<Base>``: the family's attention class with the MoSA forward in front (cached per class)."""
    if base not in _CLASSES:
        cls = type(f"MoSA{base.__name__}", (MoSAAttentionMixin, base), {})
        cls._mosa_setup_class(base)
        _CLASSES[base] = cls
    return _CLASSES[base]


def init_threshold_(threshold: Tensor, sparsity: float) -> None:
    """Causal-routing threshold for unit-RMS logits: the (1 - 1/sparsity) normal quantile (-inf at sparsity 1)."""
    from statistics import NormalDist

    with torch.no_grad():
        threshold.fill_(-math.inf if sparsity <= 1 else NormalDist().inv_cdf(1 - 1 / sparsity))


def init_router_(router: nn.Parameter) -> None:
    """Random router init: N(0, 1/D), logits of unit variance for unit-variance inputs."""
    with torch.no_grad():
        router.normal_(0.0, 1.0 / math.sqrt(router.shape[1]))


def mosa_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Converted attention modules by layer index."""
    return {int(m.layer_idx): m for m in model.modules() if hasattr(m, "mosa_plan")}
