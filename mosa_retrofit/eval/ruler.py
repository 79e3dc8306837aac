"""The RULER-style suite (``mosa_retrofit.text.ruler``) run on models: the same prompts for every model, each
answered by greedy generation through the model's own KV cache (the path a user runs; a model that cannot decode
with a cache generates without one), scored by RULER's ``string_match_all``.

Tables read the *worst* task first: the Sparse Frontier study found that moderate sparsity breaks at least one
task for every training-free method it tried, which an average hides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..convert.attention import decode_refusal
from ..text.ruler import TASKS, Filler, RulerPrompt, ruler_prompt, score

Answerer = Callable[[RulerPrompt], str]
"""Gives the generated text for a prompt (a model's greedy generation, or a stand-in in tests)."""


def ruler_prompts(tokenizer, texts: list[str], tasks: list[str], lengths: list[int], trials: int,
                  seed: int = 0) -> dict[tuple[str, int], list[RulerPrompt]]:
    """``trials`` prompts per (task, length), the asked needle at depths spread evenly over the filler
    ((i + 0.5) / trials); the same seed gives the same prompts, so every model answers the same questions."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; known: {', '.join(TASKS)}")
    filler = Filler(tokenizer, texts)
    prompts = {}
    for task in tasks:
        for L in lengths:
            rng = random.Random(f"{seed}-{task}-{L}")
            prompts[task, L] = [ruler_prompt(task, filler, L, (i + 0.5) / trials, rng) for i in range(trials)]
    return prompts


def greedy_answerer(model: nn.Module, tokenizer, prefill_chunk: int | None = None) -> Answerer:
    """Greedy generation of each prompt's ``max_new_tokens`` through the model's KV cache (without one where the
    model's heads cannot decode with it), decoded to text. ``prefill_chunk`` prefills the prompt that many tokens
    at a time through the cache (``generate``'s ``prefill_chunk_size``): what a prompt near the model's positions
    needs where one forward does not fit in memory."""
    use_cache = decode_refusal(model) is None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunked = {"prefill_chunk_size": prefill_chunk} if prefill_chunk and use_cache else {}

    @torch.no_grad()
    def answer(prompt: RulerPrompt) -> str:
        ids = prompt.ids.to(next(model.parameters()).device)  # (1, P)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=prompt.max_new_tokens,
                             do_sample=False, use_cache=use_cache, pad_token_id=pad, **chunked)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return answer


def run_ruler(answerers: dict[str, Answerer], prompts: dict[tuple[str, int], list[RulerPrompt]],
              progress: bool = True) -> dict[str, dict[tuple[str, int], float]]:
    """Mean score per (task, length) for every model: {model: {(task, length): score in [0, 1]}}."""
    scores = {}
    total = len(answerers) * sum(map(len, prompts.values()))
    with tqdm(total=total, desc="ruler", unit="prompt", disable=not progress) as bar:
        for name, answer in answerers.items():
            scores[name] = {}
            for cell, cell_prompts in prompts.items():
                got = []
                for p in cell_prompts:
                    got.append(score(answer(p), p.answers))
                    bar.update(1)
                scores[name][cell] = sum(got) / len(got)
    return scores


SOLVED = 0.5
"""A task counts toward the worst ratio where the original's mean score over the lengths is at least this: the
ratio of a task the original almost never solves is noise (0.03 against 0.00 reads 0.00x)."""


@dataclass(frozen=True)
class TaskRatio:
    task: str
    original: float  # mean score over the lengths
    converted: float
    ratio: float | None  # converted / original (None where the original does not solve the task)


def task_ratios(original: dict[tuple[str, int], float], converted: dict[tuple[str, int], float],
                solved: float = SOLVED) -> list[TaskRatio]:
    """Per task, both models' mean score over the lengths and their ratio, the worst (lowest ratio) first; tasks
    the original does not solve (mean below ``solved``; 0 counts every task it ever solves) come last, without
    a ratio."""
    tasks = list(dict.fromkeys(t for t, _ in original))
    rows = []
    for t in tasks:
        o = [v for (task, _), v in original.items() if task == t]
        c = [converted[t, L] for (task, L) in original if task == t]
        mo, mc = sum(o) / len(o), sum(c) / len(c)
        rows.append(TaskRatio(t, mo, mc, mc / mo if mo > 0 and mo >= solved else None))
    return sorted(rows, key=lambda r: (r.ratio is None, r.ratio if r.ratio is not None else 0.0))
