"""Calibration statistics against a naive recomputation from the model's own attention weights."""

import pytest
import torch
from tiny_models import plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.calibration import collect_stats
from mosa_retrofit.convert.surgery import attention_layers


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
def test_sparsifying_damage_and_group_targets_match_naive(fill):
    """The damage of turning a head (or a KV group) into a MoSA unit, recomputed by hand from the model's own
    attention weights: the unit keeps the first token and the T/s tokens of highest router target, a selected
    query attends the selected keys (softmax renormalised over them), every other token gets the fill; damage =
    Σ_t ‖Σ_{h in unit} (ô_h − o_h) W_o^h‖², a KV group selecting by its heads' summed targets. A KV group's
    router is the ridge fit to its own target std(log Σ_h mass_h) + std(log ‖Σ_h (o_h − f_h) W_o^h‖)."""
    model = tiny_model("llama", "eager")  # 4 query heads in 2 KV groups of 2
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    stats = collect_stats(model, ids, layers, progress=False, sparsities=(4,))
    attn = layers[0]
    H, d, G, k = 4, 16, 2, 24 // 4
    Wo = attn.o_proj.weight.detach()  # (D, H·d)
    Wv, bv = attn.v_proj.weight.detach(), attn.v_proj.bias.detach()
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"]),
                                          with_kwargs=True)
    head_damage, group_damage = torch.zeros(H, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    xs, zg = [], []
    for row in ids:
        with torch.no_grad():
            A = model(row[None], output_attentions=True).attentions[0][0]  # (H, T, T)
        x = captured["x"][0]
        v = (x @ Wv.t() + bv).view(-1, 2, d)  # (T, KV, d)
        o = torch.stack([A[h] @ v[:, h // G] for h in range(H)])  # (H, T, d)
        f = o.mean(1, keepdim=True) if fill == "mean" else torch.zeros(H, 1, d)
        out = lambda y, h: y @ Wo[:, h * d:(h + 1) * d].t()  # (T, D) head h's part of the layer output
        added = [out(o[h] - f[h], h) for h in range(H)]
        z = torch.stack([_std(A[h].sum(0).clamp_min(1e-6).log()) + _std(added[h].norm(dim=-1).log()) for h in range(H)])
        groups = [[0, 1], [2, 3]]
        zgroup = torch.stack([_std(sum(A[h].sum(0) for h in g).log()) + _std(sum(added[h] for h in g).norm(dim=-1).log())
                              for g in groups])
        zg.append(zgroup)
        xs.append(x)

        def sparsified(h, score):
            score = score.clone()
            score[0] = float("inf")
            sel = torch.zeros(24, dtype=torch.bool)
            sel[score.topk(k).indices] = True
            y = f[h].expand(24, d).clone()
            for t in range(24):
                if sel[t]:
                    a = A[h, t] * sel
                    y[t] = (a / a.sum()) @ v[:, h // G]
            return out(y - o[h], h)  # (T, D) change of the layer output

        for h in range(H):
            head_damage[h] += sparsified(h, z[h]).double().pow(2).sum()
        for g, heads in enumerate(groups):
            group_damage[g] += sum(sparsified(h, z[heads].sum(0)) for h in heads).double().pow(2).sum()
    hook.remove()
    torch.testing.assert_close(stats[0].head_scores(fill, 4, "head"), head_damage, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(stats[0].head_scores(fill, 4, "kv_group"), group_damage, atol=1e-6, rtol=1e-4)
    X, z = torch.cat(xs).double(), torch.cat([t[1] for t in zg]).double()  # group 1: heads 2 and 3
    lam = 1e-2 * (X * X).sum(0).mean()
    w = torch.linalg.solve(X.t() @ X + lam * torch.eye(64, dtype=torch.float64), X.t() @ z)
    w = w / (X @ w).pow(2).mean().sqrt()
    torch.testing.assert_close(stats[0].fit_router([[2, 3]], fill)[0], w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_scored_heads_keep_the_most_damaged_dense_and_calibrated_routers_are_set(fill):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    stats = collect_stats(model, ids, layers, progress=False)
    convert_(model, plain_config(sparsity=8, dense_heads=1, head_choice="scored", router_init="calibrated", fill=fill),
             calibration=ids, progress=False)
    for i, m in layers.items():
        assert list(m.mosa_plan.dense) == [int(stats[i].head_scores(fill, 8, "head").argmax())]
        want = stats[i].fit_router([[h] for h in m.mosa_plan.mosa], fill)
        torch.testing.assert_close(m.mosa_router.detach().double(), want)


def test_precomputed_stats_replace_the_calibration_pass():
    """convert_(stats=...) (one pass reused by a sweep) builds what convert_(calibration=...) builds."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    config = plain_config(sparsity=4, dense_heads=1, head_choice="scored", router_init="calibrated", fill="mean")
    a, b = tiny_model("llama"), tiny_model("llama")
    stats = collect_stats(b, ids, {i: m for i, (_, m) in attention_layers(b).items()}, progress=False)
    convert_(a, config, calibration=ids, progress=False)
    convert_(b, config, stats=stats)
    for (_, ma), (_, mb) in zip(sorted(attention_layers(a).items()), sorted(attention_layers(b).items())):
        assert ma[1].mosa_plan == mb[1].mosa_plan
        assert torch.equal(ma[1].mosa_router, mb[1].mosa_router) and torch.equal(ma[1].mosa_fill, mb[1].mosa_fill)
    with pytest.raises(ValueError, match=r"stats lack layers \[1\]"):
        convert_(tiny_model("llama"), plain_config(sparsity=8, router_init="calibrated"), stats={0: stats[0]})


def test_key_selection_router_fits_the_far_attention_target():
    """Key-selection routers: ridge fit to log(mean attention a token receives from queries >= w later),
    standardised over the tokens that have such queries (0 for the others); a KV group sums its heads' mass."""
    model = tiny_model("llama", "eager")
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    w = 5
    stats = collect_stats(model, ids, layers, progress=False, sparsities=(), windows=(w,))
    attn = layers[0]
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"]),
                                          with_kwargs=True)
    xs, z_head, z_group = [], [], []
    for row in ids:
        with torch.no_grad():
            A = model(row[None], output_attentions=True).attentions[0][0]  # (H, T, T)
        T = A.shape[-1]
        per_key = lambda heads: torch.stack([
            sum(A[h, i, j] for h in heads for i in range(j + w, T)) / (T - j - w) for j in range(T - w)])
        for target, heads in ((z_head, [1]), (z_group, [2, 3])):  # head 1; KV group 1 = heads 2 and 3
            z = torch.zeros(T)
            z[: T - w] = _std(per_key(heads).clamp_min(1e-6).log())
            target.append(z)
        xs.append(captured["x"][0])
    hook.remove()
    X = torch.cat(xs).double()
    lam = 1e-2 * (X * X).sum(0).mean()
    for heads, zs in (([1], z_head), ([2, 3], z_group)):
        z = torch.cat(zs).double()
        r = torch.linalg.solve(X.t() @ X + lam * torch.eye(64, dtype=torch.float64), X.t() @ z)
        r = r / (X @ r).pow(2).mean().sqrt()
        torch.testing.assert_close(stats[0].fit_router([heads], window=w)[0], r, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="no key-selection router targets for window 7"):
        stats[0].fit_router([[1]], window=7)
