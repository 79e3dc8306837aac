"""PureMoSA / MoSA: the seed interface, identities, dtypes and devices, padding, bad arguments."""

import pytest
import torch
from naive import ref_dense, ref_mosa

from mosa_retrofit import MoSA, PureMoSA
from mosa_retrofit.layers.modules import DenseHeadsModule
from mosa_retrofit.ops.rope import rope_cos_sin

h, d = 32, 8


def test_readme_interface_positional_and_keyword():
    x = torch.rand(2, 64, h)
    hybrid = MoSA(h, d, 4, 3, 64, 16, "dense")  # the official README's positional call
    assert hybrid(x).shape == x.shape
    pure = PureMoSA(h=h, h_prim=d, num_mosa_heads=4, max_seq_len=64, sparsity=16, include_first=True,
                    rotate_fraction=0.25, rope_base=500)
    assert pure(x).shape == x.shape


def test_identity_all_tokens_straight_through_equals_dense_heads():
    """sparsity 1 + straight-through scores: every head sees every token with multiplier 1, so the MoSA
    heads must reproduce dense causal heads built from the same weights."""
    n = 4
    mosa = PureMoSA(h=h, h_prim=d, num_mosa_heads=n, sparsity=1, router_score="straight_through")
    dense = DenseHeadsModule(h, d, n)
    with torch.no_grad():  # dense layout: qkv rows head-major [q|k|v]; out columns head-major
        dense.qkv.weight.copy_(mosa.w_qkv.permute(0, 2, 1).reshape(n * 3 * d, h))
        dense.out.weight.copy_(mosa.w_o.reshape(n * d, h).t())
    x = torch.randn(3, 50, h)
    torch.testing.assert_close(mosa(x), dense(x), atol=1e-5, rtol=1e-5)


def test_rotate_fraction_zero_and_full_work():
    x = torch.randn(1, 20, h)
    for frac in (0.0, 1.0, 0.1):  # 0.1 * 8 = 0.8 -> no rotated dims (the reference crashes here)
        m = PureMoSA(h=h, h_prim=d, num_mosa_heads=2, sparsity=2, rotate_fraction=frac)
        ref = ref_mosa(x, m.router, m.w_qkv, m.w_o, 2, rotate_fraction=frac)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_rope_positions_exact_in_bf16_beyond_256():
    cos, sin = rope_cos_sin(torch.tensor([257, 513, 1023]), 8, 10000, dtype=torch.bfloat16)
    assert cos.dtype == torch.float32
    ang = torch.tensor([257.0, 513.0, 1023.0], dtype=torch.float64)[:, None]  # highest frequency: 1
    torch.testing.assert_close(cos[:, 0].double(), ang[:, 0].cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 0].double(), ang[:, 0].sin(), atol=1e-6, rtol=0)


def test_bf16_module_matches_fp32_reference_at_long_positions():
    """At sparsity 1 every token is selected, so bf16 and fp32 see the same tokens; rounding positions to
    bf16 (257 -> 256, as the reference does) would change the angles by up to 1 rad and fail this."""
    m = PureMoSA(h=h, h_prim=d, num_mosa_heads=2, sparsity=1, rotate_fraction=1.0)
    mb = PureMoSA(h=h, h_prim=d, num_mosa_heads=2, sparsity=1, rotate_fraction=1.0).to(torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    x = torch.randn(1, 600, h).to(torch.bfloat16)
    params = [p.detach().to(torch.bfloat16).float() for p in (m.router, m.w_qkv, m.w_o)]
    ref = ref_mosa(x.float(), *params, 1, rotate_fraction=1.0)
    y = mb(x)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref)[0, 256:].abs().max() / ref[0, 256:].abs().max()
    assert err < 0.03, err


def test_dtype_and_device_moves_keep_working():
    m = MoSA(h=h, h_prim=d, num_mosa_heads=3, num_other_heads=2, max_seq_len=64, sparsity=4, hybrid_type="local")
    x = torch.randn(2, 40, h)
    y = m(x)
    m.double()
    torch.testing.assert_close(m(x.double()).float(), y, atol=1e-5, rtol=1e-5)
    m.to(torch.bfloat16)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
    if torch.cuda.is_available():
        m.float().cuda()
        torch.testing.assert_close(m(x.cuda()).cpu(), y, atol=1e-4, rtol=1e-4)


def test_local_heads_match_banded_reference_in_bf16():
    m = MoSA(h=h, h_prim=d, num_mosa_heads=1, num_other_heads=2, max_seq_len=512, sparsity=1, hybrid_type="local")
    m.mosa_heads = None  # only the local part
    x = torch.randn(1, 700, h)
    ref = ref_dense(x, m.other_heads.qkv.weight, m.other_heads.out.weight, 2, window=512)
    m.to(torch.bfloat16)
    y = m(x.to(torch.bfloat16)).float()
    assert (y - ref).abs().max() / ref.abs().max() < 0.03


@pytest.mark.parametrize("hybrid_type", ["dense", "local"])
def test_left_padding_rows_match_unpadded(hybrid_type):
    m = MoSA(h=h, h_prim=d, num_mosa_heads=3, num_other_heads=2, max_seq_len=32, sparsity=4,
             hybrid_type=hybrid_type)
    x = torch.randn(2, 24, h)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :8] = 0
    y = m(x, attention_mask=mask)
    assert (y[1, :8] == 0).all()
    if hybrid_type == "dense":  # local windows are laid out on the padded sequence, so only dense is shift-free
        torch.testing.assert_close(y[1:, 8:], m(x[1:, 8:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:1], m(x[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sparsity=0.5), "sparsity"),
        (dict(sparsity=0), "sparsity"),
        (dict(h_prim=0), "h_prim"),
        (dict(h=0), "h"),
        (dict(rotate_fraction=1.5), "rotate_fraction"),
        (dict(rotate_fraction=-0.1), "rotate_fraction"),
        (dict(num_mosa_heads=-1), "num_mosa_heads"),
        (dict(router_score="softmax"), "router_score"),
        (dict(hybrid_type="global"), "hybrid_type"),
        (dict(hybrid_type="local", max_seq_len=None), "max_seq_len"),
        (dict(hybrid_type="local", max_seq_len=4, sparsity=8), "max_seq_len"),
        (dict(num_mosa_heads=0, num_other_heads=0), "num_mosa_heads"),
        (dict(rope_base=0), "rope_base"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = dict(h=h, h_prim=d, num_mosa_heads=2, num_other_heads=1, max_seq_len=64, sparsity=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        MoSA(**args)


def test_pure_rejects_zero_heads():
    with pytest.raises(ValueError, match="num_mosa_heads"):
        PureMoSA(h=h, h_prim=d, num_mosa_heads=0, sparsity=2)


@pytest.mark.parametrize("shape", [(4, h), (1, 2, 4, h), (1, 5, h + 1), (1, 0, h)])
def test_bad_input_shape(shape):
    m = MoSA(h=h, h_prim=d, num_mosa_heads=2, num_other_heads=1, max_seq_len=64, sparsity=4)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, T >= 1, h=32\)"):
        m(torch.randn(shape))


def test_bad_mask_shape():
    m = PureMoSA(h=h, h_prim=d, num_mosa_heads=2, sparsity=4)
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randn(2, 5, h), attention_mask=torch.ones(2, 6))
