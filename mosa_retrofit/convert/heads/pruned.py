"""``pruned``: removed heads (a study baseline): they contribute nothing, or their calibrated mean output with
``fill='mean'``."""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops.sparse import fill_output
from ..costs import Dims, GroupCost
from .base import Call, HeadGroup, register_heads


@register_heads("pruned")
class PrunedHeads(HeadGroup):
    replaces = True
    fills = True
    column = "pruned"

    def forward(self, layer, call: Call) -> Tensor | None:
        if self.plan.config.fill != "mean":
            return None
        ids = torch.tensor(self.heads, device=call.x.device)
        f = fill_output(layer.mosa_fill, call.W.wo[:, ids].permute(1, 2, 0))  # (D,) from (n, d) and (n, d, D)
        return f.expand_as(call.x)

    def cost(self, T: int, dims: Dims) -> GroupCost:
        return GroupCost(0, 0, 0)
