"""Causal routing: per-unit router thresholds, set on calibration text and tracked during training.

Rule: MoSA unit e selects token t iff  x_t · w_e > τ_e  (or t is the row's first real token, when
``include_first``). The decision reads x_t only, and x_t depends only on tokens ≤ t, so whether t is selected
never depends on the future: a full forward, a prefill and token-by-token decoding select the same tokens.
τ_e is set so that a fraction 1/sparsity of tokens passes on average: on calibration text at conversion
(the (1 - 1/sparsity) quantile of the unit's logits on the converted model's own hidden states, layer after
layer), and in training by an exponential moving average toward each batch's quantile (the selection of a
step uses the threshold from before it, so training runs exactly the rule inference runs). Unlike
expert-choice top-k the number of tokens per unit varies from row to row; only its mean is 1/sparsity.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..ops.masks import key_padding
from ..ops.routing import logit_quantile
from .attention import init_threshold_, mosa_layers
from .compat import StopForward


def threshold_rows(ids: Tensor, length: int | None, max_positions: int | None = None) -> Tensor:
    """Calibration token ids (N, T) regrouped into rows of ``length`` tokens (capped by ``max_positions`` and by
    the tokens there are; None: unchanged); consecutive rows of calibration text join into longer text."""
    if length is None:
        return ids
    flat = ids.reshape(-1)
    L = min(length, max_positions or length, flat.numel())
    return flat[: flat.numel() // L * L].view(-1, L)


@torch.no_grad()
def calibrate_thresholds_(model: nn.Module, calibration: Tensor | None) -> None:
    """Set every causal MoSA unit's threshold from calibration token ids (N, T) in one forward pass.

    Layer l's threshold is set from its input before its MoSA heads run, so later layers see inputs made
    with the thresholds already in place; the pass stops after the last converted layer.
    """
    layers = {i: m for i, m in mosa_layers(model).items()
              if m.mosa_plan.config.routing == "causal" and hasattr(m, "mosa_router")}  # (baselines have no routers)
    if not layers or calibration is None:
        return
    last = max(layers)

    def observe(module, x, W, mask, cos, sin):
        plan = module.mosa_plan
        if plan.config.sparsity > 1:
            tau = logit_quantile(module.mosa_router, x, key_padding(mask, x.shape[1]), plan.config.sparsity,
                                 plan.config.include_first)
            module.mosa_threshold.copy_(tau.to(module.mosa_threshold.dtype))
        if module.layer_idx == last:
            raise StopForward

    was_training = model.training
    model.eval()
    for m in layers.values():
        m.mosa_observer = observe
    try:
        model(input_ids=calibration.to(next(model.parameters()).device), use_cache=False)
    except StopForward:
        pass
    finally:
        for m in layers.values():
            m.__dict__.pop("mosa_observer", None)
        model.train(was_training)


def make_causal_(model: nn.Module, calibration: Tensor | None, momentum: float = 0.05) -> nn.Module:
    """Switch an expert-choice converted model (e.g. one adapted that way) to causal routing, in place.

    Routers are kept; thresholds are set on ``calibration`` token ids (N, T) (or the normal quantile if None).
    """
    layers = mosa_layers(model)
    if not layers:
        raise ValueError("the model has no MoSA layers; convert it first")
    for m in layers.values():
        m.mosa_plan = dataclasses.replace(m.mosa_plan, config=dataclasses.replace(
            m.mosa_plan.config, routing="causal", threshold_momentum=momentum))
        if not hasattr(m, "mosa_threshold"):
            m.register_buffer("mosa_threshold", torch.empty(m.mosa_router.shape[0], device=m.mosa_router.device))
        init_threshold_(m.mosa_threshold, m.mosa_plan.config.sparsity)
    model.config.mosa = {**model.config.mosa, "routing": "causal", "threshold_momentum": momentum}
    calibrate_thresholds_(model, calibration)
    return model
