"""The hybrid attention layer that ``convert_`` puts in place of a model's own attention.

The module keeps its class (a subclass is swapped in), its parameters and their names: every head group
(heads/: dense, local, mosa, mosa_keys, streaming, pruned) reads the original q/k/v/o weights through per-head
views (see families.py), so the checkpoint stays a superset of the base one and the only new parameters are
what the kinds own: ``mosa_router`` (and the buffer ``mosa_threshold`` under causal routing), ``mosa_fill`` with
``MoSAConfig(fill='mean')``. Each group returns its contribution; the layer sums them and adds the output bias
once.

Shape legend: B batch, T tokens, D width, H query heads, KV key/value heads, d head dim, n dense heads,
E routed units (MoSA heads, or KV groups with router_granularity='kv_group'), G query heads per unit.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from .compat import find_cache
from .config import ATTN_BACKENDS, MoSAConfig
from .families import Family, mosa_layers
from .heads.base import Call, HeadGroup, head_groups
from .layer_state import layer_state


@dataclass(frozen=True)
class LayerPlan:
    """How one attention layer is split: the conversion's config and the heads resolved for this layer."""

    config: MoSAConfig
    dense: tuple[int, ...]  # query heads kept (config.kept_heads)
    mosa: tuple[int, ...]  # query heads that become config.sparse_heads
    granularity: str  # 'head' | 'kv_group': the config's, or 'head' where the dense heads split a KV group
    group_size: int = 1  # query heads per KV group of the model

    @property
    def heads_per_unit(self) -> int:
        return 1 if self.granularity == "head" else self.group_size


class MoSAAttentionMixin:
    """Forward of a converted attention layer; mixed in front of the family's attention class. The heads run as
    groups (heads/): the kept ones, then the sparse ones; their contributions are summed, the bias added once."""

    mosa_plan: LayerPlan
    mosa_family: Family
    mosa_router: nn.Parameter  # (E, D)
    mosa_fill: nn.Parameter  # (E, G·d), only with plan.config.fill == 'mean'
    mosa_observer = None  # optional callable(module, x, W, mask, cos, sin), e.g. the router warm-up loss

    @property
    def mosa_groups(self) -> tuple[HeadGroup, ...]:
        """The layer's head groups, rebuilt whenever its plan is replaced."""
        built = self.__dict__.get("_mosa_groups")
        if built is None or built[0] is not self.mosa_plan:
            built = (self.mosa_plan, head_groups(self.mosa_plan))
            self.__dict__["_mosa_groups"] = built
        return built[1]

    def forward(self, *args, **kwargs):
        p = self._mosa_signature.bind(self, *args, **kwargs).arguments
        pe = p.get("position_embeddings")
        cos, sin = pe if pe is not None else (None, None)
        call = Call(x=p["hidden_states"], W=self.mosa_family.head_weights(self), mask=p.get("attention_mask"),
                    cache=find_cache(p), cos=cos, sin=sin, extra=p.get(self._mosa_var_kw, {}))  # x: (B, T, D)
        groups = self.mosa_groups
        for group in groups:
            group.check_decode(self, call)
            group.prepare(self, call)
        if self.mosa_observer is not None and any(getattr(g, "routed", False) for g in groups):
            self.mosa_observer(self, call.x, call.W, call.mask, cos, sin)
        out = None
        for group in groups:  # each group's contribution, then the output bias once
            y = group.forward(self, call)
            if y is not None:
                out = y if out is None else out + y
        bo = call.W.bo
        if out is None:  # every head pruned
            out = torch.zeros_like(call.x) if bo is None else bo.expand_as(call.x)
        elif bo is not None:
            out = out + bo
        return self.mosa_family.output_dropout(self, out), None

    @classmethod
    def _mosa_setup_class(cls, base: type) -> None:
        cls.mosa_eager = staticmethod(sys.modules[base.__module__].eager_attention_forward)  # family's own
        cls._mosa_signature = inspect.signature(base.forward)
        cls._mosa_var_kw = next((n for n, q in cls._mosa_signature.parameters.items()
                                 if q.kind is inspect.Parameter.VAR_KEYWORD), "kwargs")

    def mosa_memo(self, name: str, build):
        """``build()``, reused across calls while no parameter of the layer changed and autograd is off.

        Gathering per-head rows copies weights; in training that is amortised over many tokens, but a decode
        step processes one token, so inference keeps the gathered copies (keyed by every parameter's storage
        and version counter: optimizer steps, loads and moves all invalidate them).
        """
        if (torch.is_grad_enabled() or any(hasattr(m, "base_layer") for m in self.children())
                or layer_state(self).sharded):
            # LoRA-wrapped projections can be switched on and off without touching parameters; FSDP gathers
            # parameters into buffers it reuses for other layers
            return build()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        memo = self.__dict__.setdefault("_mosa_cache_weights", {})
        if name in memo and memo[name][0] == key:
            return memo[name][1]
        value = build()
        memo[name] = (key, value)
        return value


_CLASSES: dict[type, type] = {}


def mosa_class(base: type) -> type:
    """``MoSA<Base>``: the family's attention class with the MoSA forward in front (cached per class)."""
    if base not in _CLASSES:
        cls = type(f"MoSA{base.__name__}", (MoSAAttentionMixin, base), {})
        cls._mosa_setup_class(base)
        _CLASSES[base] = cls
    return _CLASSES[base]


def set_attn_backend(model: nn.Module, backend: str) -> None:
    """Run the windowed heads of every converted layer with ``backend`` ('auto', 'flash', 'flex', 'math'); the
    model's saved config keeps the choice."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    layers = mosa_layers(model)
    if not layers:
        raise ValueError(f"set_attn_backend: {type(model).__name__} has no converted layer, so no attention backend "
                         "to set; convert_ it (or mosa_retrofit.load a converted checkpoint) first")
    for m in layers.values():
        m.mosa_plan = replace(m.mosa_plan, config=replace(m.mosa_plan.config, attn_backend=backend))
    mosa = getattr(getattr(model, "config", None), "mosa", None)
    if isinstance(mosa, dict):
        mosa["attn_backend"] = backend


def decode_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode with a KV cache (its head kinds decide, whatever the routing field says);
    None if it can, or if it is not converted."""
    for m in mosa_layers(model).values():
        for group in m.mosa_groups:
            why = group.decode_refusal()
            if why is not None:
                return why
    return None
