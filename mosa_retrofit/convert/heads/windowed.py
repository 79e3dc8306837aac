"""Windowed kinds: every query sees the first ``sink_tokens`` real tokens of its row (attention sinks), its last
``window`` tokens and, for key-selection MoSA heads, the tokens its unit routed: one softmax over those keys,
an output at every token (no fill). ``streaming`` (DuoAttention's streaming heads, a baseline: sinks + window)
and ``mosa_keys`` (key selection, a departure from the paper: its router selects tokens as keys) share the
forward; they differ in what they keep beyond the window. Every forward runs the key-selection op (ops/keys.py);
with a cache a store keeps per unit what a later query can still see (window_store.py) and the op reads it, so
prefill + token-by-token decoding computes what a full forward computes. Units are the plan's (a KV group's
heads share K/V, or one head each).

Shape legend as in base.py; M far keys (sinks and routed tokens) per unit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.keys import far_keys, key_selection_attention, window_chunk_attention, window_step_attention
from ...ops.masks import key_padding
from ...ops.routing import first_real, tokens_per_head
from ..cache import layer_store
from ..costs import Dims, GroupCost, keys_flops
from ..families import head_to_kv
from .base import Call, HeadGroup, fused_weights, project, register_heads
from .routed import RoutedUnits


class WindowedHeads(HeadGroup):
    """The forward of windowed kinds; ``selected`` says what a unit keeps besides its sinks (nothing here)."""

    replaces = True
    windowed = True
    softcap = False
    column = "local"

    @property
    def unit_size(self) -> int:
        return self.plan.heads_per_unit

    def prepare(self, layer, call: Call) -> None:
        if call.cache is not None and (not self.routed or self.causal):
            call.store = layer_store(call.cache, layer.layer_idx)

    def selected(self, layer, x: Tensor, valid: Tensor | None, first: Tensor) -> tuple[Tensor, Tensor | None]:
        """(E, B, T) tokens each unit keeps besides its sinks, and the gates of their values (None: no router)."""
        E, (B, T) = len(self.units), x.shape[:2]
        return torch.zeros(E, B, T, dtype=torch.bool, device=x.device), None

    def forward(self, layer, call: Call) -> Tensor:
        fam, cfg, x, W = layer.mosa_family, self.plan.config, call.x, call.W
        B, T, _ = x.shape
        kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
        unit_kv = tuple(kv_of[u[0]] for u in self.units)  # (E,) the K/V head each unit reads
        w_qkv, b_qkv, wo = layer.mosa_memo(self.kind, lambda: fused_weights(W, self.heads, unit_kv))
        q, k, v = project(layer, call, w_qkv, b_qkv, len(unit_kv), W.head_dim)  # (B, E·G, T, d), 2 x (B, E, T, d)

        host = call.store  # the layer's LayerStore (None: no cache)
        valid = key_padding(call.mask, T)
        real = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        offset, seen_real = host.advance(real) if host is not None else (0, None)
        first = first_real(real, seen_real)  # (B, T)
        index = real.long().cumsum(-1) - 1 + (seen_real[:, None] if seen_real is not None else 0)
        sink = real & (index < cfg.sink_tokens)  # (B, T) the row's first real tokens
        chosen, gate = self.selected(layer, x, valid, first)  # (E, B, T) bool, (E, B, T) or None
        keep = chosen | sink  # (E, B, T) rows every later query sees
        reach = fam.sliding_window(layer)  # the layer's own window (Gemma, Mistral), if any
        w = self.window(reach)
        scale, dropout = fam.scaling(layer), (fam.dropout(layer) if layer.training else 0.0)
        store = host.window_store(w, reach) if host is not None else None
        if store is not None:  # what the store takes: K/V as they are, values of sinks ungated
            g = None if gate is None else torch.where(sink[None], torch.ones_like(gate), gate).detach()
            k_e, v_e = k.detach().transpose(0, 1), v.detach().transpose(0, 1)  # (E, B, T, d)
        if store is None or store.k is None:  # nothing cached before these tokens: the key-selection kernel
            a = self.attend_full(q, k, v, keep, sink, gate, valid, w, reach, scale, dropout, cfg.attn_backend)
            a = a.reshape(B, T, -1)  # (B, T, E·G·d)
            if store is not None:
                store.next_pos = offset
                store.absorb(k_e, v_e, keep, g, real)
        elif T == 1:  # decoding: one ring slot written, [ring | far rows] read in one call
            store.absorb(k_e, v_e, keep, g, real)
            a = window_step_attention(q, *store.step_rows(), scale, reach)
        else:  # a chunk after earlier tokens: [ring | chunk], the far rows before its kept ones
            a = window_chunk_attention(q, store.sequence(k_e, v_e, keep, g, real), store.far(store.next_pos - w),
                                       w, scale, reach, cfg.attn_backend)
            store.absorb(k_e, v_e, keep, g, real)
        y = F.linear(a, wo)  # (B, T, D)
        if self.routed and self.tracks_threshold(layer):
            self.track_threshold(layer, x, valid, y)
        return y

    @staticmethod
    def attend_full(q, k, v, keep, sink, gate, valid, w, reach, scale, dropout, backend) -> Tensor:
        """Window + far keys (the kept rows: sinks and routed tokens, gathered once per unit): (B, T, E·G, d)."""
        if gate is not None:  # routed values carry the router gate (sinks do not)
            gate = torch.where(sink[None].expand_as(gate), torch.ones_like(gate), gate)  # (E, B, T)
        far = far_keys(k.transpose(0, 1), v.transpose(0, 1), keep, gate)  # (from (E, B, T, d) views)
        return key_selection_attention(q, k, v, w, scale, far, valid, reach, dropout, backend)


@register_heads("streaming")
class StreamingHeads(WindowedHeads):
    """DuoAttention's streaming heads (a baseline): sinks + a recent window, no router; they decode with a cache
    of (sinks + window) rows per unit."""

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, w = len(self.heads), min(self.window(dims.reach), T)
        s = min(self.plan.config.sink_tokens, max(dims.span(T) - w, 0))  # (sinks beyond the layer's reach: unseen)
        return GroupCost(n * keys_flops(dims.D, dims.d, T, w, s), n * (w + s), len(self.units) * (w + s))


@register_heads("mosa_keys")
class MoSAKeysHeads(RoutedUnits, WindowedHeads):
    """Key-selection MoSA heads: each unit's router selects tokens as *keys*; every query attends the sinks, its
    recent window and the routed tokens before it. Routed values are multiplied by the router gate (its gradient
    path; ×1 forward with straight-through scores). Attention costs T·(w + s + k) instead of k², the cache holds
    window + sinks + routed rows."""

    column = "mosa"
    far_router = True

    def decode_refusal(self) -> str | None:
        if self.plan.config.router_score != "straight_through":
            return ("MoSA heads 'mosa_keys' decode token by token with router_score='straight_through' only "
                    "(sigmoid gates scale routed values differently inside and beyond the window); run full "
                    "forwards (use_cache=False)")
        return super().decode_refusal()

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, w = len(self.heads), min(self.window(dims.reach), T)
        k = tokens_per_head(T, self.plan.config.sparsity)
        far = max(dims.span(T) - w, 0)  # far keys a query can see: before its window, within the layer's reach
        s = min(self.plan.config.sink_tokens, far)
        k_far = min(k, far)  # routed tokens that can lie before a window
        rows = len(self.units) * (w + s + k_far)
        return GroupCost(n * keys_flops(dims.D, dims.d, T, w, s + k_far / 2) + len(self.units) * 2 * dims.D * T,
                         n * (w + s + k_far), rows)
