"""Key-selection MoSA heads (sparse_heads='mosa_keys'): against a plain masked-attention reference, identity
invariants, gradients to the router, costs."""

import math

import pytest
import torch
from test_surgery import IDENTITY, ids_and_mask
from tiny_models import FAMILIES, plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.attention import mosa_layers
from mosa_retrofit.convert.costs import attention_costs

KEEP = {"0": [1], "1": [2]}


def masked_reference(family: str, masks: dict, ids):
    """The *original* model with each layer's attention replaced by plain softmax attention under ``masks``
    {layer: (H, T, T) bool} (computed in the test from the converted model's routers)."""
    from transformers import AttentionInterface

    def attend(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = (q @ k.transpose(-1, -2)) * scaling  # (B, H, T, T)
        return (s.masked_fill(~masks[module.layer_idx], -math.inf).softmax(-1) @ v).transpose(1, 2), None

    AttentionInterface.register("test_masked_reference", attend)
    model = tiny_model(family)
    model.set_attn_implementation("test_masked_reference")
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("w, sinks, sparsity", [(3, 2, 4), (5, 0, 3), (1, 1, 6)])
def test_every_query_attends_sinks_window_and_routed_keys(family, w, sinks, sparsity):
    """Query i of sparse head h sees key j <= i iff i - j < w, j < sinks, or j is among the unit's top-k router
    scores (expert choice, the first token forced); kept heads see every key before them."""
    T = 20
    ids, _ = ids_and_mask(T=T)
    model = convert_(tiny_model(family), plain_config(dense_head_ids=KEEP, sparse_heads="mosa_keys", local_window=w,
                                                      sink_tokens=sinks, sparsity=sparsity,
                                                      router_score="straight_through", include_first=True))
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, i=i: inputs.__setitem__(i, kw.get("hidden_states", a[0] if a else None)),
                                         with_kwargs=True) for i, m in mosa_layers(model).items()]
    with torch.no_grad():
        out = model(ids).logits
    for h in hooks:
        h.remove()
    H = 4
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    causal = j <= i
    masks = {}
    for layer, m in mosa_layers(model).items():
        x = inputs[layer]  # (B, T, D)
        mask = causal.expand(ids.shape[0], H, T, T).clone()
        k = min(max(T // sparsity, 2), T)
        for e, head in enumerate(m.mosa_plan.mosa):
            score = x @ m.mosa_router[e]  # (B, T)
            score[:, 0] = math.inf
            chosen = torch.zeros_like(score, dtype=torch.bool).scatter(1, score.topk(k, dim=1).indices, True)
            mask[:, head] = causal & ((i - j < w) | (j < sinks) | chosen[:, None, :])
        masks[layer] = mask
    torch.testing.assert_close(out, masked_reference(family, masks, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])
def test_identity_every_token_selected(family):
    """Sparsity 1 with straight-through scores: every key is routed, so every head is its original."""
    ids, mask = ids_and_mask()
    sel = mask.bool()
    with torch.no_grad():
        ref = tiny_model(family)(ids, attention_mask=mask).logits[sel]
        model = convert_(tiny_model(family), plain_config(dense_heads=1, sparse_heads="mosa_keys", local_window=2,
                                                          sink_tokens=0, **IDENTITY))
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[sel], ref, atol=1e-4, rtol=0)


def test_routers_get_gradients_and_softcap_is_refused():
    model = convert_(tiny_model("llama").train(), plain_config(dense_head_ids=KEEP, sparse_heads="mosa_keys",
                                                               local_window=2, sparsity=4))
    ids, _ = ids_and_mask()
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert all(m.mosa_router.grad is not None and m.mosa_router.grad.abs().sum() > 0
               for m in mosa_layers(model).values())
    with pytest.raises(ValueError, match="does not support attention logit soft-capping"):
        convert_(tiny_model("gemma2"), plain_config(sparse_heads="mosa_keys"))


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


WINDOWED = [dict(sparse_heads="mosa_keys", routing="causal", local_window=3, sink_tokens=2, sparsity=4),
            dict(sparse_heads="streaming", local_window=4, sink_tokens=2)]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])
@pytest.mark.parametrize("kind", WINDOWED, ids=lambda k: k["sparse_heads"])
def test_decode_with_the_window_store_equals_full_forward(family, kind):
    """Prefill + token-by-token decoding (left padding, a batch) gives the full forward's logits, while the store
    keeps only sinks, routed tokens and the last window; generate() with a cache equals without."""
    from test_causal import _incremental

    g = torch.Generator().manual_seed(7)
    model = convert_(tiny_model(family), plain_config(dense_head_ids=KEEP, **kind),
                     calibration=torch.randint(1, 128, (4, 32), generator=g))
    x = torch.randint(1, 128, (2, 24), generator=g)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask, use_cache=False).logits
    inc, cache = _incremental(model, x, mask)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=1e-4, rtol=0)
    from mosa_retrofit.convert.cache import layer_stores

    stores = [s.window for s in layer_stores(cache).values() if s.window is not None]
    assert len(stores) == 2
    for store in stores:
        w = kind["local_window"]
        assert store.next_pos == 24 and store.ring_valid.sum(-1).tolist() == [w, w]  # the ring: positions 21-23
        held = store.count + w  # (E, B) rows kept per unit and row: far rows (sinks, routed) + the ring
        assert held.float().mean() < 24
        for pos, n in zip(store.far_pos.flatten(0, 1), store.count.flatten()):
            far = pos[:n]
            assert bool((far <= 23 - w).all()) and bool((far[1:] > far[:-1]).all())  # left the ring, in order
        if kind["sparse_heads"] == "streaming":  # far rows: the 2 sinks of each row (row 1 starts at 5)
            assert store.count.tolist() == [[2, 2]] * store.count.shape[0]
            assert store.far_pos[:, 0, :2].tolist() == [[0, 1]] * store.count.shape[0]
            assert store.far_pos[:, 1, :2].tolist() == [[5, 6]] * store.count.shape[0]
    opts = dict(attention_mask=mask[:, :9], max_new_tokens=8, pad_token_id=0, do_sample=False)
    with torch.no_grad():
        a = model.generate(x[:, :9], use_cache=True, **opts)
        b = model.generate(x[:, :9], use_cache=False, **opts)
        beam = model.generate(x[:, :9], use_cache=True, num_beams=3, **opts)
        beam_nc = model.generate(x[:, :9], use_cache=False, num_beams=3, **opts)
    assert torch.equal(a, b) and torch.equal(beam, beam_nc)


def test_expert_choice_and_sigmoid_keys_refuse_to_decode():
    from test_causal import _incremental

    x = torch.randint(1, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    for over, msg in ((dict(routing="expert_choice"), "expert-choice routing cannot decode"),
                      (dict(routing="causal", router_score="sigmoid"), "straight_through")):
        model = convert_(tiny_model("llama"), plain_config(dense_head_ids=KEEP, sparse_heads="mosa_keys", **over))
        with pytest.raises(ValueError, match=msg):
            _incremental(model, x)


def test_default_conversion_caches_sinks_window_and_routed_rows_only():
    """MoSAConfig() on a GQA model (2 layers, 2 KV groups of 2 heads): a quarter of the heads dense = one KV
    group in the whole model, placed at the highest retrieval score; every other group is a key-selection unit.
    After a 64-token prefill the cache holds T rows for the dense group and, per unit, the union of the 4 sinks,
    the last w - 1 tokens and the tokens its router passes (x_t · w > τ, or the first), counted here."""
    from mosa_retrofit import MoSAConfig
    from mosa_retrofit.convert.cache import cache_bytes
    from tiny_models import fake_retrieval, prefill_capturing_inputs

    model = tiny_model("llama")
    scores = fake_retrieval(model)
    calib = torch.randint(1, 128, (8, 64), generator=torch.Generator().manual_seed(3))
    w, T, d = 8, 64, 16
    convert_(model, MoSAConfig(local_window=w, sparsity=8), calibration=calib, retrieval=scores, progress=False)
    best = max(((float(s.view(2, 2).sum(1)[g]), i, g) for i, s in scores.items() for g in range(2)))
    layers = mosa_layers(model)
    for i, m in layers.items():
        assert m.mosa_plan.dense == ((2 * best[2], 2 * best[2] + 1) if i == best[1] else ())
    x = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(4))
    cache, inputs = prefill_capturing_inputs(model, x)
    rows = T  # the dense group: every token of one KV head
    t = torch.arange(T)
    for i, m in layers.items():
        for e in range(m.mosa_router.shape[0]):
            routed = (inputs[i][0] @ m.mosa_router[e].detach()) > m.mosa_threshold[e]
            rows += int(((t < 4) | (t > T - w) | routed | (t == 0)).sum())
    held = cache_bytes(cache)
    assert held.dense + held.mosa == rows * 2 * d * 4
    assert rows < 0.6 * 2 * 2 * T  # against the original's 2 layers x 2 KV heads x T rows


def test_every_attn_backend_gives_the_same_model():
    """set_attn_backend switches the windowed heads' kernel on a converted model; flash, math and flex (compiled
    on CPU) give the same logits, padding included; a bad name is refused before anything changes."""
    import mosa_retrofit

    ids, mask = ids_and_mask(T=40)
    model = convert_(tiny_model("qwen2"), plain_config(dense_head_ids=KEEP, sparse_heads="mosa_keys", local_window=6,
                                                      sink_tokens=2, sparsity=4, routing="causal"),
                     calibration=torch.randint(1, 128, (4, 40), generator=torch.Generator().manual_seed(0)))
    real = mask.bool()
    out = {}
    for backend in ("math", "flash", "flex"):
        mosa_retrofit.set_attn_backend(model, backend)
        assert {m.mosa_plan.config.attn_backend for m in mosa_layers(model).values()} == {backend}
        with torch.no_grad():
            out[backend] = model(ids, attention_mask=mask, use_cache=False).logits[real]
    torch.testing.assert_close(out["flash"], out["math"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["flex"], out["math"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        mosa_retrofit.set_attn_backend(model, "triton")
    assert {m.mosa_plan.config.attn_backend for m in mosa_layers(model).values()} == {"flex"}
