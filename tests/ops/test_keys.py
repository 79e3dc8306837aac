"""The key-selection attention op (ops/keys.py) and each of its backends against one plain masked-attention
reference written here: forward and gradients, GQA units, sinks / routed far keys, padding, layer windows."""

import math

import pytest
import torch

from mosa_retrofit.ops.keys import FarKeys, key_selection_attention


def reference(q, k, v, w, scale, far=None, key_valid=None, reach=None):
    """Dense softmax over the keys the rule allows: (B, T, H, d)."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = ((j <= i) & (i - j < w)).expand(B, 1, T, T)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :]) | (i == j)
    scores = (q @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    values = vv
    if far is not None:
        fk, fv = far.k.repeat_interleave(G, 1), far.v.repeat_interleave(G, 1)
        dist = i[None, None] - far.pos.repeat_interleave(G, 1)[:, :, None, :]  # (B, H, T, M)
        ok = dist >= w
        if reach is not None:
            ok = ok & (dist < reach)
        if far.valid is not None:
            ok = ok & far.valid.repeat_interleave(G, 1)[:, :, None, :]
        far_scores = ((q @ fk.transpose(-1, -2)) * scale).masked_fill(~ok, -math.inf)
        scores = torch.cat((far_scores, scores), dim=-1)
        values = torch.cat((fv, vv), dim=2)
    return (scores.softmax(-1) @ values).transpose(1, 2)


def inputs(B, E, G, T, d, M, seed=0, pad=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, E * G, T, d, generator=g)
    k, v = torch.randn(B, E, T, d, generator=g), torch.randn(B, E, T, d, generator=g)
    far = None
    if M:
        pos = torch.stack([torch.stack([torch.randperm(T, generator=g)[:M].sort().values for _ in range(E)])
                           for _ in range(B)])  # (B, E, M) ascending
        valid = torch.rand(B, E, M, generator=g) > 0.2
        at = pos[..., None].expand(B, E, M, d)
        gate = torch.rand(B, E, M, 1, generator=g) + 0.5
        far = FarKeys(k.gather(2, at), v.gather(2, at) * gate, pos, valid)
    key_valid = None
    if pad:
        key_valid = torch.ones(B, T, dtype=torch.bool)
        key_valid[-1, :pad] = False  # the last row left-padded
    cast = lambda t: t.to(dtype)
    if far is not None:
        far = FarKeys(cast(far.k), cast(far.v), far.pos, far.valid)
    return cast(q), cast(k), cast(v), far, key_valid


CASES = [  # B, E, G, T, d, w, M, pad, reach
    (1, 1, 1, 1, 8, 4, 0, 0, None),
    (2, 2, 3, 37, 16, 5, 4, 0, None),
    (2, 3, 1, 70, 8, 1, 6, 9, None),
    (1, 2, 2, 150, 16, 64, 10, 0, None),
    (2, 1, 4, 200, 8, 100, 12, 70, None),
    (2, 2, 2, 130, 8, 16, 20, 5, 40),
    (1, 2, 3, 65, 8, 3, 0, 7, None),
    (2, 3, 1, 13, 8, 4, 4, 3, None),
    (2, 1, 3, 20, 8, 19, 4, 0, 22),
    (2, 3, 1, 9, 8, 3, 0, 3, None),
]


def _run(backend, case, dtype=torch.float32, grad=True):
    B, E, G, T, d, w, M, pad, reach = case
    q, k, v, far, key_valid = inputs(B, E, G, T, d, M, pad=pad, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if far is not None:
        far = FarKeys(far.k.requires_grad_(), far.v.requires_grad_(), far.pos, far.valid)
        leaves += [far.k, far.v]
    out = key_selection_attention(q, k, v, w, 0.3, far, key_valid, reach, backend=backend)
    return q, k, v, far, key_valid, out, leaves


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}E{}G{}T{}d{}w{}M{}pad{}reach{}".format(*c))
@pytest.mark.parametrize("backend", ["math", "flash"])
def test_backend_matches_the_masked_reference_forward_and_gradients(backend, case):
    q, k, v, far, key_valid, out, leaves = _run(backend, case)
    B, E, G, T, d, w, M, pad, reach = case
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    rfar = FarKeys(ref_leaves[3], ref_leaves[4], far.pos, far.valid) if far is not None else None
    ref = reference(rq, rk, rv, w, 0.3, rfar, key_valid, reach)
    real = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid  # padded queries: unspecified
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref) * real[:, :, None, None]
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_bf16_within_bf16_error(backend):
    case = (2, 2, 3, 150, 16, 32, 8, 11, None)
    B, E, G, T, d, w, M, pad, reach = case
    q, k, v, far, key_valid, out, _ = _run(backend, case, dtype=torch.bfloat16)
    f32 = lambda t: t.detach().float()
    ref = reference(f32(q), f32(k), f32(v), w, 0.3, FarKeys(f32(far.k), f32(far.v), far.pos, far.valid),
                    key_valid, reach)
    own = reference(f32(q).bfloat16().float(), f32(k), f32(v), w, 0.3,
                    FarKeys(f32(far.k), f32(far.v), far.pos, far.valid), key_valid, reach).bfloat16().float()
    bound = 4 * (own - ref).abs().max() + 1e-2  # bf16 rounding of the output alone, with room for the kernel's
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref)[key_valid].abs().max() <= bound


def test_flex_backend_on_cpu_matches_the_reference():
    """FlexAttention compiled on CPU (one small shape: its compilation is counted in the suite's budget)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from mosa_retrofit.ops.keys_flex import flex_key_selection

    case = (2, 2, 2, 200, 16, 48, 10, 9, None)
    B, E, G, T, d, w, M, pad, reach = case
    q, k, v, far, key_valid = inputs(B, E, G, T, d, M, pad=pad)
    out = flex_key_selection(q, k, v, w, 0.3, far, key_valid, reach)
    if out is None:
        pytest.skip("FlexAttention cannot compile on this machine (the dispatcher falls back, tested below)")
    ref = reference(q, k, v, w, 0.3, far, key_valid, reach)
    torch.testing.assert_close(out[key_valid], ref[key_valid], atol=1e-5, rtol=1e-5)


def test_flex_that_cannot_run_falls_back_with_one_warning(monkeypatch):
    from mosa_retrofit.ops import keys_flex

    def broken(device_type):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(keys_flex, "_compiled", broken)
    monkeypatch.setattr(keys_flex, "_FAILED", set())
    case = (1, 2, 2, 40, 8, 6, 3, 0, None)
    q, k, v, far, key_valid = inputs(*case[:6], case[6])
    with pytest.warns(UserWarning, match="could not run"):
        out = key_selection_attention(q, k, v, 6, 0.3, far, key_valid, backend="flex")
    torch.testing.assert_close(out, reference(q, k, v, 6, 0.3, far, key_valid), atol=1e-5, rtol=1e-5)


def test_bad_backend_is_refused():
    q, k, v, far, _ = inputs(1, 1, 1, 8, 4, 0)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        key_selection_attention(q, k, v, 2, 0.5, backend="cuda-magic")


def test_flex_in_training_on_cpu_trains_with_flash(monkeypatch):
    """FlexAttention has no backward on CPU: a training call asked for flex warns once and runs flash, whose
    gradients are the reference's."""
    from mosa_retrofit.ops import keys

    monkeypatch.setattr(keys, "_WARNED", set())
    case = (1, 2, 2, 40, 8, 6, 3, 0, None)
    with pytest.warns(UserWarning, match="no backward on CPU"):
        q, k, v, far, key_valid, out, leaves = _run("flex", case)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves[:3], 6, 0.3, FarKeys(ref_leaves[3], ref_leaves[4], far.pos, far.valid))
    out.sum().backward()
    ref.sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)
