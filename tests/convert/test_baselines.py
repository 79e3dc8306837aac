"""The study baselines: sparse_heads='pruned' (heads removed) and 'local' (sliding-window heads), and their costs."""

import copy

import pytest
import torch
from tiny_models import IDENTITY, ids_and_mask, plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.compat import output_cache, with_cache
from mosa_retrofit.convert.surgery import attention_layers, mosa_layers
from mosa_retrofit.train.trainable import select_trainable

KEEP = {"0": [1], "1": [2]}  # heads kept dense per layer; the other 3 of 4 are replaced


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_heads_equal_zeroed_output_columns(family):
    """Pruning = the original model with those heads' o_proj input columns set to zero."""
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, keep in KEEP.items():
            o = ref.model.layers[int(layer)].self_attn.o_proj.weight  # (D, H·d)
            for h in range(model.config.num_attention_heads):
                if h not in keep:
                    o[:, h * d:(h + 1) * d] = 0
    convert_(model, plain_config(dense_head_ids=KEEP, sparse_heads="pruned", sparsity=4))
    assert all(not hasattr(m, "mosa_router") for m in mosa_layers(model).values())  # no routers for baselines
    ids, mask = ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(ids, attention_mask=mask).logits[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_local_sparse_heads(family):
    """sparse_heads='local': a window >= T is the original model; a window w equals the same heads run as
    local *kept* heads (whose band mask test_surgery checks against explicit math) beside identity MoSA heads."""
    ids, mask = ids_and_mask(T=20)
    H = 4
    replaced = {k: [h for h in range(H) if h not in v] for k, v in KEEP.items()}
    original = tiny_model(family)
    wide = convert_(tiny_model(family), plain_config(dense_head_ids=KEEP, sparse_heads="local", local_window=64))
    local = convert_(tiny_model(family), plain_config(dense_head_ids=KEEP, sparse_heads="local", local_window=5))
    kept = convert_(tiny_model(family), plain_config(dense_head_ids=replaced, kept_heads="local", local_window=5,
                                                   **IDENTITY))
    with torch.no_grad():
        sel = mask.bool()
        ref = original(ids, attention_mask=mask).logits[sel]
        torch.testing.assert_close(wide(ids, attention_mask=mask).logits[sel], ref, atol=1e-4, rtol=0)
        out = local(ids, attention_mask=mask).logits[sel]
        torch.testing.assert_close(out, kept(ids, attention_mask=mask).logits[sel], atol=1e-4, rtol=0)
        assert not torch.allclose(out, ref, atol=1e-3)
    # prefill with a cache works; token-by-token decoding is refused with a clear message
    past = output_cache(local(ids, use_cache=True))
    with pytest.raises(ValueError, match="do not decode token by token"):
        local(ids[:, -1:], **with_cache(local, past), use_cache=True)


def test_baselines_train_without_routers_and_refuse_what_needs_them():
    model = convert_(tiny_model("llama").train(), plain_config(dense_head_ids=KEEP, sparse_heads="local",
                                                             local_window=4))
    plain, masked = select_trainable(model, "mosa")
    ids, _ = ids_and_mask()
    model(ids, labels=ids, use_cache=False).loss.backward()
    m = attention_layers(model)[0][1]
    g = m.q_proj.weight.grad.view(4, 16, -1).abs().sum((1, 2))  # per query head; head 1 is kept dense
    assert g[1] == 0 and bool((g[[0, 2, 3]] > 0).all())
    from mosa_retrofit.train.warmup import RouterWarmup

    with pytest.raises(ValueError, match="router warm-up needs routed MoSA heads"):
        RouterWarmup(mosa_layers(model))
    # baselines have no routers: routing does not apply to them (the default causal routing is accepted)
    pruned = convert_(tiny_model("llama"), plain_config(sparse_heads="pruned", routing="causal"))
    assert mosa_layers(pruned) and not any(hasattr(m, "mosa_router") or hasattr(m, "mosa_threshold")
                                           for m in mosa_layers(pruned).values())
    with pytest.raises(ValueError, match="sparse_heads must be one of"):
        plain_config(sparse_heads="dropped")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma3_text"])
def test_streaming_heads(family):
    """sparse_heads='streaming' (DuoAttention's streaming heads): a window >= T is the original model; without
    sinks it is the sliding-window baseline; sinks change the output; decoding is refused."""
    ids, mask = ids_and_mask(T=20)
    sel = mask.bool()
    run = lambda **kw: convert_(tiny_model(family), plain_config(dense_head_ids=KEEP, **kw))
    with torch.no_grad():
        ref = tiny_model(family)(ids, attention_mask=mask).logits[sel]
        wide = run(sparse_heads="streaming", local_window=64)(ids, attention_mask=mask).logits[sel]
        torch.testing.assert_close(wide, ref, atol=1e-4, rtol=0)
        no_sinks = run(sparse_heads="streaming", local_window=5, sink_tokens=0)(ids, attention_mask=mask).logits[sel]
        local = run(sparse_heads="local", local_window=5)(ids, attention_mask=mask).logits[sel]
        if family != "gemma3_text":  # (its sliding layers already bound the local baseline differently)
            torch.testing.assert_close(no_sinks, local, atol=1e-4, rtol=0)
        sinks = run(sparse_heads="streaming", local_window=5, sink_tokens=2)
        assert not torch.allclose(sinks(ids, attention_mask=mask).logits[sel], no_sinks, atol=1e-3)
    # causal routing (the default) sets thresholds for routed heads only: streaming heads have none
    calibrated = convert_(tiny_model(family), plain_config(dense_head_ids=KEEP, sparse_heads="streaming",
                                                           routing="causal"), calibration=ids)
    assert not any(hasattr(m, "mosa_threshold") for m in mosa_layers(calibrated).values())
    # (decoding with a cache: tests/test_mosa_keys.py, against the full forward)


