"""plain_config(fill='mean'): what MoSA and pruned heads write at the tokens they skip, against plain references.

References are built from the original model with hooks on its output projection (no package math): a head's
"mean output" is the average of its slice of the o_proj input over calibration tokens; mean-ablating a head
replaces that slice by the mean at every token.
"""

import copy

import pytest
import torch
from naive import naive_layer
from tiny_models import FAMILIES, IDENTITY, ids_and_mask, plain_config, tiny_model

import mosa_retrofit
from mosa_retrofit import convert_
from mosa_retrofit.convert.calibration import collect_stats
from mosa_retrofit.convert.compat import with_cache
from mosa_retrofit.convert.families import family_of
from mosa_retrofit.convert.surgery import attention_layers, mosa_layers
from mosa_retrofit.train.trainable import select_trainable


def calib(n=3, T=20, seed=3):
    return torch.randint(1, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def head_means_by_hook(model, ids):
    """{layer: (H, d)} mean of each head's slice of the o_proj input (llama-style models), one row at a time."""
    H = model.config.num_attention_heads
    sums, count = {}, 0
    hooks = []
    for i, (_, m) in attention_layers(model).items():
        def hook(mod, args, i=i):
            x = args[0].detach().double()
            sums[i] = sums.get(i, 0) + x.reshape(-1, H, x.shape[-1] // H).sum(0)
        hooks.append(m.o_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row[None])
            count += row.numel()
    for h in hooks:
        h.remove()
    return {i: s / count for i, s in sums.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_calibrated_mean_equals_the_heads_mean_output(family):
    model = tiny_model(family, "eager")
    ids = calib()
    want = head_means_by_hook(model, ids)
    layers = {i: m for i, (_, m) in attention_layers(model).items()}
    stats = collect_stats(model, ids, layers, progress=False)
    for i, s in stats.items():
        torch.testing.assert_close(s.out_sum / s.tokens, want[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_with_mean_fill(family):
    """Sparsity 1, straight-through: every token is selected, so the fill cancels and the logits are the original's."""
    model = tiny_model(family)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        convert_(model, plain_config(dense_heads=1, fill="mean", **IDENTITY), calibration=calib())
        m = next(iter(mosa_layers(model).values()))
        assert m.mosa_fill.abs().sum() > 0  # a real fill, which must cancel
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_with_mean_fill_is_mean_ablation(family):
    """Pruned heads with fill='mean' = the original model whose pruned heads' o_proj input is their mean."""
    keep = {"0": [1], "1": [2]}
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    ids = calib()
    means = head_means_by_hook(ref, ids)
    H = model.config.num_attention_heads
    for i, (_, m) in attention_layers(ref).items():
        def hook(mod, args, i=i):
            x = args[0].clone()
            x = x.view(*x.shape[:-1], H, -1)
            for h in range(H):
                if h not in keep[str(i)]:
                    x[..., h, :] = means[i][h].to(x.dtype)
            return (x.view(args[0].shape),)
        m.o_proj.register_forward_pre_hook(hook)
    convert_(model, plain_config(dense_head_ids=keep, sparse_heads="pruned", fill="mean", sparsity=4), calibration=ids)
    x, mask = ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=mask).logits[mask.bool()],
                                   ref(x, attention_mask=mask).logits[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity, dense", [("head", [1]), ("kv_group", [2, 3])])
def test_mosa_layer_with_fill_matches_naive_reference(granularity, dense):
    """One converted layer: skipped tokens get fill·W_o, selected ones fill·W_o + gate·(attention − fill)·W_o."""
    model = tiny_model("llama")
    _, attn = attention_layers(model)[0]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(attn, name).bias is not None:
                getattr(attn, name).bias.zero_()
    convert_(model, plain_config(sparsity=3, dense_head_ids={"0": dense, "1": dense}, router_score="sigmoid",
                               router_granularity=granularity, include_first=True, fill="mean"), calibration=calib())
    x = torch.randn(2, 17, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(17)[None])
    W = family_of(model).head_weights(attn)
    mosa_heads = [h for h in range(4) if h not in dense]
    group = 2 if granularity == "kv_group" else 1
    d = W.head_dim
    fills = attn.mosa_fill.detach().reshape(-1, d)  # (heads, d), units in head order
    assert fills.abs().sum() > 0
    y, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
    ref = naive_layer(x, W, dense, mosa_heads, attn.mosa_router.detach(), 3, attn.scaling, True, cos, sin, group,
                      fill=dict(zip(mosa_heads, fills)))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_causal_decode_with_fill_equals_full_forward(family):
    model = tiny_model(family)
    convert_(model, plain_config(sparsity=4, dense_heads=1, routing="causal", fill="mean"), calibration=calib(4, 32))
    x = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    from transformers import DynamicCache

    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        out = [model(x[:, :8], **with_cache(model, cache), use_cache=True).logits]
        for t in range(8, 20):
            out.append(model(x[:, t:t + 1], **with_cache(model, cache), use_cache=True).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_fill_saves_loads_and_trains_with_the_routers(tmp_path):
    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=4, dense_heads=1, fill="mean"), calibration=calib())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mosa_fill"):
                p.add_(torch.randn_like(p))  # trained-looking fills must survive the round trip
    x = torch.randint(0, 128, (2, 20))
    ref = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = mosa_retrofit.load(str(tmp_path))
    torch.testing.assert_close(loaded(x).logits, ref, atol=0, rtol=0)
    plain, _ = select_trainable(loaded, "routers")
    fills = [m.mosa_fill for m in mosa_layers(loaded).values()]
    assert all(any(f is p for p in plain) for f in fills) and len(plain) == 2 * len(fills)
    loaded.train()
    loaded(x, labels=x, use_cache=False).loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fills)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fill="mean"), "needs calibration text .* no tokenizer"),
    (dict(fill="average"), r"fill must be one of \('zero', 'mean'\), got 'average'"),
])
def test_bad_fill_raises_before_the_model_is_touched(kwargs, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        convert_(model, plain_config(**kwargs))
    assert not mosa_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
