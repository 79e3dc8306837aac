"""Synthetic retrieval inside training blocks (DuoAttention's training data, on the recipe's own text).

A block of real text gets ``n`` key sentences at random depths ("The access code for the harbor is 58213.") and,
at its end, a question and answer for each of them in a shuffled order. Distilling on such blocks puts the
teacher's retrieval (a confident answer many tokens after its key) into the loss; plain text rarely asks a model
to fetch one exact token from thousands back. The wording, the names and the haystack differ from the passkey
evaluation (text/prompts.py: "The pass key of the apple is ...", in repeated filler), which never trains.

The answers' tokens are marked, so a stage can weigh them more (``answer_weight``): in a block of thousands of
tokens the few that answer are where retrieval shows.

Shapes: L block length, Q tokens of the questions and answers, N tokens of the key sentences.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

NAMES = ("harbor", "lantern", "violin", "meadow", "saddle", "compass", "orchard", "falcon", "marble", "ribbon",
         "anchor", "thistle", "copper", "glacier", "velvet", "beacon")
"""Names the keys belong to; none is one of the passkey evaluation's (text/prompts.NAMES)."""


def needle_texts(rng: random.Random, n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """``n`` key sentences and their ``n`` questions (shuffled), each as (the question up to its answer, the
    answer: " " + the code), drawn from ``rng``."""
    names = rng.sample(NAMES, n)
    codes = [str(rng.randrange(1_000, 1_000_000)) for _ in names]  # 4 to 6 digits
    keys = [f" The access code for the {a} is {c}." for a, c in zip(names, codes)]
    order = rng.sample(range(n), n)
    questions = [(f" Question: what is the access code for the {names[i]}? Answer: the access code for the "
                  f"{names[i]} is", f" {codes[i]}") for i in order]
    return keys, questions


def insert_needles(block: Tensor, tokenizer, n: int, rng: random.Random) -> tuple[Tensor, Tensor]:
    """``block`` (L,) with ``n`` key sentences inserted at random token positions of its first part and their
    questions and answers filling its end, and (L,) bool: the answers' tokens (what a loss may weigh more). The
    result is L tokens long (the text after the cut is dropped)."""
    if n == 0:
        return block, torch.zeros_like(block, dtype=torch.bool)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    keys, questions = needle_texts(rng, n)
    keys_ids = [enc(k) for k in keys]
    qa, answer = [], []  # (Q,) the questions and answers, (Q,) which of their tokens answer
    for question, code in questions:
        for piece, is_answer in ((question, False), (code, True), (".", False)):
            ids = enc(piece)
            qa += ids
            answer += [is_answer] * len(ids)
    L = block.numel()
    body = L - len(qa) - sum(map(len, keys_ids))  # haystack tokens kept
    if body < L // 2:
        raise ValueError(f"data.needles = {n} do not fit a block of {L} tokens (they take {L - body}; at most half "
                         "the block may be keys and questions): use fewer needles or a longer data.block_size")
    text = block[:body].tolist()
    cuts = sorted(rng.randrange(0, body + 1) for _ in keys_ids)
    out, cursor = [], 0
    for cut, ids in zip(cuts, keys_ids):
        out += text[cursor:cut] + ids
        cursor = cut
    out += text[cursor:] + qa
    answers = torch.zeros(L, dtype=torch.bool)
    answers[L - len(qa):] = torch.tensor(answer)
    return torch.tensor(out, dtype=block.dtype), answers


def needle_batch(ids: Tensor, positions: Tensor, tokenizer, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """(B, L) blocks with needles, each drawn from (seed, its sample position in the run): resumable, and the
    same for the converted run and its control, which read the same positions; and (B, L) bool, the answers'
    tokens (None without needles)."""
    if n == 0:
        return ids, None
    rows = [insert_needles(row, tokenizer, n, random.Random(f"needles-{seed}-{int(p)}"))
            for row, p in zip(ids, positions)]
    return torch.stack([r for r, _ in rows]), torch.stack([a for _, a in rows])
