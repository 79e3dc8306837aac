"""Perplexity, the evaluation protocol and the text splits shared by the CLI, the tests and the benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import as_blocks, load_corpus, token_stream
from .recipe import DataSpec


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


@dataclass(frozen=True)
class EvalProtocol:
    """How held-out perplexity is measured, the same in ``convert``'s check, ``eval``, ``train`` and the study:
    the last ``validation_documents`` documents of ``data`` (never used for calibration or training), joined
    with EOS, cut into blocks of ``block_size`` tokens, the first ``tokens`` of them, each block scored on its
    own."""

    data: str = "wikipedia-offline"
    validation_documents: int = 10
    block_size: int = 1024
    tokens: int = 4096

    def describe(self) -> str:
        return (f"held-out perplexity: {self.tokens:,} tokens of the last {self.validation_documents} documents of "
                f"{self.data}, in blocks of {self.block_size}")

    def blocks(self, tokenizer, max_length: int | None = None) -> Tensor:
        """(N, block_size) validation token ids (blocks shortened to ``max_length``, a model's position limit)."""

        block = min(self.block_size, max_length or self.block_size)
        spec = DataSpec(source=self.data, block_size=block, validation_documents=self.validation_documents,
                        validation_tokens=max(self.tokens, block) + 1)
        corpus = load_corpus(spec, tokenizer, progress=False, validation_only=True)
        return corpus.blocks("validation", block).long()


PROTOCOL = EvalProtocol()
"""The default evaluation protocol."""
