"""Per-architecture knowledge, one small adapter per family, looked up by ``config.model_type``.

An adapter answers: which modules are self-attention, where each head's W_q/W_k/W_v/W_o (and biases)
live, and the few per-family settings (norms, scaling, soft-capping, dropout). The math never branches on
the family. Every weight returned is a *view* of the model's own parameters (gradients flow into them);
shapes: H query heads, KV key/value heads, d head dim, D model width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class HeadWeights:
    wq: Tensor  # (H, d, D)
    wk: Tensor  # (KV, d, D)
    wv: Tensor  # (KV, d, D)
    wo: Tensor  # (D, H, d): head h writes through wo[:, h, :]
    bq: Tensor | None = None  # (H, d)
    bk: Tensor | None = None  # (KV, d)
    bv: Tensor | None = None  # (KV, d)
    bo: Tensor | None = None  # (D,), added once per layer

    @property
    def num_heads(self) -> int:
        return self.wq.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.wk.shape[0]

    @property
    def head_dim(self) -> int:
        return self.wq.shape[1]


FAMILIES: dict[str, Family] = {}


def register_family(*model_types: str):
    def wrap(cls):
        for t in model_types:
            FAMILIES[t] = cls()
        cls.model_types = model_types
        return cls

    return wrap


def family_of(model: nn.Module) -> Family:
    """The adapter for ``model``; a ValueError listing the supported families if there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model family {model_type!r} ({type(model).__name__}); supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def attention_layers(model: nn.Module, family: Family | None = None) -> dict[int, tuple[str, nn.Module]]:
    """``{layer_idx: (qualified name, module)}`` of the model's self-attention modules."""
    family = family or family_of(model)
    found = {}
    for name, m in model.named_modules():
        if family.is_attention(m):
            found[int(m.layer_idx)] = (name, m)
    return found


def mosa_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Converted attention modules by layer index (those that carry a ``mosa_plan``)."""
    return {int(m.layer_idx): m for m in model.modules() if hasattr(m, "mosa_plan")}


def weight_of(linear: nn.Module) -> Tensor:
    """``linear.weight``, plus the active LoRA deltas when peft has wrapped the layer (differentiable)."""
    base = getattr(linear, "base_layer", None)
    if base is None or not hasattr(linear, "get_delta_weight"):
        return linear.weight
    w = base.weight
    if getattr(linear, "disable_adapters", False) or getattr(linear, "merged", False):
        return w
    for name in linear.active_adapters:
        if name in getattr(linear, "lora_A", {}):
            w = w + linear.get_delta_weight(name)
    return w


def _bias(linear: nn.Module, shape: tuple[int, ...]) -> Tensor | None:
    return None if getattr(linear, "bias", None) is None else linear.bias.view(shape)


class Family:
    """Llama layout: separate q_proj/k_proj/v_proj/o_proj Linears, called with keyword arguments."""

    model_types: tuple[str, ...] = ()
    attention_suffix = "Attention"
    o_name = "o_proj"

    def is_attention(self, module: nn.Module) -> bool:
        return (type(module).__name__.endswith(self.attention_suffix) and hasattr(module, "layer_idx")
                and not getattr(module, "is_cross_attention", False))

    def dims(self, m: nn.Module) -> tuple[int, int, int]:
        H = m.config.num_attention_heads
        KV = getattr(m.config, "num_key_value_heads", None) or H
        return H, KV, m.head_dim

    def head_weights(self, m: nn.Module) -> HeadWeights:
        H, KV, d = self.dims(m)
        o = getattr(m, self.o_name)
        D = o.weight.shape[0]
        return HeadWeights(
            wq=weight_of(m.q_proj).view(H, d, D), wk=weight_of(m.k_proj).view(KV, d, D),
            wv=weight_of(m.v_proj).view(KV, d, D), wo=weight_of(o).view(D, H, d), bq=_bias(m.q_proj, (H, d)), bk=_bias(m.k_proj, (KV, d)),
            bv=_bias(m.v_proj, (KV, d)), bo=getattr(o, "bias", None),
        )

    def norms(self, m: nn.Module):
        return getattr(m, "q_norm", None), getattr(m, "k_norm", None)

    def query_prescale(self, m: nn.Module) -> float:
        return 1.0

    def scaling(self, m: nn.Module) -> float:
        return m.scaling

    def softcap(self, m: nn.Module) -> float | None:
        return getattr(m, "attn_logit_softcapping", None)

    def sliding_window(self, m: nn.Module) -> int | None:
        return getattr(m, "sliding_window", None)

    def dropout(self, m: nn.Module) -> float:
        return float(getattr(m, "attention_dropout", 0.0) or 0.0)

    def output_dropout(self, m: nn.Module, y: Tensor) -> Tensor:
        return y


@register_family("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
class LlamaLike(Family):
    pass


@register_family("phi3")
class Phi3(Family):
    """Fused ``qkv_proj`` with blocked rows [q (H·d) | k (KV·d) | v (KV·d)]."""

    def head_weights(self, m: nn.Module) -> HeadWeights:
        H, KV, d = self.dims(m)
        w = weight_of(m.qkv_proj)
        D = w.shape[1]
        return HeadWeights(wq=w[: H * d].view(H, d, D), wk=w[H * d: (H + KV) * d].view(KV, d, D),
                           wv=w[(H + KV) * d:].view(KV, d, D), wo=weight_of(m.o_proj).view(D, H, d),
                           bo=getattr(m.o_proj, "bias", None))


@register_family("gpt_neox")
class GPTNeoX(Family):
    """Fused ``query_key_value`` interleaved per head: rows (H, [q|k|v], d); output ``dense``."""

    o_name = "dense"

    def dims(self, m: nn.Module) -> tuple[int, int, int]:
        H = m.config.num_attention_heads
        return H, H, m.head_size

    def head_weights(self, m: nn.Module) -> HeadWeights:
        H, _, d = self.dims(m)
        w = weight_of(m.query_key_value)
        D = w.shape[1]
        w = w.view(H, 3, d, D)
        b = None if m.query_key_value.bias is None else m.query_key_value.bias.view(H, 3, d)
        return HeadWeights(wq=w[:, 0], wk=w[:, 1], wv=w[:, 2], wo=weight_of(m.dense).view(D, H, d),
                           bq=None if b is None else b[:, 0], bk=None if b is None else b[:, 1],
                           bv=None if b is None else b[:, 2], bo=m.dense.bias)


@register_family("gpt2")
class GPT2(Family):
    """Conv1D layers store (in, out): ``c_attn`` (D, 3D) split [q|k|v], ``c_proj`` (D, D)."""

    def dims(self, m: nn.Module) -> tuple[int, int, int]:
        return m.num_heads, m.num_heads, m.head_dim

    def head_weights(self, m: nn.Module) -> HeadWeights:
        H, _, d = self.dims(m)
        w = weight_of(m.c_attn).t()  # (3D, D)
        D = w.shape[1]
        b = m.c_attn.bias.view(3, H, d)
        return HeadWeights(wq=w[:D].view(H, d, D), wk=w[D: 2 * D].view(H, d, D), wv=w[2 * D:].view(H, d, D),
                           wo=weight_of(m.c_proj).t().view(D, H, d), bq=b[0], bk=b[1], bv=b[2], bo=m.c_proj.bias)

    def dropout(self, m: nn.Module) -> float:
        return m.attn_dropout.p

    def output_dropout(self, m: nn.Module, y: Tensor) -> Tensor:
        return m.resid_dropout(y)


@register_family("opt")
class OPT(Family):
    """``out_proj`` output; q is pre-scaled by ``scaling`` and the backend gets scaling 1."""

    o_name = "out_proj"

    def dims(self, m: nn.Module) -> tuple[int, int, int]:
        return m.num_heads, m.num_heads, m.head_dim

    def query_prescale(self, m: nn.Module) -> float:
        return m.scaling

    def scaling(self, m: nn.Module) -> float:
        return 1.0

    def dropout(self, m: nn.Module) -> float:
        return float(m.dropout)


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def head_to_kv(num_heads: int, num_kv_heads: int) -> list[int]:
    """KV head of every query head (query heads are grouped by KV head, as ``repeat_kv`` lays them out)."""
    group = num_heads // num_kv_heads
    return [h // group for h in range(num_heads)]


@functools.lru_cache(maxsize=None)  # read on every forward (decode steps included); pure
def dense_kv_layout(dense: tuple[int, ...], num_heads: int, num_kv_heads: int) -> tuple[tuple[int, ...], int]:
    """KV heads the dense heads read, and the query heads per KV head for the backend's ``repeat_kv``.

    When every used KV head serves the same number g of dense heads (e.g. whole GQA groups), the cache keeps
    one K/V per KV head (groups = g); otherwise each dense head gets its own copy (groups = 1).
    """
    kv_of = [head_to_kv(num_heads, num_kv_heads)[h] for h in dense]
    used = sorted(set(kv_of))
    counts = {u: kv_of.count(u) for u in used}
    g = counts[used[0]]
    if all(c == g for c in counts.values()):
        return tuple(used), g
    return tuple(kv_of), 1
