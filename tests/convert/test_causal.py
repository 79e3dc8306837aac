"""Causal routing and the sparse KV cache: causality, incremental == full forward, generate() exactness."""


import pytest
import torch
from tiny_models import (
    FAMILIES,
    causal_model,
    decode_incrementally,
    ids,
    plain_config,
    tiny_model,
)

import mosa_retrofit
from mosa_retrofit import convert_
from mosa_retrofit.convert.cache import layer_stores
from mosa_retrofit.convert.surgery import mosa_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_future_tokens_never_change_earlier_outputs(family):
    model = causal_model(family)
    a = ids()
    b = a.clone()
    b[:, 12:] = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :12], lb[:, :12], atol=1e-6, rtol=0)


def test_expert_choice_leaks_the_future():
    """The paper's routing: top-k over the whole sequence, so later tokens change which earlier tokens a head
    keeps, and with them earlier outputs (the leak the causal mode removes)."""
    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=4, dense_heads=1))
    a = ids(T=32)
    b = a.clone()
    b[:, 16:] = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert (la[:, :16] - lb[:, :16]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decode_equals_full_forward(family):
    model = causal_model(family)
    x = ids(T=24)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        full = model(x, attention_mask=mask, use_cache=False).logits
    inc, cache = decode_incrementally(model, x, mask)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=1e-4, rtol=0)
    stores = layer_stores(cache)
    assert len(stores) == 2 and all(cache.get_seq_length(i) == 24 for i in stores)
    counts = torch.stack([s.routed.count for s in stores.values()])  # (layers, E, B): tokens each unit keeps
    assert 0 < counts.float().mean() < 24  # sparse: not everything is cached


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without(family):
    model = causal_model(family)
    prompt = ids(T=9)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # batched, left padding
    opts = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0, do_sample=False)
    with torch.no_grad():
        greedy = model.generate(prompt, use_cache=True, **opts)
        greedy_nc = model.generate(prompt, use_cache=False, **opts)
        beam = model.generate(prompt, use_cache=True, num_beams=3, **opts)
        beam_nc = model.generate(prompt, use_cache=False, num_beams=3, **opts)
        torch.manual_seed(3)
        sample = model.generate(prompt, use_cache=True, **{**opts, "do_sample": True, "top_k": 20})
        torch.manual_seed(3)
        sample_nc = model.generate(prompt, use_cache=False, **{**opts, "do_sample": True, "top_k": 20})
    assert torch.equal(greedy, greedy_nc) and torch.equal(beam, beam_nc) and torch.equal(sample, sample_nc)
    assert greedy.shape == (2, 21)


def test_identity_at_sparsity_one_including_decode():
    model = tiny_model("llama")
    x = ids(T=20)
    with torch.no_grad():
        ref = model(x).logits
    convert_(model, plain_config(sparsity=1, dense_heads=1, routing="causal", include_first=False))
    assert all(torch.isinf(m.mosa_threshold).all() for m in mosa_layers(model).values())
    with torch.no_grad():
        full = model(x, use_cache=False).logits
    inc, _ = decode_incrementally(model, x)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(inc, ref, atol=1e-5, rtol=0)


def test_thresholds_calibrated_then_tracked_in_training():
    model = causal_model("llama", sparsity=4, threshold_momentum=0.5)
    x = ids(B=4, T=64, seed=3)
    rates = {}

    def rate():
        seen = []
        for m in mosa_layers(model).values():
            m.mosa_observer = lambda mod, h, W, mask, cos, sin: seen.append(
                ((h @ mod.mosa_router.t())[:, 1:] > mod.mosa_threshold).float().mean().item())
        with torch.no_grad():
            model(x, use_cache=False)
        for m in mosa_layers(model).values():
            m.__dict__.pop("mosa_observer")
        return sum(seen) / len(seen)

    rates["calibrated"] = rate()
    model.train()
    for _ in range(30):  # each forward moves the thresholds halfway to this batch's 75% quantile
        with torch.no_grad():
            model(x, use_cache=False)
    model.eval()
    rates["tracked"] = rate()
    assert abs(rates["tracked"] - 0.25) < 0.03, rates
    assert abs(rates["calibrated"] - 0.25) < 0.15, rates  # calibrated on other (random) text


def test_causal_model_saves_and_loads_with_thresholds(tmp_path):
    model = causal_model("qwen3")
    for m in mosa_layers(model).values():
        m.mosa_threshold.add_(0.123)  # trained thresholds must survive the round trip
    model.save_pretrained(tmp_path / "m")
    loaded = mosa_retrofit.load(str(tmp_path / "m"))
    assert loaded.config.mosa["routing"] == "causal"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    for a, b in zip(mosa_layers(model).values(), mosa_layers(loaded).values()):
        assert torch.equal(a.mosa_threshold, b.mosa_threshold)


def test_bad_routing_config():
    with pytest.raises(ValueError, match="routing.*causal"):
        plain_config(routing="sometimes")
    with pytest.raises(ValueError, match="threshold_momentum"):
        plain_config(threshold_momentum=2)


@pytest.mark.parametrize("kind", ["mosa", "mosa_keys"])
def test_threshold_tracking_under_activation_checkpointing(kind):
    """Training with causal routing moves the thresholds every forward; activation checkpointing recomputes the
    forward during backward, which must select with the thresholds the forward used. Checkpointed training
    gives the same thresholds (bit for bit), losses and gradients as plain training, step after step."""
    from mosa_retrofit.convert.compat import enable_activation_checkpointing

    over = {"sparse_heads": kind, "router_score": "straight_through"} if kind == "mosa_keys" else {}
    over.update(local_window=6, sink_tokens=2) if kind == "mosa_keys" else None
    plain, ckpt = causal_model("llama", **over).train(), causal_model("llama", **over).train()
    enable_activation_checkpointing(ckpt, {"use_reentrant": False})
    layers = [mosa_layers(m) for m in (plain, ckpt)]
    start = {i: m.mosa_threshold.clone() for i, m in layers[0].items()}
    for step in range(3):
        x = ids(B=2, T=40, seed=10 + step)
        grads = []
        for model in (plain, ckpt):
            model.zero_grad(set_to_none=True)
            logits = model(x, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
        for i in layers[0]:
            assert torch.equal(layers[1][i].mosa_threshold, layers[0][i].mosa_threshold)
    assert any(not torch.equal(start[i], m.mosa_threshold) for i, m in layers[0].items())  # they did move
