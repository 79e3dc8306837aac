"""Calibration statistics against a naive recomputation from the model's own attention weights."""

import pytest
import torch
from tiny_models import tiny_model

from mosa_retrofit import MoSAConfig, convert_
from mosa_retrofit.calibration import collect_stats
from mosa_retrofit.surgery import attention_layers


def _std(z):
    return (z - z.mean()) / z.std()


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_energy_and_router_fit_match_naive(fill):
    """Per head, from the model's own attention weights and a hook on o_proj: energy Σ‖(o − f) W_o‖² and the
    ridge router fitted to standardised log received mass + log ‖(o − f) W_o‖."""
    model = tiny_model("llama", "eager")
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    stats = collect_stats(model, ids, layers, progress=False)
    attn = layers[1]
    H, d = 4, 16
    Wo = attn.o_proj.weight.detach()  # (D, H·d)
    captured = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"]),
                                        with_kwargs=True)
    h2 = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", a[0]))
    xs, zs, energy = [], [], torch.zeros(H, dtype=torch.float64)
    for row in ids:
        with torch.no_grad():
            out = model(row[None], output_attentions=True)
        A = out.attentions[1][0]  # (H, T, T)
        o = captured["o"][0].view(-1, H, d)  # (T, H, d) each head's output, as o_proj receives it
        for head in range(H):
            oh = o[:, head]
            f = oh.mean(0) if fill == "mean" else torch.zeros(d)
            added = (oh - f) @ Wo[:, head * d:(head + 1) * d].t()  # (T, D)
            energy[head] += added.double().pow(2).sum()
            if head == 2:
                zs.append(_std(A[head].sum(0).clamp_min(1e-6).log()) + _std(added.norm(dim=-1).log()))
        xs.append(captured["x"][0])
    h1.remove(), h2.remove()
    torch.testing.assert_close(stats[1].head_scores(fill), energy, atol=1e-6, rtol=1e-4)
    X = torch.cat(xs).double()
    z = torch.cat(zs).double()
    lam = 1e-2 * (X * X).sum(0).mean()
    w = torch.linalg.solve(X.t() @ X + lam * torch.eye(64, dtype=torch.float64), X.t() @ z)
    w = w / (X @ w).pow(2).mean().sqrt()
    torch.testing.assert_close(stats[1].fit_router([[2]], fill)[0], w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_scored_heads_keep_highest_energy_dense_and_calibrated_routers_are_set(fill):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    stats = collect_stats(model, ids, layers, progress=False)
    convert_(model, MoSAConfig(sparsity=8, dense_heads=1, head_choice="scored", router_init="calibrated", fill=fill),
             calibration=ids, progress=False)
    for i, m in layers.items():
        assert list(m.mosa_plan.dense) == [int(stats[i].head_scores(fill).argmax())]
        want = stats[i].fit_router([[h] for h in m.mosa_plan.mosa], fill)
        torch.testing.assert_close(m.mosa_router.detach().double(), want)


def test_precomputed_stats_replace_the_calibration_pass():
    """convert_(stats=...) (one pass reused by a sweep) builds what convert_(calibration=...) builds."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    config = MoSAConfig(sparsity=4, dense_heads=1, head_choice="scored", router_init="calibrated", fill="mean")
    a, b = tiny_model("llama"), tiny_model("llama")
    stats = collect_stats(b, ids, {i: m for i, (_, m) in attention_layers(b).items()}, progress=False)
    convert_(a, config, calibration=ids, progress=False)
    convert_(b, config, stats=stats)
    for (_, ma), (_, mb) in zip(sorted(attention_layers(a).items()), sorted(attention_layers(b).items())):
        assert ma[1].mosa_plan == mb[1].mosa_plan
        assert torch.equal(ma[1].mosa_router, mb[1].mosa_router) and torch.equal(ma[1].mosa_fill, mb[1].mosa_fill)
    with pytest.raises(ValueError, match=r"stats lack layers \[1\]"):
        convert_(tiny_model("llama"), MoSAConfig(sparsity=8, router_init="calibrated"), stats={0: stats[0]})
