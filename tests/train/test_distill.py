"""Layer-wise distillation (distill.py and the ``layer_distill`` recipe stage)."""

import copy

import pytest
import torch
from tiny_models import IDENTITY, plain_config, tiny_model
from train_fixtures import records, run, weights, world  # noqa: F401  (world: the module fixture)

from mosa_retrofit import convert_
from mosa_retrofit.convert.surgery import attention_layers
from mosa_retrofit.train.distill import LayerDistill


def ids(B=2, T=20, seed=0):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def naive_loss(teacher, student, x):
    """Each layer's attention input from the teacher's hidden states (through the layer's own input norm),
    both attention modules run on it, relative squared error, mean over layers (Llama layout)."""
    with torch.no_grad():
        hidden = teacher(x, output_hidden_states=True).hidden_states  # input of decoder layer i at index i
    pos = torch.arange(x.shape[1])[None]
    losses = []
    for i, layer in enumerate(teacher.model.layers):
        h = layer.input_layernorm(hidden[i])
        cos_sin = teacher.model.rotary_emb(h, pos)
        with torch.no_grad():
            y = layer.self_attn(hidden_states=h, position_embeddings=cos_sin, attention_mask=None)[0]
        out = student.model.layers[i].self_attn(hidden_states=h, position_embeddings=cos_sin, attention_mask=None)[0]
        losses.append((out - y).pow(2).sum() / y.pow(2).sum())
    return torch.stack(losses).mean()


def test_loss_matches_naive_and_vanishes_at_identity():
    teacher = tiny_model("llama")
    student = convert_(copy.deepcopy(teacher), plain_config(sparsity=4, dense_heads=1, router_score="sigmoid"))
    x = ids()
    with LayerDistill(teacher, student) as distill:
        loss = distill.loss(x)
    want = naive_loss(teacher, student, x)
    assert loss > 1e-3
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    loss.backward()
    m = attention_layers(student)[1][1]
    assert m.mosa_router.grad.abs().sum() > 0 and m.q_proj.weight.grad.abs().sum() > 0
    same = convert_(copy.deepcopy(teacher), plain_config(dense_heads=1, **IDENTITY))
    attn = teacher.model.layers[0].self_attn
    n_hooks = len(attn._forward_hooks), len(attn._forward_pre_hooks)
    with LayerDistill(teacher, same) as distill:
        assert distill.loss(x) < 1e-10
    assert (len(attn._forward_hooks), len(attn._forward_pre_hooks)) == n_hooks  # our hooks removed on exit


def test_stops_after_the_last_converted_layer():
    teacher = tiny_model("llama")
    student = convert_(copy.deepcopy(teacher), plain_config(sparsity=4, dense_heads=1, layers=[0]))
    calls = []
    teacher.model.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    with LayerDistill(teacher, student) as distill:
        distill.loss(ids())
    assert not calls  # layer 1 (and the LM head) never ran


def test_needs_a_converted_student():
    with pytest.raises(ValueError, match="converted student"):
        LayerDistill(tiny_model("llama"), tiny_model("llama"))


def test_layer_distill_stage_trains_only_attention_and_resumes_exactly(world, tmp_path):  # noqa: F811
    stages = ("stages=[{name: distill, kind: layer_distill, steps: 8, lr: 0.01, trainable: attention}, "
              "{name: adaptation, kind: adaptation, steps: 2, trainable: all, kd_weight: 0.5}]")
    over = [stages, "conversion.mosa.fill=mean", "conversion.mosa.router_init=calibrated",
            "checkpointing.every=100", "checkpointing.keep_last=50"]
    ref = tmp_path / "ref"
    run(world, ref, over)
    losses = [r["loss"] for r in records(ref) if r["stage"] == "distill"]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    before, after = weights(ref / "checkpoint-0000000"), weights(ref / "checkpoint-0000008")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k for k in changed)  # MLPs, norms, embeddings untouched
    assert any("mosa_fill" in k for k in changed) and any("mosa_router" in k for k in changed)

    class Killed(Exception):
        pass

    def crash(stage, step):
        if (stage, step) == ("distill", 5):
            raise Killed

    out = tmp_path / "crashed"
    with pytest.raises(Killed):
        run(world, out, over + ["checkpointing.every=3"], interrupt=crash)
    run(world, out, over + ["checkpointing.every=3"], resume=True)
    a, b = weights(ref / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
