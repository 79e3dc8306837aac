"""convert_ on tiny random models of all 11 families: identity, slicing, GQA, kv_group, local heads, errors."""

import copy
import math
import re

import pytest
import torch
from naive import naive_layer
from tiny_models import (
    FAMILIES,
    GQA_FAMILIES,
    IDENTITY,
    ids_and_mask,
    plain_config,
    tiny_model,
)

from mosa_retrofit import convert_
from mosa_retrofit.convert.compat import output_cache, with_cache
from mosa_retrofit.convert.families import dense_kv_layout, family_of
from mosa_retrofit.convert.heads import Call
from mosa_retrofit.convert.surgery import attention_layers, mosa_layers


def backends(family):
    return ["eager"] if family == "gemma2" else ["sdpa", "eager"]  # gemma2 has no sdpa support


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dense_heads", [0, 2])
def test_identity_sparsity_one_straight_through(family, dense_heads):
    """Every token selected, multipliers exactly 1: the converted model reproduces the original logits."""
    for impl in backends(family):
        model = tiny_model(family, impl)
        ids, mask = ids_and_mask()
        with torch.no_grad():
            ref, ref_pad = model(ids).logits, model(ids, attention_mask=mask).logits
            convert_(model, plain_config(dense_heads=dense_heads, **IDENTITY))
            assert len(mosa_layers(model)) == 2
            out, out_pad = model(ids).logits, model(ids, attention_mask=mask).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        real = mask.bool()
        torch.testing.assert_close(out_pad[real], ref_pad[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("granularity, dense", [("head", [1, 2]), ("head", [0]), ("kv_group", [2, 3])])
def test_converted_layer_matches_naive_reference(granularity, dense):
    model = tiny_model("llama")
    cfg = plain_config(sparsity=3, dense_head_ids={"0": dense, "1": dense}, router_score="sigmoid",
                     router_granularity=granularity, include_first=True)
    x = torch.randn(2, 17, 64)
    _, attn = attention_layers(model)[0]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(attn, name).bias is not None:
                getattr(attn, name).bias.zero_()
    pos = torch.arange(17)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    convert_(model, cfg)
    W = family_of(model).head_weights(attn)
    mosa_heads = [h for h in range(4) if h not in dense]
    group = 2 if granularity == "kv_group" else 1
    y, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
    ref = naive_layer(x, W, dense, mosa_heads, attn.mosa_router.detach(), 3, attn.scaling, True, cos, sin, group)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert attn.mosa_router.shape == (len(mosa_heads) // group, 64)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gqa_dense_groups_keep_compact_kv_and_uneven_splits_expand(family):
    model = tiny_model(family)
    H, KV, _ = family_of(model).dims(attention_layers(model)[0][1])
    G = H // KV
    n = min(G, H - 1)  # heads of KV head 0 only (MQA: all but one head)
    convert_(model, plain_config(sparsity=2, dense_heads=n))
    m = attention_layers(model)[0][1]
    assert dense_kv_layout(m.mosa_plan.dense, H, KV) == ((0,), n) and m.num_key_value_groups == n
    model2 = tiny_model(family)
    if KV > 1:
        convert_(model2, plain_config(sparsity=2, dense_head_ids={"0": [0, G], "1": [0]}))
        m2 = attention_layers(model2)[0][1]
        assert dense_kv_layout(m2.mosa_plan.dense, H, KV) == ((0, 1), 1)  # one dense head in each of two groups
        assert m2.num_key_value_groups == 1


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_kv_group_routing_shares_selection_and_identity(family):
    model = tiny_model(family)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        ref = model(ids).logits
        convert_(model, plain_config(dense_heads=2, router_granularity="kv_group", **IDENTITY))
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    m = attention_layers(model)[0][1]
    assert m.mosa_router.shape[0] == 1 and m.mosa_plan.heads_per_unit == 2  # one group of 2 heads routes


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_local_kept_heads_match_windowed_dense_model(family):
    """kept_heads='local' with window w equals the original model whose dense heads see only the last w keys:
    build that reference by converting with an all-dense layer of local heads vs explicit banded attention."""
    model = tiny_model(family)
    ids, mask = ids_and_mask(T=20)
    ref_model = copy.deepcopy(model)
    convert_(model, plain_config(dense_heads=2, kept_heads="local", local_window=5, **IDENTITY))
    # reference: eager model with a hand-made banded mask on the kept heads = run the same layer twice,
    # once with local_window >= T (plain dense) and compare that it then equals the original
    convert_(ref_model, plain_config(dense_heads=2, kept_heads="local", local_window=10_000, **IDENTITY))
    original = tiny_model(family)
    with torch.no_grad():
        torch.testing.assert_close(ref_model(ids, attention_mask=mask).logits[mask.bool()],
                                   original(ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=0)
        windowed = model(ids, attention_mask=mask).logits
    assert not torch.allclose(windowed, ref_model(ids, attention_mask=mask).logits, atol=1e-3)
    # causality + window: changing token 3 does not change outputs at positions >= 3 + window ... for the
    # local heads alone; with MoSA heads at sparsity 1 everything still sees token 3, so check the band mask
    m = attention_layers(model)[0][1]
    q = k = v = torch.randn(1, 2, 12, 16)
    kept = m.mosa_groups[0]
    assert kept.kind == "local" and kept.heads == m.mosa_plan.dense
    a = kept.attend(m, Call(x=None, W=None, mask=None, cache=None, cos=None, sin=None, extra={}), q, k, v, 1)
    s = (q @ k.transpose(-1, -2)) * m.mosa_family.scaling(m)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    band = (j <= i) & (j > i - 5)
    ref = s.masked_fill(~band, -math.inf).softmax(-1) @ v
    torch.testing.assert_close(a, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_sliding_window_layers_keep_their_window_in_mosa_heads():
    model = tiny_model("gemma2", "eager")  # layer 0 slides with window 8; T = 24 > 8
    ids, _ = ids_and_mask()
    with torch.no_grad():
        ref = model(ids).logits
        convert_(model, plain_config(dense_heads=0, **IDENTITY))
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)


def test_short_sliding_windows_stay_as_they_are_by_default():
    """keep_sliding: a layer whose own window is at most keep_sliding tokens is not converted (its logits are the
    original's up to that layer); a longer window, or keep_sliding=0, converts it."""
    model = tiny_model("gemma3_text")  # layer 0 slides with window 8, layer 1 attends everything
    ids, _ = ids_and_mask()
    kept = convert_(tiny_model("gemma3_text"), plain_config(dense_heads=1, keep_sliding=8))
    assert sorted(mosa_layers(kept)) == [1]
    assert not hasattr(attention_layers(kept)[0][1], "mosa_plan")
    every = convert_(tiny_model("gemma3_text"), plain_config(dense_heads=1, keep_sliding=7))
    assert sorted(mosa_layers(every)) == [0, 1]
    with torch.no_grad():  # the kept layer is the original's: hidden states after it agree
        h0 = model(ids, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(kept(ids, output_hidden_states=True).hidden_states[1], h0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dense_heads=5), "asks for 5 dense heads in layer 0, which has 4 heads"),
    (dict(dense_head_ids={"0": [0, 7]}), r"dense_head_ids\['0'\]"),
    (dict(dense_head_ids={"9": [0]}), "names layers"),
    (dict(layers=[0, 5]), "names layers"),
    (dict(head_choice="scored"), "needs calibration text"),
    (dict(router_init="calibrated"), "needs calibration text"),
    (dict(head_choice="scored", dense_heads=5), "asks for 5 dense heads"),  # bad layout named before calibrating
])
def test_bad_configs_raise_before_the_model_is_touched(kwargs, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        convert_(model, plain_config(**kwargs))
    assert not mosa_layers(model) and not hasattr(model, "mosa_targets")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_already_converted_and_wrong_config_type():
    model = tiny_model("llama")
    convert_(model, plain_config())
    with pytest.raises(ValueError, match="already converted"):
        convert_(model, plain_config())
    with pytest.raises(TypeError, match="MoSAConfig"):
        convert_(tiny_model("llama"), {"sparsity": 8})


def test_expert_choice_refuses_incremental_decoding():
    model = tiny_model("llama")
    convert_(model, plain_config(dense_heads=2))
    ids, _ = ids_and_mask()
    out = model(ids, use_cache=True)  # training-style forward with a cache works
    with pytest.raises(ValueError, match="cannot decode token by token"):
        model(ids[:, -1:], **with_cache(model, output_cache(out)), use_cache=True)


def test_gradients_reach_routers_and_original_weights():
    model = tiny_model("qwen2").train()
    convert_(model, plain_config(sparsity=4, dense_heads=1, router_score="sigmoid"))
    ids, _ = ids_and_mask()
    model(ids, labels=ids, use_cache=False).loss.backward()
    m = attention_layers(model)[0][1]
    assert m.mosa_router.grad.abs().sum() > 0
    assert m.q_proj.weight.grad[16:].abs().sum() > 0  # MoSA heads 1..3 train the original q rows


# ----------------------------------------------------------------------------- the GQA-aware default layout

def test_counts_round_up_to_whole_kv_groups_and_say_so(caplog):
    model = tiny_model("llama")  # 4 query heads in 2 KV groups of 2
    with caplog.at_level("WARNING", logger="mosa_retrofit"):
        convert_(model, plain_config(dense_heads=1, router_granularity="kv_group"))
    assert "dense heads rounded up from 1 to 2 (whole KV groups of 2 query heads) in layers 0-1" in caplog.text
    for m in mosa_layers(model).values():
        assert (m.mosa_plan.dense, m.mosa_plan.mosa, m.mosa_plan.granularity) == ((0, 1), (2, 3), "kv_group")
        assert m.mosa_router.shape[0] == 1  # one router (one selection, one K/V copy) for the group


def test_split_groups_route_per_head_and_a_growing_cache_is_named(caplog):
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="mosa_retrofit"):  # explicit heads split group 0 in layer 0
        convert_(model, plain_config(sparsity=2, dense_head_ids={"0": [0]}, dense_heads=2, router_granularity="kv_group"))
    plans = {i: m.mosa_plan for i, m in mosa_layers(model).items()}
    assert plans[0].granularity == "head" and plans[1].granularity == "kv_group"
    assert "layer 0: the dense heads split a KV group" in caplog.text
    # layer 0 caches KV head 0 (T rows) + 3 heads x T/2 rows against 2 x T: the total grows past the original
    assert "will not shrink the cache" in caplog.text


def test_mqa_keeps_the_count_when_whole_groups_would_leave_no_mosa_head(caplog):
    model = tiny_model("gemma")  # 4 query heads, 1 KV head: a whole group is the whole layer
    with caplog.at_level("WARNING", logger="mosa_retrofit"):
        convert_(model, plain_config(dense_heads=1, router_granularity="kv_group"))
    assert all(m.mosa_plan.dense == (0,) and m.mosa_plan.granularity == "head" for m in mosa_layers(model).values())
    assert "split a KV group" in caplog.text


def test_paper_form_kv_group_layout_shrinks_the_kv_cache_in_bytes_by_the_layout_factor():
    """Paper-form heads routed per KV group (the version-2 default) on a GQA model: one dense KV group + one
    MoSA unit of the other group. Computed here from the layout: the cost model's KV bytes are (T + k) / (2 T) of the original's; a real prefill caches exactly T dense
    rows per layer plus the rows the unit's router passes (x_t · w > τ, or the first token), counted here from
    the router, at 2 · d · 4 bytes a row."""
    from tiny_models import prefill_capturing_inputs

    from mosa_retrofit import MoSAConfig
    from mosa_retrofit.convert.cache import cache_bytes
    from mosa_retrofit.convert.costs import cost_ratios

    model = tiny_model("llama")
    calib = torch.randint(1, 128, (8, 64), generator=torch.Generator().manual_seed(3))
    convert_(model, MoSAConfig(sparsity=4, dense_heads=1, sparse_heads="mosa", head_choice="scored",
                               dense_scope="layer"), calibration=calib, progress=False)
    layers = mosa_layers(model)
    assert all(len(m.mosa_plan.dense) == 2 and m.mosa_router.shape[0] == 1 for m in layers.values())
    T, d, L = 64, 16, 2
    assert cost_ratios(model, T).kv_bytes == pytest.approx((T + T // 4) / (2 * T), abs=1e-12)
    x = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(4))
    cache, inputs = prefill_capturing_inputs(model, x)
    selected = 0
    for i, m in layers.items():
        passes = (inputs[i][0] @ m.mosa_router[0].detach()) > m.mosa_threshold[0]
        passes[0] = True  # include_first
        selected += int(passes.sum())
    row = 2 * d * 4  # K and V, fp32
    held = cache_bytes(cache)
    assert held.dense == L * T * row and held.mosa == selected * row
    original = L * 2 * T * row  # 2 KV heads
    assert (held.dense + held.mosa) / original == pytest.approx((L * T + selected) / (2 * L * T))
    assert 0.5 < (held.dense + held.mosa) / original < 0.5 + 0.5 * 0.5  # about (1 + 1/4) / 2


@pytest.mark.parametrize("over, needle", [
    (dict(dense_heads=4), "converts no attention layer (dense_heads=4 keeps every head"),
    (dict(dense_heads=0.9), "converts no attention layer (dense_heads=0.9"),  # rounds to 4 of 4
    (dict(sparsity=1e12), "MoSAConfig.sparsity=1e+12 routes less than one token per sequence of the model's 128"),
])
def test_a_config_that_converts_nothing_or_nearly_is_refused(over, needle):
    model = tiny_model("llama")  # 4 heads per layer, 128 positions
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(needle)):
        convert_(model, plain_config(**over))
    assert not mosa_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="converts no attention layer"):
        convert_(model, plain_config(), filter_fn=lambda m, name: False)




def test_calibration_rows_beyond_the_models_positions_are_refused_before_any_work():
    model = tiny_model("llama")  # 128 positions
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration rows hold 200 tokens, beyond the model's 128 positions"):
        convert_(model, plain_config(sparsity=4, dense_heads=1, routing="causal"),
                 calibration=torch.randint(0, 128, (2, 200)))
    assert not mosa_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
