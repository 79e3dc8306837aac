"""train/sharding.py: the memory estimate counts what it says."""

import pytest


def test_training_memory_counts_what_it_says():
    from tiny_models import plain_config, tiny_model

    from mosa_retrofit import convert_
    from mosa_retrofit.train.sharding import training_memory

    model = convert_(tiny_model("llama"), plain_config(sparsity=2, dense_heads=1))  # 2 layers, hidden 64
    P = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    rest = P - sum(p.numel() for b in model.model.layers for p in b.parameters())
    h, V, inter, L, tokens, gib = 64, model.config.vocab_size, model.config.intermediate_size, 2, 2 * 32, 1024 ** 3
    ddp, fsdp = (training_memory(model, 4, d, micro_batch=2, block=32) for d in ("ddp", "fsdp"))
    assert ddp["student weights, gradients, Adam"] * gib == 16 * P and ddp["teacher weights"] * gib == 4 * P
    assert fsdp["student weights, gradients, Adam"] * gib == 16 * P / 4 and fsdp["teacher weights"] * gib == P
    assert fsdp["gathered layers"] * gib == 2 * 4 * layer * 2 + 4 * rest and "gathered layers" not in ddp
    assert fsdp["logits"] * gib == 4 * tokens * V * 3
    assert fsdp["activations"] * gib == 2 * tokens * (h * L + 34 * h + 3 * inter)
    assert fsdp["total"] == pytest.approx(sum(v for k, v in fsdp.items() if k != "total"))


# Llama-3.1-8B's published config.json (meta-llama/Llama-3.1-8B), the fields that shape the model
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def test_the_8b_recipe_plans_converts_shards_and_fits_from_the_config_alone():
    """recipes/llama-3.1-8b-fsdp.yaml on Llama-3.1-8B built on the meta device (no weights, no download): its
    conversion plan (a quarter of the 256 KV groups dense, placed by retrieval scores standing in for measured
    ones), the structure applied, the decoder layers FSDP shards, the MoSA-slice masks, and the memory estimate
    the README shows, under an 80 GB GPU; a change that breaks any of it fails here."""
    import copy
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mosa_retrofit.convert.costs import attention_costs, ratios
    from mosa_retrofit.convert.surgery import Evidence, apply_plan_, plan_layers
    from mosa_retrofit.train.recipe import Recipe
    from mosa_retrofit.train.sharding import decoder_layers, training_memory
    from mosa_retrofit.train.trainable import head_masks

    root = Path(__file__).resolve().parents[2]
    recipe = Recipe.from_yaml(root / "recipes" / "llama-3.1-8b-fsdp.yaml")
    config = recipe.conversion.mosa
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_31_8B))
    g = torch.Generator().manual_seed(0)
    retrieval = {i: torch.rand(32, generator=g) for i in range(32)}
    plans = plan_layers(model, config, Evidence(retrieval=retrieval))
    assert len(plans) == 32
    groups = [set(h // 4 for h in p.dense) for p in plans.values()]
    assert all(len(p.dense) == 4 * len(gs) for p, gs in zip(plans.values(), groups))  # whole KV groups
    assert sum(len(gs) for gs in groups) == 64  # a quarter of 32 x 8
    apply_plan_(model, plans)
    assert all(p.is_meta for p in model.parameters())
    r = ratios(attention_costs(model, 8192))
    assert 0.2 < r.kv_bytes < 0.3 and r.flops < 0.85, r  # projections weigh more at d=128, D=4096 than on SmolLM2
    blocks = decoder_layers(model)
    assert len(blocks) == 32 and all(b is model.model.layers[i] for i, b in enumerate(blocks))
    attention = copy.deepcopy(model.model.layers[0].self_attn).to_empty(device="cpu")  # what the trainer reads
    masks = head_masks(attention)  # before sharding: which rows of q/k/v/o the MoSA heads own
    shapes = {n: p.shape for n, p in attention.named_parameters()}
    assert masks and all(m.shape == shapes[n] for n, m in masks.items())
    dense = len(plans[0].dense)
    assert masks["q_proj.weight"].sum() == (32 - dense) * 128 * 4096
    t = recipe.training
    memory = training_memory(model, 8, t.distributed, t.micro_batch_size, recipe.data.block_size)
    assert t.distributed == "fsdp" and memory["total"] < 80 * 1e9 / 1024 ** 3
    readme = (root / "README.md").read_text()
    assert f"| Llama-3.1-8B | {training_memory(model, 8, 'ddp', 1, 4096)['total']:.1f} GiB | " \
           f"{memory['total']:.1f} GiB |" in readme
