"""Official-layout state_dicts, built by hand, loaded into our modules, against the naive reference."""

import pytest
import torch
from naive import ref_dense, ref_mosa

from mosa_retrofit import MoSA, PureMoSA, load_reference_state_dict

h, d, E, n_other = 48, 8, 5, 3


def official_pure(E=E, scale=h**-0.5):
    g = torch.Generator().manual_seed(1)
    return {
        "r.0.weight": torch.randn(E, h, generator=g) * scale,
        "QKV.W": torch.randn(E, h, 3 * d, generator=g) * scale,
        "O.W": torch.randn(E, d, h, generator=g) * scale,
    }


def official_hybrid(hybrid_type):
    sd = {f"mosa_heads.{k}": v for k, v in official_pure().items()}
    g = torch.Generator().manual_seed(2)
    sd["other_heads.W_QKV.weight"] = torch.randn(3 * d * n_other, h, generator=g) * h**-0.5
    sd["other_heads.W_O.weight"] = torch.randn(h, d * n_other, generator=g) * h**-0.5
    if hybrid_type == "local":
        sd["other_heads.local_attention.rel_pos.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    return sd


def grads(out, tensors):
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return torch.autograd.grad((out * probe).sum(), tensors)


@pytest.mark.parametrize("T, sparsity, include_first", [(64, 4, False), (64, 8, True), (37, 5, False), (3, 8, True)])
def test_pure_matches_official_forward_and_grads(T, sparsity, include_first):
    sd = official_pure()
    m = load_reference_state_dict(PureMoSA(h=h, h_prim=d, num_mosa_heads=E, sparsity=sparsity,
                                           include_first=include_first), sd)
    x = torch.randn(2, T, h, requires_grad=True)
    y = m(x)
    leaves = [sd[k].clone().requires_grad_() for k in ("r.0.weight", "QKV.W", "O.W")]
    y_ref = ref_mosa(x, *leaves, sparsity, include_first)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = grads(y, [x, m.router, m.w_qkv, m.w_o])
    g_ref = grads(y_ref, [x, *leaves])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hybrid_type, T", [("dense", 40), ("local", 40), ("local", 37)])
def test_hybrid_matches_official(hybrid_type, T):
    sd = official_hybrid(hybrid_type)
    max_seq_len, sparsity = 64, 8  # local window = 8; T = 37 is not a multiple of it
    m = MoSA(h=h, h_prim=d, num_mosa_heads=E, num_other_heads=n_other, max_seq_len=max_seq_len,
             sparsity=sparsity, hybrid_type=hybrid_type)
    load_reference_state_dict(m, sd)
    x = torch.randn(2, T, h, requires_grad=True)
    window = max_seq_len // sparsity if hybrid_type == "local" else None
    y_ref = ref_mosa(x, sd["mosa_heads.r.0.weight"], sd["mosa_heads.QKV.W"], sd["mosa_heads.O.W"], sparsity) + ref_dense(
        x, sd["other_heads.W_QKV.weight"], sd["other_heads.W_O.weight"], n_other, window=window)
    y = m(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads(y, [x])[0], grads(y_ref, [x])[0], atol=1e-5, rtol=1e-5)


def test_loader_rejects_mismatched_state_dicts_before_touching_the_module():
    m = PureMoSA(h=h, h_prim=d, num_mosa_heads=E, sparsity=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sd = official_pure()
    bad_shape = dict(sd, **{"O.W": torch.zeros(E, d + 1, h)})
    with pytest.raises(ValueError, match=r"O\.W"):
        load_reference_state_dict(m, bad_shape)
    with pytest.raises(ValueError, match=r"missing keys \['r\.0\.weight'\]"):
        load_reference_state_dict(m, {k: v for k, v in sd.items() if k != "r.0.weight"})
    with pytest.raises(ValueError, match="unexpected keys"):
        load_reference_state_dict(m, dict(sd, extra=torch.zeros(1)))
    with pytest.raises(TypeError, match="PureMoSA"):
        load_reference_state_dict(torch.nn.Linear(2, 2), sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
