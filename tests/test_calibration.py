"""Calibration statistics against a naive recomputation from the model's own attention weights."""

import pytest
import torch
from tiny_models import tiny_model

from mosa_retrofit import MoSAConfig, convert_
from mosa_retrofit.calibration import collect_stats
from mosa_retrofit.surgery import attention_layers


def test_coverage_and_router_fit_match_naive():
    model = tiny_model("llama", "eager")
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    stats = collect_stats(model, ids, sparsity=4, include_first=True, attention_modules=layers, progress=False)
    xs, zs, cov = [], [], torch.zeros(4)
    captured = {}
    h = layers[1].register_forward_pre_hook(lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"]),
                                            with_kwargs=True)
    for row in ids:
        with torch.no_grad():
            out = model(row[None], output_attentions=True)
        A = out.attentions[1][0]  # (H, T, T)
        for head in range(4):
            received = A[head].sum(0)
            score = received.clone()
            score[0] = float("inf")
            S = score.topk(6).indices.tolist()
            cov[head] += sum(A[head, i, S].sum() for i in S) / len(S) / 3
            z = received.clamp_min(1e-6).log()
            zs.append(((z - z.mean()) / z.std()) if head == 0 else None)
        xs.append(captured["x"][0])
    h.remove()
    torch.testing.assert_close(stats[1].coverage.float(), cov, atol=1e-5, rtol=1e-5)
    # router of head 0: ridge solution of (X w - z)^2 + lam |w|^2, up to the unit-RMS rescaling
    X = torch.cat(xs).double()
    z = torch.cat([t for t in zs if t is not None]).double()
    lam = 1e-2 * (X * X).sum(0).mean()
    w = torch.linalg.solve(X.t() @ X + lam * torch.eye(64, dtype=torch.float64), X.t() @ z)
    w = w / (X @ w).pow(2).mean().sqrt()
    fitted = stats[1].fit_router([[0]])[0]
    torch.testing.assert_close(fitted, w, atol=1e-6, rtol=1e-5)


def test_scored_heads_keep_lowest_coverage_dense_and_calibrated_routers_are_set():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    stats = collect_stats(model, ids, 8, True, layers, progress=False)
    convert_(model, MoSAConfig(sparsity=8, dense_heads=1, head_choice="scored", router_init="calibrated"),
             calibration=ids, progress=False)
    for i, m in layers.items():
        assert list(m.mosa_plan.dense) == [int(stats[i].coverage.argmin())]
        torch.testing.assert_close(m.mosa_router.detach().double(), stats[i].fit_router([[h] for h in m.mosa_plan.mosa]))


def test_precomputed_stats_replace_the_calibration_pass():
    """convert_(stats=...) (one pass reused by a sweep) builds what convert_(calibration=...) builds."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    config = MoSAConfig(sparsity=4, dense_heads=1, head_choice="scored", router_init="calibrated")
    a, b = tiny_model("llama"), tiny_model("llama")
    stats = collect_stats(b, ids, 4, True, {i: m for i, (_, m) in attention_layers(b).items()}, progress=False)
    convert_(a, config, calibration=ids, progress=False)
    convert_(b, config, stats=stats)
    for (_, ma), (_, mb) in zip(sorted(attention_layers(a).items()), sorted(attention_layers(b).items())):
        assert ma[1].mosa_plan == mb[1].mosa_plan
        assert torch.equal(ma[1].mosa_router, mb[1].mosa_router)
    with pytest.raises(ValueError, match=r"collected for \(sparsity, include_first\) = \(4, True\); this config needs \(8, True\)"):
        convert_(tiny_model("llama"), MoSAConfig(sparsity=8, head_choice="scored"), stats=stats)
