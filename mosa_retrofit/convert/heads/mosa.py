"""``mosa``: the paper's MoSA heads. Each unit (a head, or a KV group) attends only the tokens its router selects
and writes only there (ops/sparse.py); with causal routing a cache keeps only those tokens' K/V (cache.py's
store, which the same ops/sparse.mosa_attention reads and extends as its ``past``).

Shape legend as in base.py; K selected tokens per unit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops.masks import key_padding
from ...ops.routing import tokens_per_head
from ...ops.sparse import Past, mosa_attention
from ..cache import layer_store
from ..costs import Dims, GroupCost, mosa_flops
from ..families import HeadWeights, head_to_kv
from .base import Call, HeadGroup, register_heads
from .routed import RoutedUnits


@register_heads("mosa")
class MoSAHeads(RoutedUnits, HeadGroup):
    replaces = True
    fills = True
    column = "mosa"

    def prepare(self, layer, call: Call) -> None:
        """Takes the layer's sparse K/V store in this forward's cache (causal routing) before the kept heads
        write the cache."""
        if self.causal and call.cache is not None:
            call.store = layer_store(call.cache, layer.layer_idx)

    def forward(self, layer, call: Call) -> Tensor:
        fam, cfg, x, W = layer.mosa_family, self.plan.config, call.x, call.W
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
        opts = dict(heads_per_unit=self.unit_size, b_qkv=b_qkv, include_first=cfg.include_first,
                    router_score=cfg.router_score, rope=rope, q_norm=q_norm, k_norm=k_norm,
                    scale=fam.scaling(layer) * fam.query_prescale(layer), softcap=fam.softcap(layer),
                    sliding_window=fam.sliding_window(layer), fill=layer.mosa_fill if cfg.fill == "mean" else None)
        valid = key_padding(call.mask, T)
        if self.causal and call.store is not None:  # after the tokens the cache holds: the store is the past
            real = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            offset, seen_real = call.store.advance(real)
            with torch.no_grad():
                return mosa_attention(x, layer.mosa_router, w_qkv, w_o, sparsity=cfg.sparsity, attention_mask=real,
                                      threshold=layer.mosa_threshold, past=Past(call.store.routed_store(), offset,
                                                                                seen_real), **opts)
        y = mosa_attention(x, layer.mosa_router, w_qkv, w_o, sparsity=cfg.sparsity, attention_mask=valid,
                           dropout_p=fam.dropout(layer) if layer.training else 0.0,
                           threshold=layer.mosa_threshold if self.causal else None, **opts)
        if self.tracks_threshold(layer):
            self.track_threshold(layer, x, valid, y)
        return y

    def weights(self, W: HeadWeights) -> tuple:
        """Per unit: fused (E, D, (G+2)·d) Q/K/V projection, its bias (or None) and (E, G·d, D) output."""
        G, D, d = self.unit_size, W.wq.shape[2], W.head_dim
        ids = torch.tensor(self.heads, device=W.wq.device)  # (E·G,) query heads, grouped by unit
        kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
        kv = torch.tensor([kv_of[u[0]] for u in self.units], device=W.wq.device)  # (E,) K/V head of each unit
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

    def cost(self, T: int, dims: Dims) -> GroupCost:
        n, k = len(self.heads), tokens_per_head(T, self.plan.config.sparsity)
        return GroupCost(n * mosa_flops(dims.D, dims.d, T, k), n * k, len(self.units) * k)
