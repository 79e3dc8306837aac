"""Perplexity and text splits used by the CLI, the tests and the benchmarks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def token_blocks(tokenizer, texts: list[str], block: int, max_tokens: int | None = None) -> Tensor:
    """Concatenate ``texts`` (separated by EOS) and cut into non-overlapping (N, block) token blocks."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // block
    if n == 0:
        raise ValueError(f"need at least {block} tokens of text, got {len(ids)}")
    return torch.tensor(ids[: n * block]).view(n, block)


def split_articles(articles: list[str], validation: int = 10) -> tuple[list[str], list[str]]:
    """Train / validation split by document: the last ``validation`` articles are held out."""
    return articles[:-validation], articles[-validation:]


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token loss) over (N, T) token blocks, each block scored independently."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
        ids = blocks[i: i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
