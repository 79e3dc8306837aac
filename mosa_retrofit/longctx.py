"""Long-context evaluation: passkey retrieval over lengths x depths, and perplexity against available context.

* **Passkey** (Landmark Attention's test): filler text, one sentence that states a 5-digit key at a chosen
  depth, a question at the end. Scored exactly and cheaply by teacher forcing: one forward over prompt +
  answer; a trial is correct iff the argmax at every answer position is the answer's token. ``variant='multi'``
  hides several keys under different names and asks for one, so copying the only number in the text fails.
* **Perplexity against context**: the *same* final ``score_tokens`` of each long document, scored with L tokens
  of the document before them, for every L; a model that uses distant context improves as L grows.

Shape legend: L context length in tokens, N documents.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .cache import cache_bytes
from .compat import output_cache

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


def passkey_prompt(tokenizer, length: int, depth: float, rng: random.Random, variant: str = "single",
                   filler: str = FILLER, keys: int = 4) -> Prompt:
    """A prompt of exactly ``length`` tokens (answer included) whose (asked) needle starts at the filler
    sentence boundary nearest to ``depth`` (0: the start, 1: just before the question)."""
    if variant not in ("single", "multi"):
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


@torch.no_grad()
def answer_correct(model: nn.Module, prompt: Prompt) -> bool:
    """Teacher forcing: the argmax at every answer position is the answer's token."""
    ids = prompt.ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits[0]  # (L, V)
    predicted = logits[prompt.answer_start - 1: -1].argmax(-1)
    return bool(torch.equal(predicted, ids[0, prompt.answer_start:]))


def passkey_grid(model: nn.Module, tokenizer, lengths: list[int], depths: list[float], trials: int,
                 variant: str = "single", seed: int = 0, progress: bool = True) -> dict[tuple[int, float], float]:
    """Accuracy per (length, depth) over ``trials`` keys (the same keys and filler for every model)."""
    model.eval()
    grid = {}
    cells = [(L, d) for L in lengths for d in depths]
    with tqdm(total=len(cells) * trials, desc=f"passkey ({variant})", unit="trial", disable=not progress) as bar:
        for L, d in cells:
            rng = random.Random(f"{seed}-{variant}-{L}-{d}")
            hits = 0
            for _ in range(trials):
                hits += answer_correct(model, passkey_prompt(tokenizer, L, d, rng, variant))
                bar.update(1)
            grid[(L, d)] = hits / trials
    return grid


def context_documents(tokenizer, texts: list[str], longest: int, score_tokens: int) -> list[Tensor]:
    """Token ids of the documents long enough for ``longest`` tokens of context before ``score_tokens``."""
    docs = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [d for d in docs if d.numel() >= longest + score_tokens]


@torch.no_grad()
def context_perplexity(model: nn.Module, docs: list[Tensor], contexts: list[int], score_tokens: int = 256,
                       progress: bool = True) -> dict[int, float]:
    """Perplexity of each document's last ``score_tokens`` tokens given the L tokens before them, per L: the
    same tokens are scored at every L (each document's tail), only the context before them changes."""
    model.eval()
    device = next(model.parameters()).device
    result = {}
    with tqdm(total=len(contexts) * len(docs), desc="context perplexity", unit="doc", disable=not progress) as bar:
        for L in contexts:
            total, count = 0.0, 0
            for doc in docs:
                ids = doc[-(L + score_tokens):][None].to(device)  # (1, L + score)
                logits = model(input_ids=ids, use_cache=False).logits[0, L - 1: -1].float()  # predicts the tail
                total += F.cross_entropy(logits, ids[0, L:], reduction="sum").item()
                count += score_tokens
                bar.update(1)
            result[L] = math.exp(total / count)
    return result


@torch.no_grad()
def prefill_footprint(model: nn.Module, length: int, seed: int = 0) -> tuple[int, float]:
    """(bytes of K/V rows the model's cache holds after one ``length``-token prefill, seconds it took). Heads that
    keep no cache (expert-choice MoSA, study baselines) hold nothing there: measure causal-routing models."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    out = model(input_ids=ids.to(device), use_cache=True)
    seconds = time.perf_counter() - start
    held = cache_bytes(output_cache(out))
    return held.dense + held.mosa, seconds
