"""What routed kinds share (the paper's MoSA heads and key-selection heads): units of a head or a KV group, each
with a router row; the tokens a unit selects, by expert choice or by causal thresholds (ops/routing.py); the
thresholds a training forward moves; and why expert choice cannot decode.

Shape legend as in base.py; K selected tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops.routing import (
    causal_select,
    logit_quantile,
    router_gates,
    router_logits,
    select_tokens,
)


class RoutedUnits:
    """Mixed into a HeadGroup kind whose units route (``layer.mosa_router`` (E, D), ``layer.mosa_threshold``)."""

    routed = True

    @property
    def unit_size(self) -> int:
        return self.plan.heads_per_unit

    @property
    def causal(self) -> bool:
        return self.plan.config.routing == "causal"

    def decode_refusal(self) -> str | None:
        if not self.causal:
            return (f"MoSA heads '{self.kind}' with expert-choice routing cannot decode token by token (top-k looks "
                    "at the whole sequence); convert with MoSAConfig(routing='causal') to generate, or run full "
                    "forwards (use_cache=False)")
        return None

    def selected(self, layer, x: Tensor, valid: Tensor | None, first: Tensor) -> tuple[Tensor, Tensor]:
        """(E, B, T) bool: the tokens each unit selects, and (E, B, T) the gates of every token's row."""
        cfg = self.plan.config
        logits = router_logits(layer.mosa_router, x)  # (E, B, T)
        if self.causal:
            chosen = causal_select(logits, layer.mosa_threshold, valid, first if cfg.include_first else None)
        else:
            sel = select_tokens(logits, cfg.sparsity, cfg.include_first, valid)
            hit = torch.ones_like(sel.idx, dtype=torch.bool) if sel.live is None else sel.live
            chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, sel.idx, hit)
        return chosen, router_gates(logits, cfg.router_score)

    def tracks_threshold(self, layer) -> bool:
        cfg = self.plan.config
        return self.causal and layer.training and cfg.sparsity > 1 and cfg.threshold_momentum > 0

    @torch.no_grad()
    def track_threshold(self, layer, x: Tensor, valid: Tensor | None, y: Tensor) -> None:
        """Move each unit's threshold toward the batch's (1 - 1/sparsity) quantile of its router logits.

        The new value is written when the backward pass reaches this group's output ``y`` (at once when no
        backward will come): activation checkpointing recomputes the forward in between, and that recomputation
        must select with the threshold the forward selected with."""
        cfg = self.plan.config
        target = logit_quantile(layer.mosa_router, x, valid, cfg.sparsity, cfg.include_first)  # (E,)
        m, t = cfg.threshold_momentum, layer.mosa_threshold
        target = torch.where(torch.isnan(target), t.float(), target)  # rows of only padding
        layer._mosa_threshold_next = t * (1 - m) + m * target.to(t.dtype)
        if y.requires_grad:
            y.register_hook(lambda grad: _commit_threshold(layer))
        else:
            _commit_threshold(layer)


@torch.no_grad()
def _commit_threshold(layer) -> None:
    """Write the threshold a training forward computed (see ``RoutedUnits.track_threshold``); once."""
    nxt = layer.__dict__.pop("_mosa_threshold_next", None)
    if nxt is not None:
        layer.mosa_threshold.copy_(nxt)
