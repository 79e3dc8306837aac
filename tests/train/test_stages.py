"""train/stages.py: every stage kind a recipe names is registered; the adaptation loss against plain math."""

import math
import types

import pytest
import torch

from mosa_retrofit.train.recipe import StageSpec
from mosa_retrofit.train.stages import AdaptationStage


def test_every_recipe_stage_kind_is_a_registered_stage():
    from mosa_retrofit.train.recipe import STAGE_KINDS
    from mosa_retrofit.train.stages import STAGES

    assert set(STAGES) == set(STAGE_KINDS)
    assert [STAGES[k].local for k in ("router_warmup", "layer_distill", "adaptation")] == [True, True, False]


class _Logits(torch.nn.Module):
    """A 'model' whose logits are a fixed table (B, T, V): the loss is all that is tested."""

    def __init__(self, logits):
        super().__init__()
        self.table = logits

    def forward(self, input_ids, use_cache=False):
        return types.SimpleNamespace(logits=self.table)


def _reference(s_logits, t_logits, ids, answers, lm_w, kd_w, aw, tau):
    """Per token, in plain loops: -log p_s(next), KL(p_t ‖ p_s) at temperature tau; each mean plus aw x its
    mean over the positions whose *target* is an answer token."""
    B, T, V = s_logits.shape
    lm, kd, lm_a, kd_a, n_a = [], [], [], [], 0
    for b in range(B):
        for t in range(T - 1):
            s, tt = s_logits[b, t].double(), t_logits[b, t].double()
            nll = -(s[ids[b, t + 1]] - torch.logsumexp(s, 0))
            ps, pt = torch.softmax(s / tau, 0), torch.softmax(tt / tau, 0)
            kl = (pt * (pt.log() - ps.log())).sum() * tau * tau
            lm.append(nll)
            kd.append(kl)
            if answers is not None and answers[b, t + 1]:
                lm_a.append(nll)
                kd_a.append(kl)
                n_a += 1
    mean = lambda xs: sum(xs) / len(xs)
    lm_term = mean(lm) + (aw * mean(lm_a) if n_a else 0)
    kd_term = mean(kd) + (aw * mean(kd_a) if n_a else 0)
    return lm_w * lm_term + kd_w * kd_term


@pytest.mark.parametrize("lm_w,kd_w,aw,tau", [(1.0, 0.0, 0.0, 1.0), (0.0, 1.0, 3.0, 1.0), (0.5, 2.0, 1.5, 2.0)])
def test_adaptation_loss_weighs_the_answers_as_the_plain_reference(lm_w, kd_w, aw, tau):
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 9, 7
    s_logits, t_logits = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    answers = torch.zeros(B, T, dtype=torch.bool)
    answers[0, 3:5] = answers[1, 7] = True
    answers[1, 0] = True  # a first token is no target: it never counts
    spec = StageSpec(name="a", kind="adaptation", steps=1, lm_weight=lm_w, kd_weight=kd_w, answer_weight=aw,
                     kd_temperature=tau)
    acc = types.SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False))
    stage = AdaptationStage(spec, _Logits(s_logits), _Logits(t_logits), acc)
    loss, parts = stage.loss(stage.student, ids, answers)
    expected = _reference(s_logits, t_logits, ids, answers, lm_w, kd_w, aw, tau)
    assert math.isclose(loss.item(), float(expected), rel_tol=1e-5)
    assert ("kd_answers" in parts) == (aw > 0 and kd_w > 0)
    # without answers the weight changes nothing: the plain means
    plain, _ = stage.loss(stage.student, ids, None)
    assert math.isclose(plain.item(), float(_reference(s_logits, t_logits, ids, None, lm_w, kd_w, 0, tau)), rel_tol=1e-5)


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, True, "2"])
def test_bad_answer_weights_are_refused(value):
    with pytest.raises(ValueError, match="answer_weight"):
        StageSpec(name="a", kind="adaptation", steps=1, answer_weight=value)


def test_answer_weight_outside_adaptation_or_without_needles_is_refused():
    from mosa_retrofit.train.recipe import Recipe

    with pytest.raises(ValueError, match=r"answer_weight.*0 in a layer_distill stage"):
        StageSpec(name="a", kind="layer_distill", steps=1, trainable="mosa", answer_weight=1.0)
    stages = [{"name": "a", "kind": "adaptation", "steps": 1, "answer_weight": 2.0}]
    with pytest.raises(ValueError, match=r"stages \['a'\] weigh the answers of data.needles.*data.needles is 0"):
        Recipe.from_dict({"output_dir": "x", "stages": stages})
    assert Recipe.from_dict({"output_dir": "x", "stages": stages, "data": {"block_size": 1024, "needles": 2}})
