"""convert/families.py: per-head views rebuild each family's projections; unknown families are refused."""

import pytest
import torch
from tiny_models import FAMILIES, plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.families import family_of
from mosa_retrofit.convert.surgery import attention_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_head_slicing_rebuilds_each_head_exactly(family):
    """Per-head views of q/k/v/o recombine into the module's own projections (no reshuffled heads)."""
    model = tiny_model(family)
    fam = family_of(model)
    _, m = attention_layers(model)[0]
    W = fam.head_weights(m)
    H, d = W.num_heads, W.head_dim
    x = torch.randn(3, W.wq.shape[2])
    # recompute q for head h from the module's full projection output, laid out as the family lays it out
    full_q = torch.stack([x @ W.wq[h].t() for h in range(H)], 1)  # (3, H, d)
    if family == "gpt2":
        q, k, v = m.c_attn(x[None])[0].split(W.wq.shape[2], dim=-1)
        q = q - m.c_attn.bias[: W.wq.shape[2]]
        torch.testing.assert_close(q.view(3, H, d), full_q, atol=1e-6, rtol=0)
    elif family == "gpt_neox":
        qkv = torch.nn.functional.linear(x, m.query_key_value.weight).view(3, H, 3 * d)
        torch.testing.assert_close(qkv[..., :d], full_q, atol=1e-6, rtol=0)
    elif family == "phi3":
        q = torch.nn.functional.linear(x, m.qkv_proj.weight)[:, : H * d]
        torch.testing.assert_close(q.view(3, H, d), full_q, atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(torch.nn.functional.linear(x, m.q_proj.weight).view(3, H, d), full_q,
                                   atol=1e-6, rtol=0)
    # the output projection: sum over heads of o_h @ wo[:, h].T equals the full projection
    o = torch.randn(3, H, d)
    per_head = sum(o[:, h] @ W.wo[:, h].t() for h in range(H))
    full = o.reshape(3, H * d) @ W.wo.reshape(W.wo.shape[0], H * d).t()
    torch.testing.assert_close(per_head, full, atol=1e-5, rtol=0)
    assert W.wq.data_ptr() >= 0 and W.wq._base is not None  # a view: training updates the model's weights


def test_unsupported_family_lists_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                       intermediate_size=64, is_decoder=True))
    with pytest.raises(ValueError, match=r"unsupported model family 'bert'.*supported: \['gemma'"):
        convert_(model, plain_config())
