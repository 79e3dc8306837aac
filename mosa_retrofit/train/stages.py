"""Training stages, one small class per kind, found in a registry (``StageSpec.kind`` names one).

A stage says what its loss is and what runs around the steps (hooks on the model); what trains is the
recipe's ``trainable`` / ``lora`` choice, the same for every kind. A new kind is a class registered with
``@register_stage("name")`` (and its name added to ``recipe.STAGE_KINDS`` so recipes accept it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.families import mosa_layers
from .distill import LayerDistill
from .warmup import RouterWarmup

STAGES: dict[str, type[Stage]] = {}


def register_stage(kind: str):
    def wrap(cls):
        STAGES[kind] = cls
        cls.kind = kind
        return cls
    return wrap


class Stage:
    """One stage of a run: ``context()`` is entered around its steps, ``loss(net, ids, answers)`` gives each step's
    loss (``answers``: (B, L) bool, the tokens that answer the questions of ``data.needles``, or None)."""

    local = False
    """A layer-local loss: the model runs without the data-parallel wrapper, gradients are averaged by hand."""
    shardable = True
    """Runs on a model sharded by FSDP (``training.distributed: fsdp``); sharding starts at the first such stage."""
    converted_only = False
    """Its loss exists only for a converted model (routers, converted layers): a control run passes over it."""

    def __init__(self, spec, student: nn.Module, teacher: nn.Module | None, acc):
        self.spec, self.student, self.teacher, self.acc = spec, student, teacher, acc
        self.observer = None

    def context(self):
        return contextlib.nullcontext()

    def loss(self, net: nn.Module, ids: Tensor, answers: Tensor | None = None) -> tuple[Tensor, dict]:
        raise NotImplementedError


@register_stage("router_warmup")
class RouterWarmupStage(Stage):
    """Only routers learn: each toward the tokens its heads' dense attention relies on (warmup.py)."""

    local = True
    converted_only = True

    def context(self):
        self.observer = RouterWarmup(mosa_layers(self.student), self.spec.answer_weight)
        return self.observer

    def loss(self, net, ids, answers=None):
        self.observer.answers = answers
        with torch.no_grad(), self.acc.autocast():
            net(input_ids=ids, use_cache=False)
        loss = self.observer.pop_loss()
        return loss, {"loss": loss.detach()}


@register_stage("layer_distill")
class LayerDistillStage(Stage):
    """Each converted attention layer learns the original layer's output on the original inputs (distill.py)."""

    local = True
    shardable = False  # (its losses are taken inside the forward, from gathered parameters)
    converted_only = True

    def context(self):
        self.observer = LayerDistill(self.teacher, self.student)
        return self.observer

    def loss(self, net, ids, answers=None):
        with self.acc.autocast():
            loss = self.observer.loss(ids)
        return loss, {"loss": loss.detach()}


@register_stage("adaptation")
class AdaptationStage(Stage):
    """End to end: LM loss, plus ``kd_weight`` × KL(teacher ‖ student) on the logits. With ``answer_weight`` > 0
    each term adds that times its mean over the answers' tokens (``data.needles``), so the few tokens where
    retrieval shows are not drowned by the thousands around them."""

    def loss(self, net, ids, answers=None):
        spec, acc = self.spec, self.acc
        with acc.autocast():
            logits = net(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        V = logits.shape[-1]
        focus = answers[:, 1:] if answers is not None and spec.answer_weight > 0 else None  # (B, T-1) targets
        lm_t = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")  # (B·(T-1),)
        lm = lm_t.mean()
        parts = {"lm": lm.detach()}
        loss = spec.lm_weight * self._weighted(lm_t, focus, parts, "lm")
        if spec.kd_weight > 0:
            tau = spec.kd_temperature
            with torch.no_grad(), acc.autocast():
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
            log_t = F.log_softmax(t_logits / tau, -1)
            log_s = F.log_softmax(logits / tau, -1)
            kd_t = (log_t.exp() * (log_t - log_s)).sum(-1).reshape(-1) * tau * tau  # KL(teacher ‖ student) per token
            parts["kd"] = kd_t.mean().detach()
            loss = loss + spec.kd_weight * self._weighted(kd_t, focus, parts, "kd")
        parts["loss"] = loss.detach()
        return loss, parts

    def _weighted(self, per_token: Tensor, focus: Tensor | None, parts: dict, name: str) -> Tensor:
        """The mean of ``per_token`` (B·(T-1),), plus ``answer_weight`` × its mean over the answers' tokens."""
        if focus is None:
            return per_token.mean()
        on = focus.reshape(-1)
        answer = (per_token * on).sum() / on.sum().clamp(min=1)
        parts[f"{name}_answers"] = answer.detach()
        return per_token.mean() + self.spec.answer_weight * answer
