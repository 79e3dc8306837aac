"""Perplexity and the text splits shared by the CLI, the tests and the benchmarks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..text.data import as_blocks, token_stream


def token_blocks(tokenizer, texts: list[str], block: int, max_tokens: int | None = None) -> Tensor:
    """Concatenate ``texts`` (separated by EOS) and cut into non-overlapping (N, block) token blocks."""

    return as_blocks(token_stream(tokenizer, texts, max_tokens), block).long()


def split_articles(articles: list[str], validation: int = 10) -> tuple[list[str], list[str]]:
    """Train / validation split by document: the last ``validation`` articles are held out."""
    return articles[:-validation], articles[-validation:]


@torch.no_grad()
def nll(model: nn.Module, blocks: Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, int]:
    """(sum of next-token losses, number of predicted tokens) over (N, T) blocks, each scored independently."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = blocks[i: i + batch_size].to(device).long()
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total, count


def perplexity(model: nn.Module, blocks: Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token loss) over (N, T) token blocks, each block scored independently."""
    total, count = nll(model, blocks, batch_size, progress)
    return math.exp(total / count)
