"""Memory per GPU for adapting a converted Llama-3.2-1B / Llama-3.1-8B on 8 GPUs, DDP against FSDP.

    python benchmarks/fsdp_memory.py            # writes benchmarks/results/fsdp_memory.md

Builds each model on the meta device from its published shape (no download), converts it with the default
conversion's structure, and prints ``sharding.training_memory`` (see its docstring for what is counted)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mosa_retrofit import MoSAConfig
from mosa_retrofit.convert.surgery import apply_plan_, plan_layers
from mosa_retrofit.train.sharding import training_memory

MODELS = {  # the published shapes (config.json of the hub checkpoints)
    "Llama-3.2-1B": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                tie_word_embeddings=True, max_position_embeddings=131072),
    "Llama-3.1-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                tie_word_embeddings=False, max_position_embeddings=131072),
}


def main(out: str = "benchmarks/results/fsdp_memory.md") -> None:
    rows = ["| model | parameters | distributed (8 GPUs) | model states | gathered layers | logits | activations "
            "| total GiB per GPU |", "|---|---|---|---|---|---|---|---|"]
    for name, cfg in MODELS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        # the default conversion's structure (routers, fills, thresholds); no calibration on meta tensors
        config = MoSAConfig(head_choice="first", dense_scope="layer")
        apply_plan_(model, plan_layers(model, config))
        n = sum(p.numel() for p in model.parameters())
        for distributed in ("ddp", "fsdp"):
            m = training_memory(model, 8, distributed, micro_batch=1, block=4096)
            states = m["student weights, gradients, Adam"] + m["teacher weights"]
            rows.append(f"| {name} | {n / 1e9:.2f} B | {distributed} | {states:.1f} | "
                        f"{m.get('gathered layers', 0):.1f} | {m['logits']:.1f} | {m['activations']:.1f} | "
                        f"**{m['total']:.1f}** |")
    text = ("# Memory per GPU for adapting a converted model on 8 GPUs, DDP against FSDP (computed)\n\n"
            "Command: `python benchmarks/fsdp_memory.py` (`mosa_retrofit.train.sharding.training_memory` on models built "
            "on the meta device from their published shapes, with the default conversion's structure).\n\n"
            "Micro-batch 1 x 4,096 tokens, fp32 weights + AdamW, bf16 autocast, gradient checkpointing, KD to an fp32 "
            "teacher.\n\n" + "\n".join(rows) + "\n")
    print(text)
    Path(out).write_text(text)


if __name__ == "__main__":
    main()
