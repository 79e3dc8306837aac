"""A tiny trainable world for recipe tests: a byte-level BPE tokenizer, a tiny model folder and a text corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_config

from mosa_retrofit.train.recipe import Recipe
from mosa_retrofit.train.trainer import train

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the river", "a small bird", "the king"]
_VERBS = ["sees", "follows", "likes", "paints", "finds", "remembers", "crosses"]
_OBJECTS = ["the hill", "a red house", "the bridge", "the garden", "an apple", "the moon", "a letter"]


def corpus_text(documents: int = 60, seed: int = 0) -> str:
    """Documents of simple, learnable sentences separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        sents = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(12)]
        docs.append(" ".join(sents).capitalize())
    return "\n\n".join(docs) + "\n"


def make_tokenizer(text: str, vocab: int = 160):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=sorted(set(text)))
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_world(root: Path, family: str = "llama", seed: int = 0, positions: int | None = None,
               heads: int | None = None) -> tuple[Path, Path]:
    """(model folder with tokenizer, corpus .txt) under ``root``; ``positions``: max_position_embeddings (1024
    leaves room for the retrieval prompts of the default conversion); ``heads``: query heads (Llama-like
    families; the same hidden size, smaller heads)."""
    import transformers as tf

    text = corpus_text()
    data = root / "corpus.txt"
    data.write_text(text)
    tokenizer = make_tokenizer(text)
    cfg = tiny_config(family)
    cfg.vocab_size = len(tokenizer)
    cfg.eos_token_id = tokenizer.eos_token_id
    if positions is not None:
        cfg.max_position_embeddings = positions
    if heads is not None:
        cfg.num_attention_heads, cfg.head_dim = heads, cfg.hidden_size // heads
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model_dir = root / f"tiny-{family}"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data


def recipe_dict(model_dir: Path, data: Path, out: Path, **over) -> dict:
    d = {
        "output_dir": str(out),
        "seed": 0,
        "model": {"name_or_path": str(model_dir)},
        "conversion": {"mosa": {"sparsity": 4, "dense_heads": 1, "head_choice": "first", "router_init": "random",
                                "fill": "zero", "routing": "expert_choice", "router_granularity": "head",
                                "sparse_heads": "mosa", "dense_scope": "layer"}},
        "data": {"source": str(data), "block_size": 32, "validation_documents": 6, "validation_tokens": 256},
        "stages": [
            {"name": "router_warmup", "kind": "router_warmup", "steps": 4, "lr": 0.01},
            {"name": "adaptation", "kind": "adaptation", "steps": 6, "trainable": "all", "kd_weight": 0.5},
        ],
        "optimizer": {"lr": 3e-3},
        "training": {"micro_batch_size": 4},
        "checkpointing": {"every": 3, "keep_last": 2},
        "logging": {"every": 1, "tensorboard": False, "plot": False},
        "evaluation": {"batch_size": 8},
    }
    for k, v in over.items():
        d[k] = v
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def run(world, out, overrides=(), resume=False, interrupt=None, **sections):
    model_dir, data = world
    recipe = Recipe.from_dict(recipe_dict(model_dir, data, out, **sections), list(overrides))
    return train(recipe, resume=resume, progress=False, interrupt=interrupt)


def records(out, split="train"):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))
