"""Stage parameter selection: MoSA-head gradient masks on shared tensors, LoRA deltas seen by MoSA heads."""

import pytest
import torch
from tiny_models import FAMILIES, plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.surgery import mosa_layers
from mosa_retrofit.train.recipe import LoRASpec
from mosa_retrofit.train.trainable import (
    apply_lora,
    head_masks,
    remove_hooks,
    select_trainable,
)


def test_llama_gqa_masks_by_hand():
    """4 query heads, 2 KV heads (heads 0,1 -> kv 0; 2,3 -> kv 1), head 0 dense: rows of heads 1-3 in q, columns
    of heads 1-3 in o, KV head 1 only (KV head 0 also serves dense head 0), biases likewise."""
    model = tiny_model("llama")  # attention_bias=True, head_dim 16
    convert_(model, plain_config(sparsity=4, dense_heads=1))
    m = mosa_layers(model)[0]
    masks = head_masks(m)
    d = 16
    q = torch.zeros(64, 64)
    q[d:] = 1
    kv = torch.zeros(32, 64)
    kv[d:] = 1
    o = torch.zeros(64, 64)
    o[:, d:] = 1
    expected = {"q_proj.weight": q, "k_proj.weight": kv, "v_proj.weight": kv, "o_proj.weight": o,
                "q_proj.bias": q[:, 0], "k_proj.bias": kv[:, 0], "v_proj.bias": kv[:, 0]}
    assert set(masks) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask), name
    assert all(not p.is_set_to(torch.empty(0)) for p in m.parameters())  # parameters restored


def test_gpt2_fused_transposed_layout_by_hand():
    model = tiny_model("gpt2")  # c_attn (D, 3D) = [q | k | v] columns, c_proj (D, D): in x out
    convert_(model, plain_config(sparsity=4, dense_heads=1))
    m = mosa_layers(model)[0]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = head_masks(m)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])  # the index trick leaves the weights untouched
    D, d = 64, 16
    attn = torch.zeros(D, 3 * D)
    for part in range(3):  # head 0 dense; q, k and v of heads 1-3 (no GQA: each KV head is its own)
        attn[:, part * D + d: (part + 1) * D] = 1
    proj = torch.zeros(D, D)
    proj[d:, :] = 1  # c_proj input rows of heads 1-3
    assert torch.equal(masks["c_attn.weight"], attn)
    assert torch.equal(masks["c_attn.bias"], attn[0])
    assert torch.equal(masks["c_proj.weight"], proj)
    assert "c_proj.bias" not in masks  # shared by all heads: frozen


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_gradients_leave_dense_heads_exact(family):
    """One AdamW step on the 'mosa' selection: every dense head's output is unchanged, MoSA heads move."""
    model = tiny_model(family).train()
    convert_(model, plain_config(sparsity=2, dense_heads=2))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain, masked = select_trainable(model, "mosa")
    opt = torch.optim.AdamW([{"params": plain}, {"params": [p for p, _ in masked], "weight_decay": 0.0}], lr=1e-2)
    model(torch.randint(1, 128, (2, 16)), labels=torch.randint(1, 128, (2, 16))).loss.backward()
    opt.step()
    remove_hooks(masked)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, ref[n])}
    assert changed and all("self_attn" in n or "attn" in n or "attention" in n for n in changed)
    assert any("mosa_router" in n for n in changed)
    for p, mask in masked:
        name = next(n for n, q in model.named_parameters() if q is p)
        assert torch.equal(p[mask == 0], ref[name][mask == 0]), name  # frozen slices bit-exact
        assert not torch.equal(p[mask == 1], ref[name][mask == 1]), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_lora_deltas_reach_mosa_and_dense_heads(family):
    """The converted attention reads weights, not Linear outputs: a LoRA-wrapped model must equal its merge."""
    model = tiny_model(family)
    convert_(model, plain_config(sparsity=2, dense_heads=1))
    targets = {"llama": ["q_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"], "phi3": ["qkv_proj", "o_proj"]}
    peft_model = apply_lora(model, LoRASpec(r=4, target_modules=targets[family]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # peft starts B at 0; make the adapters do something
    ids = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        wrapped = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits
    assert (wrapped - plain).abs().max() > 1e-3  # the adapters change the converted attention
    torch.testing.assert_close(wrapped, merged_logits, atol=1e-5, rtol=0)
    plain_sel, masked = select_trainable(merged, "routers")
    assert not masked and all(p.requires_grad == any(p is q for q in plain_sel) for p in merged.parameters())


def test_lora_bad_targets():
    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=2, dense_heads=1))
    with pytest.raises(ValueError, match="c_attn"):
        apply_lora(model, LoRASpec(target_modules=["c_attn"]))
