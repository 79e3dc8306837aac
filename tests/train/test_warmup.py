"""Router warm-up objective against the original model's own attention weights and a plain KL."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.surgery import attention_layers, mosa_layers
from mosa_retrofit.train import warmup
from mosa_retrofit.train.warmup import RouterWarmup, attention_mass, router_warmup_loss, warmup_target


def _original_attention(model, ids, mask):
    """(B, H, T, T) attention weights of every layer from the unconverted model's eager attention."""
    weights, hooks = {}, []
    for idx, (_, m) in attention_layers(model).items():
        hooks.append(m.register_forward_hook(lambda mod, a, out, idx=idx: weights.__setitem__(idx, out[1].detach())))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return weights


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mass_matches_the_models_eager_attention(family):
    """Identity conversion (every token kept) keeps hidden states exact, so each MoSA head's dense mass must
    equal the column sums of the original head's attention matrix over real queries."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    ref = _original_attention(copy.deepcopy(model), ids, mask)
    convert_(model, plain_config(sparsity=1, dense_heads=1, include_first=False))
    seen = {}

    def observe(module, x, W, m, cos, sin):
        seen[module.layer_idx] = (attention_mass(module, x, W, m, cos, sin), module.mosa_plan)

    for mod in mosa_layers(model).values():
        mod.mosa_observer = observe
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert sorted(seen) == sorted(ref)
    for idx, ((mass, valid), plan) in seen.items():
        A = ref[idx][:, list(plan.mosa)].float() * mask[:, None, :, None]  # padded queries give nothing
        expected = A.sum(-2)  # (B, n, T)
        assert torch.equal(valid, mask.bool())
        torch.testing.assert_close(mass, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family, queries", [("llama", 512), ("qwen2", 512), ("llama", 7), ("llama", "asked")])
def test_far_mass_of_key_selection_units_matches_the_models_eager_attention(family, queries, monkeypatch):
    """Key-selection units learn the mean attention a token receives from queries beyond its window, summed over
    the unit's heads, over the tokens that are not sinks and have such queries (a plain loop over the original
    model's attention matrices); from every ceil(T / FAR_QUERIES)-th query counted back from the last, or
    ('asked') from the queries a (B, T) mask names, each row its own."""
    asked = torch.zeros(2, 24, dtype=torch.bool)
    asked[0, [17, 22, 23]] = asked[1, [12, 20]] = True
    monkeypatch.setattr(warmup, "FAR_QUERIES", 512 if queries == "asked" else queries)
    model = tiny_model(family)
    g = torch.Generator().manual_seed(2)
    B, T, w, sinks = 2, 24, 5, 2
    ids = torch.randint(1, 128, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    ref = _original_attention(copy.deepcopy(model), ids, mask)
    convert_(model, plain_config(sparsity=1, dense_heads=1, sparse_heads="mosa_keys", local_window=w,
                                 sink_tokens=sinks, router_granularity="kv_group", include_first=True))
    seen = {}

    def observe(module, x, W, m, cos, sin):
        seen[module.layer_idx] = (warmup_target(module, x, W, m, cos, sin, asked if queries == "asked" else None),
                                  module)

    for mod in mosa_layers(model).values():
        mod.mosa_observer = observe
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert sorted(seen) == sorted(ref)
    for idx, ((mass, keep), module) in seen.items():
        units = next(gr for gr in module.mosa_groups if gr.routed).units
        for b in range(B):
            if queries == "asked":
                sampled = {i for i in range(T) if asked[b, i]}
            else:
                sampled = set(range(T - 1, -1, -(-(-T // queries))))
            real = [t for t in range(T) if mask[b, t]]
            for t in range(T):
                far = [i for i in real if i - t >= w and i in sampled]
                expect_keep = t in real and real.index(t) >= sinks and real[-1] - t >= w
                assert bool(keep[b, t]) == expect_keep, (idx, b, t)
                if not expect_keep:
                    continue
                for e, heads in enumerate(units):
                    expected = sum(float(ref[idx][b, h, i, t]) for h in heads for i in far) / max(len(far), 1)
                    assert abs(float(mass[b, e, t]) - expected) < 1e-5


def test_kl_loss_against_a_plain_loop():
    torch.manual_seed(0)
    B, T, D, E = 2, 9, 6, 3
    x, router = torch.randn(B, T, D), torch.randn(E, D)
    mass = torch.rand(B, E, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    for include_first in (False, True):
        covered = valid.clone()
        covered[:, 0] &= not include_first
        got = router_warmup_loss(router, x, mass, covered)
        total = 0.0
        for b in range(B):
            keep = [t for t in range(T) if valid[b, t] and not (include_first and t == 0)]
            for e in range(E):
                p = mass[b, e, keep] / mass[b, e, keep].sum()
                logits = torch.stack([x[b, t] @ router[e] for t in keep])
                q = torch.exp(logits) / torch.exp(logits).sum()
                total += float((p * (p / q).log()).sum())
        assert abs(got.item() - total / (B * E)) < 1e-5


@pytest.mark.parametrize("kind", ["mosa", "mosa_keys"])
def test_warmup_gradients_reach_only_routers_through_the_observer(kind):
    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=4, dense_heads=1, sparse_heads=kind, local_window=4, sink_tokens=1))
    ids = torch.randint(1, 128, (2, 16))
    layers = mosa_layers(model)
    with RouterWarmup(layers) as w:
        with torch.no_grad():
            model(ids)
        loss = w.pop_loss()
    loss.backward()
    assert all(m.mosa_router.grad is not None and m.mosa_router.grad.abs().sum() > 0 for m in layers.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "mosa_router" not in n)
    assert all("mosa_observer" not in m.__dict__ for m in layers.values())  # removed on exit


def test_answer_weight_adds_the_far_mass_of_the_queries_that_predict_answers():
    """RouterWarmup(answer_weight=a): per layer, KL toward the usual far target plus a x KL toward the far mass of
    the queries just before answer tokens (each row its own); without answers, the usual loss alone."""
    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=4, dense_heads=1, sparse_heads="mosa_keys", local_window=4, sink_tokens=1,
                                 router_granularity="kv_group"))
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    answers = torch.zeros(2, 24, dtype=torch.bool)
    answers[0, 20:23] = answers[1, 15] = True
    asking = torch.zeros_like(answers)
    asking[0, 19:22] = asking[1, 14] = True
    layers = mosa_layers(model)
    seen = []

    def record(module, x, W, m, cos, sin):
        seen.append((module, x, warmup_target(module, x, W, m, cos, sin),
                     warmup_target(module, x, W, m, cos, sin, asking)))

    for mod in layers.values():
        mod.mosa_observer = record
    with torch.no_grad():
        model(ids)
    expected = torch.stack([router_warmup_loss(m.mosa_router, x, *plain) + 2.5 * router_warmup_loss(m.mosa_router, x, *asked)
                            for m, x, plain, asked in seen]).mean()
    alone = torch.stack([router_warmup_loss(m.mosa_router, x, *plain) for m, x, plain, _ in seen]).mean()
    assert any(asked[0].sum() > 0 for *_, asked in seen)  # the answers' queries do reach keys beyond the window
    for answered, want in ((answers, expected), (None, alone)):
        with RouterWarmup(layers, answer_weight=2.5) as w:
            w.answers = answered
            with torch.no_grad():
                model(ids)
            got = w.pop_loss()
        assert abs(got.item() - want.item()) < 1e-6 and got.item() > 0
