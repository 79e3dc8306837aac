"""convert/costs.py: the cost model of every head kind against hand formulas."""

import torch
from tiny_models import KEEP, ids_and_mask, plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.costs import attention_costs, equal_compute_window


def test_costs_against_hand_formulas():
    D, d, T, w, s, sparsity = 64, 16, 64, 8, 2, 4
    k = T // sparsity
    model = convert_(tiny_model("llama"), plain_config(dense_head_ids=KEEP, sparse_heads="mosa_keys", local_window=w,
                                                      sink_tokens=s, sparsity=sparsity))
    pairs = sum(min(t + 1, w) for t in range(T))
    dense = 8 * D * d * T + 2 * d * T * T
    head = 8 * D * d * T + 4 * d * (pairs + int((s + k / 2) * T))  # sinks, and half of the routed keys on average
    for row in attention_costs(model, T):
        assert row.flops == dense + 3 * head + 3 * 2 * D * T  # + one router per head
        assert row.kv == T + 3 * (w + s + k)
        assert row.kv_bytes == (T + 3 * (w + s + k)) * 2 * d * 4


def test_baseline_costs_against_hand_formulas():
    D, d, T, H = 64, 16, 64, 4
    w = equal_compute_window(T, 4)
    k = T // 4
    pairs = lambda win: sum(min(t + 1, win) for t in range(T))
    assert abs(pairs(w) - k * (k + 1) / 2) <= min(abs(pairs(w + s) - k * (k + 1) / 2) for s in (-1, 1))
    dense = 8 * D * d * T + 2 * d * T * T  # full causal attention counted as T²/2 pairs
    local = convert_(tiny_model("llama"), plain_config(dense_head_ids=KEEP, sparse_heads="local", local_window=w))
    pruned = convert_(tiny_model("llama"), plain_config(dense_head_ids=KEEP, sparse_heads="pruned"))
    for model, f, kv in ((local, dense + 3 * (8 * D * d * T + 4 * d * pairs(w)), T + 3 * w), (pruned, dense, T)):
        for row in attention_costs(model, T):
            assert (row.flops, row.kv) == (f, kv)
            assert row.flops_original == H * dense


def test_streaming_costs_against_hand_formulas():
    D, d, T, w, s = 64, 16, 64, 8, 2
    pairs = sum(min(t + 1, w) for t in range(T))
    model = convert_(tiny_model("llama"), plain_config(dense_head_ids=KEEP, sparse_heads="streaming", local_window=w,
                                                     sink_tokens=s))
    dense = 8 * D * d * T + 2 * d * T * T
    for row in attention_costs(model, T):
        assert row.flops == dense + 3 * (8 * D * d * T + 4 * d * (pairs + s * T))
        assert row.kv == T + 3 * (w + s)
        # 2 KV heads of 2 query heads each: kept head 1 caches KV head 0 once; the streaming heads 0, 2, 3 read
        # KV heads unevenly (1 + 2), so each keeps its own copy (attention.dense_kv_layout)
        assert row.kv_bytes == (T + 3 * (w + s)) * 2 * d * 4


def test_windowed_costs_follow_the_layers_own_window():
    """A window beyond the layer's own (Gemma 3's sliding layers) is capped the same way in the forward and in
    the cost model."""
    reach = tiny_model("gemma3_text").config.sliding_window  # layer 0 slides, layer 1 attends everything
    run = lambda w: convert_(tiny_model("gemma3_text"), plain_config(dense_head_ids={"0": [1]}, layers=[0],
                                                                     sparse_heads="streaming", local_window=w,
                                                                     sink_tokens=0))
    big, capped = run(4 * reach), run(reach)
    assert attention_costs(big, 64)[0] == attention_costs(capped, 64)[0]
    ids, _ = ids_and_mask(T=40)
    with torch.no_grad():
        torch.testing.assert_close(big(ids).logits, capped(ids).logits, atol=1e-5, rtol=0)


def test_original_costs_of_a_sliding_layer_are_its_window():
    """An unconverted layer with its own window (Gemma 3's sliding layers) caches and attends its last ``reach``
    tokens only: the cost model counts that, and a stock cache after a prefill holds as much (HF keeps reach - 1
    rows between steps)."""
    from transformers import DynamicCache

    from mosa_retrofit.convert.compat import with_cache

    model = tiny_model("gemma3_text").eval()
    cfg = model.config
    reach, T, d, KV = cfg.sliding_window, 4 * cfg.sliding_window, cfg.head_dim, cfg.num_key_value_heads
    rows = attention_costs(model, T)
    kinds = cfg.layer_types
    for row, kind in zip(rows, kinds):
        span = reach if kind == "sliding_attention" else T
        assert row.kv_bytes_original == KV * span * 2 * d * 4
        pairs = sum(min(t + 1, span) for t in range(T)) if span < T else T * T / 2  # (full: T²/2, as above)
        assert row.flops_original == cfg.num_attention_heads * (8 * cfg.hidden_size * d * T + 4 * d * pairs)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, T)), use_cache=True, **with_cache(model, cache))
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    assert abs(held - sum(r.kv_bytes_original for r in rows)) <= kinds.count("sliding_attention") * KV * 2 * d * 4
