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
