"""The held-out evaluation protocol that convert's check, eval, train, calibration and the study share."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .data import DataSpec, load_corpus


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

    def describe(self, max_length: int | None = None) -> str:
        """What ``blocks(tokenizer, max_length)`` measures, in words."""
        block = min(self.block_size, max_length or self.block_size)
        return (f"held-out perplexity: {self.tokens:,} tokens of the last {self.validation_documents} documents of "
                f"{self.data}, in blocks of {block}")

    def blocks(self, tokenizer, max_length: int | None = None) -> Tensor:
        """(N, block_size) validation token ids (blocks shortened to ``max_length``, a model's position limit)."""

        block = min(self.block_size, max_length or self.block_size)
        spec = DataSpec(source=self.data, block_size=block, validation_documents=self.validation_documents,
                        validation_tokens=max(self.tokens, block) + 1)
        corpus = load_corpus(spec, tokenizer, progress=False, validation_only=True)
        return corpus.blocks("validation", block).long()


PROTOCOL = EvalProtocol()
"""The default evaluation protocol."""
