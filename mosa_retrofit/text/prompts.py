"""Passkey prompts (Landmark Attention's test): filler text, one sentence that states a 5-digit key at a chosen
depth, a question at the end; ``variant='multi'`` hides several keys under different names and asks for one.
Used to find retrieval heads (convert) and to score long context (eval)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NAMES = ("apple", "river", "candle", "mirror", "garden", "pencil", "window", "forest")


@dataclass(frozen=True)
class Prompt:
    ids: Tensor  # (1, L): filler with the needle(s), the question, then the answer
    answer_start: int  # index of the answer's first token in ids
    needle_at: int  # index of the asked needle's first token
    key: str
    filler_tokens: int  # tokens of filler around the needle(s): depth d puts the needle near d · filler_tokens
    needle_tokens: int = 0  # tokens of the asked needle's sentence


VARIANTS = ("single", "multi")
"""Passkey prompts: one key in filler, or the asked key among distractor keys."""


def passkey_prompt(tokenizer, length: int, depth: float, rng: random.Random, variant: str = "single",
                   filler: str = FILLER, keys: int = 4) -> Prompt:
    """A prompt of exactly ``length`` tokens (answer included) whose (asked) needle starts at the filler
    sentence boundary nearest to ``depth`` (0: the start, 1: just before the question)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'single' or 'multi', got {variant!r}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    key = str(rng.randrange(10_000, 100_000))
    if variant == "single":
        needles = [enc(f"The pass key is {key}. Remember it. {key} is the pass key. ")]
        asked, question = 0, enc("What is the pass key? The pass key is")
    else:
        names = rng.sample(NAMES, keys)
        values = [key] + [str(rng.randrange(10_000, 100_000)) for _ in names[1:]]
        needles = [enc(f"The pass key of the {n} is {v}. ") for n, v in zip(names, values)]
        asked, question = 0, enc(f"What is the pass key of the {names[0]}? The pass key of the {names[0]} is")
    answer = enc(f" {key}")
    sentences = [enc(s + ". ") for s in filler.strip().rstrip(".").split(". ")]
    budget = length - sum(map(len, needles)) - len(question) - len(answer)
    if budget < 1:
        raise ValueError(f"length {length} is too short for the needle and the question ({length - budget} tokens)")
    text, starts = [], []  # the filler, whole sentences where they fit
    while len(text) < budget:
        starts.append(len(text))
        text += sentences[len(starts) % len(sentences)]
    text = text[:budget]
    starts = [s for s in starts if s <= budget] + [budget]
    spots = [rng.choice(starts) for _ in needles[1:]]  # the other keys anywhere
    at = min(starts, key=lambda s: abs(s - depth * budget))
    placed = sorted([(at, 0)] + [(s, i) for i, s in enumerate(spots, start=1)])
    ids, cursor, needle_at = [], 0, 0
    for pos, i in placed:
        ids += text[cursor:pos]
        cursor = pos
        if i == asked:
            needle_at = len(ids)
        ids += needles[i]
    ids += text[cursor:] + question
    answer_start = len(ids)
    ids += answer
    return Prompt(torch.tensor([ids]), answer_start, needle_at, key, budget, len(needles[asked]))


