"""Kinds that attend every recent key: full causal heads on the model's own backend (``dense``, the kept heads
of every conversion) and sliding-window heads (``local``: kept heads of a local hybrid, or the study's
sliding-window baseline for the others).

Shape legend as in base.py.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ...ops.keys import key_selection_attention
from ...ops.masks import key_padding
from ...ops.window import banded_attention
from ..costs import Dims, GroupCost, local_flops
from ..families import dense_kv_layout
from .base import Call, HeadGroup, fused_weights, project, register_heads


@register_heads("dense")
class DenseHeads(HeadGroup):
    """Full causal attention on the model's own backend (sdpa, eager, flash, ...), cached in its KV cache."""

    keeps = True

    def forward(self, layer, call: Call) -> Tensor:
        x, W = call.x, call.W
        B, T, _ = x.shape
        kv_heads, groups = dense_kv_layout(self.heads, W.num_heads, W.num_kv_heads)
        w_qkv, b_qkv, wo = layer.mosa_memo(self.role, lambda: fused_weights(W, self.heads, kv_heads))
        q, k, v = project(layer, call, w_qkv, b_qkv, len(kv_heads), W.head_dim)  # (B, n, T, d), 2 x (B, n_kv, T, d)
        if self.role == "kept" and call.cache is not None:
            k, v = call.cache.update(k, v, layer.layer_idx)
        a = self.attend(layer, call, q, k, v, groups)  # (B, T, n, d)
        return F.linear(a.reshape(B, T, -1), wo)  # (B, T, D)

    def attend(self, layer, call: Call, q, k, v, groups: int) -> Tensor:
        from transformers.modeling_utils import (
            ALL_ATTENTION_FUNCTIONS,  # (transformers' registry, per call)
        )

        fam = layer.mosa_family
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(layer.config._attn_implementation, layer.mosa_eager)
        opt = {k_: v_ for k_, v_ in (("sliding_window", fam.sliding_window(layer)),
                                     ("softcap", fam.softcap(layer))) if v_ is not None}
        dropout = fam.dropout(layer) if layer.training else 0.0
        a, _ = attend(layer, q, k, v, call.mask, dropout=dropout, scaling=fam.scaling(layer), **opt, **call.extra)
        return a

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, span = len(self.heads), dims.span(T)  # (kept heads keep the layer's own window, if any)
        rows = len(dense_kv_layout(self.heads, dims.H, dims.KV)[0]) * span
        return GroupCost(n * dims.flops(T), n * span, rows)


@register_heads("local")
class LocalHeads(DenseHeads):
    """Sliding-window heads: query t attends keys t - w + 1 .. t (w = ``window``). Kept, they cache through the
    model's cache; as the study's sparse baseline they are never cached (full forwards only)."""

    replaces = True
    windowed = True
    softcap = False
    column = "local"

    def attend(self, layer, call: Call, q, k, v, groups: int) -> Tensor:
        fam = layer.mosa_family
        T, S = q.shape[2], k.shape[2]
        w = self.window(fam.sliding_window(layer))
        scale, dropout = fam.scaling(layer), (fam.dropout(layer) if layer.training else 0.0)
        valid = key_padding(call.mask, T) if call.mask is not None else None
        if S == T and w < T:  # no cached prefix: the key-selection kernel's band, K/V shared by each group
            return key_selection_attention(q, k, v, w, scale, None, valid, None, dropout,
                                           self.plan.config.attn_backend)  # (B, T, n, d)
        return banded_attention(q, k, v, w, scale, valid, dropout, groups).transpose(1, 2)

    def decode_refusal(self) -> str | None:
        if self.role == "sparse":
            return ("layers with sparse_heads='local' (a study baseline) do not decode token by token; run full "
                    "forwards (use_cache=False)")
        return None

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, w = len(self.heads), min(self.window(dims.reach), T)
        rows = len(dense_kv_layout(self.heads, dims.H, dims.KV)[0]) * w
        return GroupCost(n * local_flops(dims.D, dims.d, T, w), n * w, rows)
