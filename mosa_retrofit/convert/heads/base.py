"""What every kind of head group shares: the registry, the call a converted layer hands its groups, the base
class (what a kind declares and the questions it answers) and the fused projection of a group's heads.

A converted layer holds two groups, built from its ``LayerPlan``: the *kept* heads (``plan.dense``, of kind
``config.kept_heads``) and the *sparse* heads (``plan.mosa``, of kind ``config.sparse_heads``). A kind is one
registered class; everything specific to it lives there:

* what it declares (class attributes): whether it may be kept or replace heads, whether it owns routers
  (``mosa_router``; ``mosa_threshold`` under causal routing) or a fill (``mosa_fill``), whether it attends a
  recent window, whether it runs soft-capped layers, what its calibrated routers are fitted to, and its column
  in the cost tables (the fields of ``kinds.Declared``). ``MoSAConfig`` validates its words against these
  declarations (published by mosa_retrofit/kinds.py, whose ``REGISTRY`` is this registry, without importing a
  kernel), ``convert_`` creates the parameters a kind owns, the cost model asks the kind;
* what it answers: ``forward(layer, call)`` (its contribution to the layer output, bias excluded: the layer
  adds the output bias once), ``cost(T, dims)``, ``check_decode`` and ``prepare`` (before any group writes the
  cache).

A new kind is one class with ``@register_heads("name")``; no other file changes. Groups hold no parameters:
they read the layer's own weights (per-head views, families.py) and its MoSA parameters, so checkpoints keep
their names.

Shape legend: B batch, T tokens, D width, H query heads, KV key/value heads, d head dim, n heads of the group,
E units (routed units, or a windowed group's KV groups), G query heads per unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kinds import BUILT_IN, REGISTRY, Declared, kinds
from ...ops.rope import apply_rope
from ..costs import Dims, GroupCost
from ..families import HeadWeights

HEAD_GROUPS: dict[str, type[HeadGroup]] = REGISTRY  # (the registry kinds.py publishes to MoSAConfig)
__all__ = ["HEAD_GROUPS", "Call", "HeadGroup", "head_groups", "kinds", "register_heads", "split_units"]


def register_heads(kind: str):
    """Class decorator: ``kind`` is the word a ``MoSAConfig`` uses for this group (kept_heads / sparse_heads).
    A built-in kind's class must declare what kinds.BUILT_IN says it does."""
    def wrap(cls):
        if kind in BUILT_IN and Declared.of(cls) != BUILT_IN[kind]:
            raise TypeError(f"{cls.__name__} declares {Declared.of(cls)}; the built-in kind {kind!r} is published "
                            f"as {BUILT_IN[kind]} (mosa_retrofit/kinds.py)")
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
    store: object = None  # the layer's sparse state in ``cache``, a cache.LayerStore (set by ``prepare``)


def split_units(heads: tuple[int, ...], per_unit: int) -> list[list[int]]:
    """The group's heads in units of ``per_unit`` consecutive heads (a KV group's heads, or one head each)."""
    return [list(heads[i: i + per_unit]) for i in range(0, len(heads), per_unit)]


@dataclass
class HeadGroup:
    heads: tuple[int, ...]
    plan: object  # the layer's LayerPlan
    role: str  # 'kept' (plan.dense) or 'sparse' (plan.mosa)

    kind: ClassVar[str]
    keeps: ClassVar[bool] = False  # may be MoSAConfig.kept_heads
    replaces: ClassVar[bool] = False  # may be MoSAConfig.sparse_heads
    routed: ClassVar[bool] = False  # owns routers (mosa_router; mosa_threshold under causal routing)
    fills: ClassVar[bool] = False  # owns a fill (mosa_fill, with fill='mean') where it writes no output
    windowed: ClassVar[bool] = False  # attends a recent window of config.local_window tokens
    softcap: ClassVar[bool] = True  # runs layers with attention-logit soft-capping (Gemma2)
    far_router: ClassVar[bool] = False  # calibrated routers fit the attention a token gets from beyond the window
    column: ClassVar[str] = "dense"  # its column in the cost tables: dense | local | mosa | pruned

    @property
    def unit_size(self) -> int:
        """Query heads per unit: one, unless the kind routes or windows per KV group (plan.heads_per_unit)."""
        return 1

    @property
    def units(self) -> list[list[int]]:
        return split_units(self.heads, self.unit_size)

    @staticmethod
    def window_for(config, reach: int | None) -> int:
        """The recent window a windowed group attends: config.local_window, within the layer's own ``reach``."""
        return min(config.local_window, reach) if reach is not None else config.local_window

    def window(self, reach: int | None) -> int:
        return self.window_for(self.plan.config, reach)

    # -- what the kind owns on the layer: created (and fitted) by convert_, started afresh on a partial load

    def own(self, layer, weights: HeadWeights, stats=None, window: int | None = None) -> None:
        """Create on ``layer`` the tensors this kind owns, fitted from the layer's calibration ``stats`` when
        given (``window``: the recent window the kind attends), else at their starting values for a checkpoint
        to fill. The base: a kind that fills (``fills``) owns ``mosa_fill`` (E, G·d) with ``fill='mean'``: the
        units' mean output, or zeros."""
        if not (self.fills and self.plan.config.fill == "mean"):
            return
        ref = weights.wq
        layer.mosa_fill = nn.Parameter(torch.zeros(len(self.units), self.unit_size * weights.head_dim,
                                                   device=ref.device, dtype=ref.dtype))
        if stats is not None:
            with torch.no_grad():
                layer.mosa_fill.copy_(stats.mean_output(self.units).to(ref.dtype))

    def restart(self, layer, name: str, tensor: Tensor) -> str | None:
        """Give ``tensor``, the layer's ``name`` (a tensor this kind owns that a checkpoint lacked), its starting
        value; says which (None: not this kind's)."""
        if name == "mosa_fill" and self.fills:
            tensor.data.zero_()
            return "left at zero"
        return None

    def forward(self, layer, call: Call) -> Tensor | None:
        """The group's contribution to the layer output (B, T, D), without the output bias; None: nothing."""
        raise NotImplementedError

    def cost(self, T: int, dims: Dims) -> GroupCost:
        raise NotImplementedError

    def decode_refusal(self) -> str | None:
        """Why this group cannot continue a cache that already holds tokens (None: it can). The one place that
        decides whether a converted model decodes with a cache (``generate``, ``bench generate``, the demo)."""
        return None

    def check_decode(self, layer, call: Call) -> None:
        """Raise if this group cannot continue a cache that already holds tokens."""
        if call.cache is not None and call.cache.get_seq_length(layer.layer_idx) > 0:
            why = self.decode_refusal()
            if why is not None:
                raise ValueError(why)

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


def project(layer, call: Call, w_qkv: Tensor, b_qkv: Tensor | None, n_kv: int,
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


def fused_weights(W: HeadWeights, heads: tuple[int, ...], kv_heads: tuple[int, ...]) -> tuple:
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
