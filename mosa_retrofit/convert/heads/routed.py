"""What routed kinds share (the paper's MoSA heads and key-selection heads): units of a head or a KV group, each
with a router row; the tokens a unit selects, by expert choice or by causal thresholds (ops/routing.py; the
thresholds themselves, set and tracked: thresholds.py); and why expert choice cannot decode.

Shape legend as in base.py; K selected tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...ops.routing import causal_select, router_gates, router_logits, select_tokens
from ..thresholds import init_threshold_, own_threshold, track_threshold


def init_router_(router: nn.Parameter) -> None:
    """Random router init: N(0, 1/D), logits of unit variance for unit-variance inputs."""
    with torch.no_grad():
        router.normal_(0.0, 1.0 / math.sqrt(router.shape[1]))


class RoutedUnits:
    """Mixed into a HeadGroup kind whose units route (``layer.mosa_router`` (E, D), ``layer.mosa_threshold``)."""

    routed = True

    @property
    def unit_size(self) -> int:
        return self.plan.heads_per_unit

    @property
    def causal(self) -> bool:
        return self.plan.config.routing == "causal"

    def own(self, layer, weights, stats=None, window: int | None = None) -> None:
        """What the kind's base owns, then ``mosa_router`` (E, D): fitted to the calibration ``stats`` with
        ``router_init='calibrated'`` (to the attention beyond ``window`` for far routers), else random; under
        causal routing the buffer ``mosa_threshold`` (E,) too, at the normal quantile of the sparsity (the
        calibration text sets it later, thresholds.py)."""
        super().own(layer, weights, stats, window)
        cfg, ref = self.plan.config, weights.wq
        layer.mosa_router = nn.Parameter(torch.empty(len(self.units), ref.shape[2], device=ref.device,
                                                     dtype=ref.dtype))
        if stats is not None and cfg.router_init == "calibrated":
            with torch.no_grad():
                layer.mosa_router.copy_(stats.fit_router(self.units, cfg.fill, window=window).to(ref.dtype))
        else:
            init_router_(layer.mosa_router)
        if self.causal:
            own_threshold(layer, len(self.units), cfg.sparsity)

    def restart(self, layer, name: str, tensor: Tensor) -> str | None:
        if name == "mosa_router":
            init_router_(tensor)
            return "initialised at random"
        if name == "mosa_threshold":
            init_threshold_(tensor, self.plan.config.sparsity)
            return "set to the normal quantile of the sparsity"
        return super().restart(layer, name, tensor)

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

    def track_threshold(self, layer, x: Tensor, valid: Tensor | None, y: Tensor) -> None:
        """Move each unit's threshold toward this batch's quantile (thresholds.track_threshold)."""
        track_threshold(layer, self.plan.config, x, valid, y)
