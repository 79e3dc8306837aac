"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

import math

import torch
import transformers as tf
from transformers import DynamicCache

from mosa_retrofit import MoSAConfig, convert_
from mosa_retrofit.convert.compat import with_cache

VOCAB = 128

# family -> (config class, kwargs): 4 query heads (2 KV heads where the family has GQA), 2 layers
FAMILY_CONFIGS = {
    "llama": (tf.LlamaConfig, dict(num_key_value_heads=2, attention_bias=True)),
    "mistral": (tf.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": (tf.Qwen2Config, dict(num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
    "gemma": (tf.GemmaConfig, dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": (tf.Gemma2Config, dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20,
                                     attn_logit_softcapping=5.0, final_logit_softcapping=None,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "gemma3_text": (tf.Gemma3TextConfig, dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                              sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "phi3": (tf.Phi3Config, dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                       "partial_rotary_factor": 0.5},
                                 pad_token_id=0)),
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_head=4, n_layer=2, n_positions=128, vocab_size=VOCAB)),
    "gpt_neox": (tf.GPTNeoXConfig, dict(rotary_pct=0.25, max_position_embeddings=128)),
    "opt": (tf.OPTConfig, dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128, enable_bias=True)),
}
FAMILIES = sorted(FAMILY_CONFIGS)
GQA_FAMILIES = [f for f in FAMILIES if FAMILY_CONFIGS[f][1].get("num_key_value_heads", 4) < 4]


def tiny_config(family: str, attn_implementation: str = "sdpa"):
    cls, extra = FAMILY_CONFIGS[family]
    kwargs = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                  vocab_size=VOCAB, max_position_embeddings=128)
    if family == "gpt2":
        kwargs = {}
    kwargs.update(extra)
    cfg = cls(**kwargs)
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_model(family: str, attn_implementation: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    attn_implementation = attn_implementation or ("eager" if family == "gemma2" else "sdpa")  # gemma2: no sdpa
    cfg = tiny_config(family, attn_implementation)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    with torch.no_grad():  # larger weights than the default init, so heads differ visibly
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and "bias" in name:
                p.normal_(0, 0.05)
    return model.eval()


# The plain, uncalibrated conversion the mechanics tests run on (random routers, first heads dense, zero fill,
# expert-choice routing, one router per head): it needs no calibration text, so every test states exactly the
# behaviour it checks. The default MoSAConfig() (calibrated) has tests of its own.
# keep_sliding=0: the tiny models' 8-token sliding windows would stay as they are under the default rule; tests
# convert them, so that every kind runs within a layer's own window
PLAIN = dict(head_choice="first", router_init="random", fill="zero", routing="expert_choice",
             router_granularity="head", sparse_heads="mosa", sparsity=8, dense_scope="layer", keep_sliding=0)


def plain_config(**kwargs) -> MoSAConfig:
    return MoSAConfig(**{**PLAIN, **kwargs})


def fake_retrieval(model) -> dict:
    """Retrieval scores ``{layer: (H,)}`` for models without a tokenizer (convert_(..., retrieval=...)): distinct
    per head and layer, so the default conversion's dense-head placement is deterministic."""
    from mosa_retrofit.convert.families import attention_layers, family_of

    fam = family_of(model)
    g = torch.Generator().manual_seed(5)
    return {i: torch.rand(fam.dims(m)[0], generator=g) for i, (_, m) in attention_layers(model, fam).items()}


def default_config(family: str, **over) -> MoSAConfig:
    """MoSAConfig() with ``over`` (sliding-window layers converted too: keep_sliding=0, as in PLAIN); Gemma2
    (soft-capped logits) keeps the paper's head form."""
    return MoSAConfig(**({"sparse_heads": "mosa"} if family == "gemma2" else {}), **{"keep_sliding": 0, **over})


def prefill_capturing_inputs(model, x):
    """One prefill of ``x`` into a fresh DynamicCache; returns (cache, {layer: the converted layer's input})."""
    from transformers import DynamicCache

    from mosa_retrofit.convert.attention import mosa_layers
    from mosa_retrofit.convert.compat import with_cache

    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, i=i: inputs.__setitem__(i, kw["hidden_states"]),
                                         with_kwargs=True) for i, m in mosa_layers(model).items()]
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(x, **with_cache(model, cache), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return cache, inputs


IDENTITY = dict(sparsity=1, router_score="straight_through", include_first=False)


def ids_and_mask(T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    return ids, mask


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


CAUSAL = dict(sparsity=4, dense_heads=1, routing="causal")


def causal_model(family, seed=0, **over):
    model = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    convert_(model, plain_config(**{**CAUSAL, **over}), calibration=torch.randint(1, 128, (4, 32), generator=g))
    return model


def ids(B=2, T=24, seed=0):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def decode_incrementally(model, x, mask=None, prefill=10):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        m = None if mask is None else mask[:, :prefill]
        out = [model(x[:, :prefill], attention_mask=m, **with_cache(model, cache), use_cache=True).logits]
        for t in range(prefill, x.shape[1]):
            m = None if mask is None else mask[:, : t + 1]
            out.append(model(x[:, t: t + 1], attention_mask=m, **with_cache(model, cache), use_cache=True).logits)
    return torch.cat(out, 1), cache
