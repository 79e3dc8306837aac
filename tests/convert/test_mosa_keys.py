"""Key-selection MoSA heads (sparse_heads='mosa_keys'): against a plain masked-attention reference, identity
invariants, gradients to the router, costs."""

import math

import pytest
import torch
from tiny_models import (
    FAMILIES,
    IDENTITY,
    KEEP,
    decode_incrementally,
    ids_and_mask,
    masked_reference,
    plain_config,
    tiny_model,
)

from mosa_retrofit import convert_
from mosa_retrofit.convert.attention import mosa_layers


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


def test_expert_choice_and_sigmoid_keys_refuse_to_decode():

    x = torch.randint(1, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    for over, msg in ((dict(routing="expert_choice"), "expert-choice routing cannot decode"),
                      (dict(routing="causal", router_score="sigmoid"), "straight_through")):
        model = convert_(tiny_model("llama"), plain_config(dense_head_ids=KEEP, sparse_heads="mosa_keys", **over))
        with pytest.raises(ValueError, match=msg):
            decode_incrementally(model, x)


@pytest.mark.parametrize("other", ["flash", pytest.param("flex", marks=pytest.mark.slow)])  # (flex compiles: ~20 s)
def test_every_attn_backend_gives_the_same_model(other):
    """set_attn_backend switches the windowed heads' kernel on a converted model; flash and flex (compiled on
    CPU) give the math backend's logits, padding included; a bad name is refused before anything changes."""
    import mosa_retrofit

    ids, mask = ids_and_mask(T=40)
    model = convert_(tiny_model("qwen2"), plain_config(dense_head_ids=KEEP, sparse_heads="mosa_keys", local_window=6,
                                                      sink_tokens=2, sparsity=4, routing="causal"),
                     calibration=torch.randint(1, 128, (4, 40), generator=torch.Generator().manual_seed(0)))
    real = mask.bool()
    out = {}
    for backend in ("math", other):
        mosa_retrofit.set_attn_backend(model, backend)
        assert {m.mosa_plan.config.attn_backend for m in mosa_layers(model).values()} == {backend}
        with torch.no_grad():
            out[backend] = model(ids, attention_mask=mask, use_cache=False).logits[real]
    torch.testing.assert_close(out[other], out["math"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        mosa_retrofit.set_attn_backend(model, "triton")
    assert {m.mosa_plan.config.attn_backend for m in mosa_layers(model).values()} == {other}
    with pytest.raises(ValueError, match="has no converted layer"):  # an unconverted model: said, not ignored
        mosa_retrofit.set_attn_backend(tiny_model("qwen2"), "flash")
