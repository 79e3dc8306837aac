"""Causal routing: per-unit router thresholds, set on calibration text and tracked during training.

Rule: MoSA unit e selects token t iff  x_t · w_e > τ_e  (or t is the row's first real token, when
``include_first``). The decision reads x_t only, and x_t depends only on tokens ≤ t, so whether t is selected
never depends on the future: a full forward, a prefill and token-by-token decoding select the same tokens.
τ_e is set so that a fraction 1/sparsity of tokens passes on average: on calibration text at conversion
(the (1 - 1/sparsity) quantile of the unit's logits on the converted model's own hidden states, layer after
layer), and in training by an exponential moving average toward each batch's quantile (the selection of a
step uses the threshold from before it, so training runs exactly the rule inference runs). Unlike
expert-choice top-k the number of tokens per unit varies from row to row; only its mean is 1/sparsity.

Everything about the thresholds lives here: their start (``init_threshold_``, ``own_threshold``: the routed kinds
create the buffer through it), calibration (``calibrate_thresholds_``, ``make_causal_``), tracking in training
(``track_threshold``, per forward; ``RoutingStatePool``, per optimizer step); the quantile math is ops/routing.py's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..ops.masks import key_padding
from ..ops.routing import budget_logits, logit_quantile, threshold_of
from .compat import StopForward
from .families import mosa_layers
from .layer_state import layer_state


def init_threshold_(threshold: Tensor, sparsity: float) -> None:
    """Causal-routing threshold for unit-RMS logits: the (1 - 1/sparsity) normal quantile (-inf at sparsity 1)."""
    from statistics import NormalDist

    with torch.no_grad():
        threshold.fill_(-math.inf if sparsity <= 1 else NormalDist().inv_cdf(1 - 1 / sparsity))


def own_threshold(layer, units: int, sparsity: float) -> None:
    """The buffer ``mosa_threshold`` (units,) of causal routing on ``layer`` (made if absent), at its start."""
    if not hasattr(layer, "mosa_threshold"):
        layer.register_buffer("mosa_threshold", torch.empty(units, device=layer.mosa_router.device,
                                                            dtype=torch.float32))
    init_threshold_(layer.mosa_threshold, sparsity)


@torch.no_grad()
def track_threshold(layer, cfg, x: Tensor, valid: Tensor | None, y: Tensor) -> None:
    """Move each routed unit's threshold of ``layer`` toward the batch's (1 - 1/sparsity) quantile of its router
    logits (``cfg``: the layer's MoSAConfig; ``y``: the routed group's output).

    Inside a ``RoutingStatePool`` (the trainer's, per optimizer step) the logits are pooled instead, and the pool
    moves the threshold once from the whole global batch. Otherwise the new value is written when the backward
    pass reaches ``y`` (at once when no backward will come): activation checkpointing recomputes the forward in
    between, and that recomputation must select with the threshold the forward selected with."""
    pool = layer_state(layer).pool
    if pool is not None:
        if not in_backward():  # a checkpointed forward recomputed: its tokens are counted already
            pool.append(budget_logits(layer.mosa_router, x, valid, cfg.include_first))
        return
    target = threshold_of(budget_logits(layer.mosa_router, x, valid, cfg.include_first), cfg.sparsity)  # (E,)
    layer_state(layer).threshold_next = moved_threshold(layer.mosa_threshold, target, cfg.threshold_momentum)
    if y.requires_grad:
        y.register_hook(lambda grad: _commit_threshold(layer))
    else:
        _commit_threshold(layer)


def moved_threshold(t: Tensor, target: Tensor, momentum: float) -> Tensor:
    """One tracking step: ``t`` moved by ``momentum`` toward ``target`` (kept where target is NaN: no token)."""
    target = torch.where(torch.isnan(target), t.float(), target)
    return t * (1 - momentum) + momentum * target.to(t.dtype)


def in_backward() -> bool:
    """Whether autograd's backward pass is running now (activation checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1


@torch.no_grad()
def _commit_threshold(layer) -> None:
    """Write the threshold a training forward computed (see ``track_threshold``); once."""
    state = layer_state(layer)
    nxt, state.threshold_next = state.threshold_next, None
    if nxt is not None:
        layer.mosa_threshold.copy_(nxt)


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
        own_threshold(m, m.mosa_router.shape[0], m.mosa_plan.config.sparsity)
    model.config.mosa = {**model.config.mosa, "routing": "causal", "threshold_momentum": momentum}
    calibrate_thresholds_(model, calibration)
    model.config.mosa_thresholds_for = model.config.mosa["sparsity"]
    return model


class RoutingStatePool:
    """Routing state from the whole global batch: while open, training forwards pool the router logits their
    thresholds would move toward (every micro-batch, this process); ``commit(gather)`` pools them across
    processes (``gather``: this process's (n, E) logits -> every process's, concatenated) and moves each
    threshold once, identically on every process, as one process with the whole batch would. The trainer
    commits once per optimizer step, after every backward (activation checkpointing recomputes its forwards
    with the threshold they ran with) and after the step is known to be finite.

        with RoutingStatePool(model) as pool:
            for step ...:
                for micro_batch ...: loss(model(ids)).backward()
                pool.commit(gather)
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in mosa_layers(model).values() if m.mosa_plan.config.routing == "causal"
                       and hasattr(m, "mosa_threshold")]

    def __enter__(self) -> "RoutingStatePool":
        for m in self.layers:
            layer_state(m).pool = []
        return self

    def __exit__(self, *exc) -> None:
        for m in self.layers:
            layer_state(m).pool = None

    @torch.no_grad()
    def commit(self, gather=None) -> None:
        """Move every threshold from the logits pooled since the last commit (all processes' with ``gather``),
        then start a new pool. Collective under ``gather``: every process calls it at the same step."""
        for m in self.layers:
            cfg, pool = m.mosa_plan.config, layer_state(m).pool
            if pool is None:
                continue
            E = m.mosa_threshold.shape[0]
            logits = torch.cat(pool) if pool else torch.zeros(0, E, device=m.mosa_threshold.device)
            if gather is not None:
                logits = gather(logits)
            if logits.shape[0]:
                target = threshold_of(logits, cfg.sparsity)
                m.mosa_threshold.copy_(moved_threshold(m.mosa_threshold, target, cfg.threshold_momentum))
            pool.clear()
