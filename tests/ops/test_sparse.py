"""The sparse-head math: selection rule, gates, gradients, causality, padding, edge lengths."""

import math

import pytest
import torch
from naive import ref_k, ref_mosa

from mosa_retrofit.ops.routing import router_gates, select_tokens, tokens_per_head
from mosa_retrofit.ops.sparse import mosa_attention

h, d, E = 32, 8, 4


def weights(E=E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = h**-0.5
    r = torch.randn(E, h, generator=g, dtype=dtype) * s
    qkv = torch.randn(E, h, 3 * d, generator=g, dtype=dtype) * s
    o = torch.randn(E, d, h, generator=g, dtype=dtype) * s
    return r, qkv, o


@pytest.mark.parametrize("T", [1, 2, 3, 7, 8, 9, 64, 100])
@pytest.mark.parametrize("sparsity", [1, 2.5, 4, 16])
def test_k_rule(T, sparsity):
    assert tokens_per_head(T, sparsity) == min(max(math.floor(T / sparsity), 2), T)


@pytest.mark.parametrize("T, sparsity", [(1, 4), (2, 8), (5, 8), (30, 4), (31, 7)])
@pytest.mark.parametrize("include_first", [False, True])
def test_any_length_matches_reference(T, sparsity, include_first):
    r, qkv, o = weights()
    x = torch.randn(2, T, h)
    y = mosa_attention(x, r, qkv, o, sparsity=sparsity, include_first=include_first,
                       rope=None)
    torch.testing.assert_close(y, ref_mosa(x, r, qkv, o, sparsity, include_first, rotate_fraction=0.0),
                               atol=1e-5, rtol=1e-5)


def test_selection_sorted_and_first_token():
    logits = torch.randn(3, 2, 50)
    idx, live = select_tokens(logits, 5, include_first=True)
    assert live is None and idx.shape == (3, 2, 10)
    assert (idx[..., 1:] > idx[..., :-1]).all()  # strictly ascending
    assert (idx[..., 0] == 0).all()
    # the other 9 are the top-9 of positions 1..49
    expect = logits[..., 1:].topk(9).indices.sort(-1).values + 1
    assert torch.equal(idx[..., 1:], expect)


def test_gradcheck_float64_with_padding_and_first_token():
    """Analytic gradients (incl. the fused gather/router backward) against finite differences."""
    r, qkv, o = (t.requires_grad_() for t in weights(E=3, dtype=torch.float64))
    x = torch.randn(2, 11, h, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False

    def f(x, r, qkv, o):
        return mosa_attention(x, r, qkv, o, sparsity=3, include_first=True, attention_mask=mask)

    assert torch.autograd.gradcheck(f, (x, r, qkv, o), eps=1e-6, atol=1e-6)


def test_router_gradient_only_through_selected_scores():
    r, qkv, o = (t.requires_grad_() for t in weights())
    x = torch.randn(1, 40, h, requires_grad=True)
    y = mosa_attention(x, r, qkv, o, sparsity=8)
    y.square().sum().backward()
    assert r.grad.abs().min() > 0  # every head's router learns
    # d y / d r_e comes only via sigmoid(x_t . r_e) at the 5 tokens head e selected:
    # the router gradient of head e is a combination of exactly those x_t.
    idx, _ = select_tokens((r @ x[0].t()).view(E, 1, 40).detach(), 8)
    for e in range(E):
        X = x[0, idx[e, 0]].detach()  # (5, h)
        coef = torch.linalg.lstsq(X.t(), r.grad[e][:, None]).solution
        torch.testing.assert_close(X.t() @ coef, r.grad[e][:, None], atol=1e-5, rtol=1e-4)


def test_unselected_tokens_get_exactly_zero():
    r, qkv, o = weights()
    x = torch.randn(2, 64, h)
    y = mosa_attention(x, r, qkv, o, sparsity=16)
    scores = torch.einsum("bth,eh->bet", x, r)
    chosen = torch.zeros(2, 64, dtype=torch.bool)
    for b in range(2):
        for e in range(E):
            chosen[b, scores[b, e].topk(ref_k(64, 16)).indices] = True
    assert (y[~chosen] == 0).all()
    assert (y[chosen].abs().sum(-1) > 0).all()


def test_position_mask_is_causal():
    """Perturb token t along a direction the routers cannot see (selection unchanged): no output before t
    may change, and some output at or after t must."""
    r, qkv, o = weights()
    x = torch.randn(1, 48, h)
    null = torch.linalg.svd(r, full_matrices=True).Vh[E:]  # (h-E, h): directions orthogonal to all routers
    idx, _ = select_tokens((r @ x[0].t()).view(E, 1, 48), 2)
    chosen = idx.unique().tolist()  # tokens some head selected: perturbing them must change something
    for t in (chosen[2], chosen[len(chosen) // 2], chosen[-3]):
        x2 = x.clone()
        x2[0, t] += 3.0 * null[0] + 2.0 * null[3]
        y, y2 = (mosa_attention(z, r, qkv, o, sparsity=2) for z in (x, x2))
        assert torch.equal(y[0, :t], y2[0, :t])
        assert not torch.allclose(y[0, t:], y2[0, t:])


def test_straight_through_gates():
    z = torch.tensor([-120.0, -3.0, 0.0, 5.0], requires_grad=True)
    g = router_gates(z, "straight_through")
    assert torch.equal(g, torch.ones(4))  # exactly one, even where sigmoid underflows
    g.sum().backward()
    torch.testing.assert_close(z.grad, 1 - torch.sigmoid(z.detach()))  # d/dz [σ/σ.detach()] = 1 - σ
    with pytest.raises(ValueError, match="router_score"):
        router_gates(z, "softmax")


def test_every_router_score_a_config_accepts_is_computed():
    """kinds.ROUTER_SCORES (what MoSAConfig validates against) and router_gates agree, word for word."""
    from mosa_retrofit.kinds import ROUTER_SCORES

    z = torch.tensor([-2.0, 0.0, 3.0])
    expected = {"sigmoid": torch.sigmoid(z), "straight_through": torch.ones(3)}
    assert set(ROUTER_SCORES) == set(expected)
    for score in ROUTER_SCORES:
        torch.testing.assert_close(router_gates(z, score), expected[score])
    with pytest.raises(ValueError, match=str(ROUTER_SCORES).replace("(", r"\(").replace(")", r"\)")):
        router_gates(z, "tanh")


def test_straight_through_matches_reference_gradients():
    r, qkv, o = (t.requires_grad_() for t in weights())
    x = torch.randn(2, 30, h, requires_grad=True)
    y = mosa_attention(x, r, qkv, o, sparsity=3, router_score="straight_through")
    y_ref = ref_mosa(x, r, qkv, o, 3, rotate_fraction=0.0, gate="straight_through")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    probe = torch.randn_like(y)
    g = torch.autograd.grad((y * probe).sum(), (x, r, qkv, o))
    g_ref = torch.autograd.grad((y_ref * probe).sum(), (x, r, qkv, o))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padding_is_never_selected_and_rows_match_unpadded():
    logits = torch.randn(E, 2, 20)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :7] = False  # row 1: 13 real tokens
    idx, live = select_tokens(logits, 4, include_first=True, valid=valid)
    assert idx.shape[-1] == 5 and live is not None
    assert live[:, 0].all() and live[:, 1].sum(-1).eq(3).all()  # 13 // 4 = 3 live slots in row 1
    assert valid[1][idx[:, 1][live[:, 1]]].all()
    assert (idx[:, 1, :3] >= 7).all() and (idx[:, 1, 0] == 7).all()  # first real token kept

    r, qkv, o = weights()
    x = torch.randn(2, 20, h)
    y = mosa_attention(x, r, qkv, o, sparsity=4, include_first=True, attention_mask=valid)
    alone = mosa_attention(x[1:, 7:], r, qkv, o, sparsity=4, include_first=True)
    torch.testing.assert_close(y[1:, 7:], alone, atol=1e-6, rtol=1e-6)
    assert (y[1, :7] == 0).all()


def test_fully_padded_batch_gives_zeros():
    r, qkv, o = weights()
    y = mosa_attention(torch.randn(2, 5, h), r, qkv, o, sparsity=2, attention_mask=torch.zeros(2, 5))
    assert torch.equal(y, torch.zeros(2, 5, h))


def test_grouped_units_equal_per_head_units_with_shared_selection():
    """G query heads sharing one selection and K/V equal G separate units that happen to share router, W_k, W_v."""
    G = 3
    g = torch.Generator().manual_seed(5)
    r = torch.randn(2, h, generator=g)
    wq = torch.randn(2, G, h, d, generator=g) * h**-0.5
    wkv = torch.randn(2, h, 2 * d, generator=g) * h**-0.5
    wo = torch.randn(2, G, d, h, generator=g) * d**-0.5
    x = torch.randn(2, 33, h)
    grouped = mosa_attention(x, r, torch.cat((wq.permute(0, 2, 1, 3).reshape(2, h, G * d), wkv), -1),
                             wo.reshape(2, G * d, h), sparsity=4, heads_per_unit=G)
    split = mosa_attention(x, r.repeat_interleave(G, 0),
                           torch.cat((wq.reshape(2 * G, h, d), wkv.repeat_interleave(G, 0)), -1),
                           wo.reshape(2 * G, d, h), sparsity=4)
    torch.testing.assert_close(grouped, split, atol=1e-5, rtol=1e-5)
