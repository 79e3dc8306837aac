"""convert/window_store.py: decoding through the ring + far rows equals the full forward; what it holds."""

import pytest
import torch
from tiny_models import FAMILIES, KEEP, decode_incrementally, plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.attention import mosa_layers


WINDOWED = [dict(sparse_heads="mosa_keys", routing="causal", local_window=3, sink_tokens=2, sparsity=4),
            dict(sparse_heads="streaming", local_window=4, sink_tokens=2)]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])
@pytest.mark.parametrize("kind", WINDOWED, ids=lambda k: k["sparse_heads"])
def test_decode_with_the_window_store_equals_full_forward(family, kind):
    """Prefill + token-by-token decoding (left padding, a batch) gives the full forward's logits, while the store
    keeps only sinks, routed tokens and the last window; generate() with a cache equals without."""

    g = torch.Generator().manual_seed(7)
    model = convert_(tiny_model(family), plain_config(dense_head_ids=KEEP, **kind),
                     calibration=torch.randint(1, 128, (4, 32), generator=g))
    x = torch.randint(1, 128, (2, 24), generator=g)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask, use_cache=False).logits
    inc, cache = decode_incrementally(model, x, mask)
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


def test_default_conversion_caches_sinks_window_and_routed_rows_only():
    """MoSAConfig() (dense_share off) on a GQA model (2 layers, 2 KV groups of 2 heads): a quarter of the heads
    dense = one KV group in the whole model, placed at the highest retrieval score; every other group is a key-selection unit.
    After a 64-token prefill the cache holds T rows for the dense group and, per unit, the union of the 4 sinks,
    the last w - 1 tokens and the tokens its router passes (x_t · w > τ, or the first), counted here."""
    from tiny_models import fake_retrieval, prefill_capturing_inputs

    from mosa_retrofit import MoSAConfig
    from mosa_retrofit.convert.cache import cache_bytes

    model = tiny_model("llama")
    scores = fake_retrieval(model)
    calib = torch.randint(1, 128, (8, 64), generator=torch.Generator().manual_seed(3))
    w, T, d = 8, 64, 16
    convert_(model, MoSAConfig(local_window=w, sparsity=8, dense_share=0.0),  # (the count alone: 4 groups only)
             calibration=calib, retrieval=scores, progress=False)
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
