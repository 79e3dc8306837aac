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

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..convert.cache import cache_bytes
from ..convert.compat import keep_logits, prefill, with_cache
from ..text.prompts import Prompt, passkey_prompt


def tail_logits(model: nn.Module, ids: Tensor, keep: int, chunk: int | None = None) -> Tensor:
    """Logits (B, keep, V) of the last ``keep`` positions of ``ids`` (B, L) (sliced where the forward computes
    them all). ``chunk``: the tokens before them are read that many at a time through the model's KV cache
    (``prefill``), then the last ``keep`` in one cached forward: the same logits without one L x L forward."""
    if not chunk or ids.shape[1] <= chunk:
        return model(input_ids=ids, use_cache=False, **keep_logits(model, keep)).logits[:, -keep:]
    cache = prefill(model, ids[:, :-keep], chunk)[0]
    out = model(input_ids=ids[:, -keep:], use_cache=True, **keep_logits(model, keep), **with_cache(model, cache))
    return out.logits[:, -keep:]


@torch.no_grad()
def answer_correct(model: nn.Module, prompt: Prompt, chunk: int | None = None) -> bool:
    """Teacher forcing: the argmax at every answer position is the answer's token (``chunk``: see tail_logits)."""
    ids = prompt.ids.to(next(model.parameters()).device)
    answer = ids.shape[1] - prompt.answer_start  # answer tokens, each predicted from the position before it
    predicted = tail_logits(model, ids, answer + 1, chunk)[0, :-1].argmax(-1)  # (answer,)
    return bool(torch.equal(predicted, ids[0, prompt.answer_start:]))


def passkey_grid(model: nn.Module, tokenizer, lengths: list[int], depths: list[float], trials: int,
                 variant: str = "single", seed: int = 0, progress: bool = True,
                 chunk: int | None = None) -> dict[tuple[int, float], float]:
    """Accuracy per (length, depth) over ``trials`` keys (the same keys and filler for every model); ``chunk``
    reads each prompt that many tokens at a time through the KV cache."""
    model.eval()
    grid = {}
    cells = [(L, d) for L in lengths for d in depths]
    with tqdm(total=len(cells) * trials, desc=f"passkey ({variant})", unit="trial", disable=not progress) as bar:
        for L, d in cells:
            rng = random.Random(f"{seed}-{variant}-{L}-{d}")
            hits = 0
            for _ in range(trials):
                hits += answer_correct(model, passkey_prompt(tokenizer, L, d, rng, variant), chunk)
                bar.update(1)
            grid[(L, d)] = hits / trials
    return grid


def context_documents(tokenizer, texts: list[str], longest: int, score_tokens: int) -> list[Tensor]:
    """Token ids of the documents long enough for ``longest`` tokens of context before ``score_tokens``."""
    docs = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [d for d in docs if d.numel() >= longest + score_tokens]


@torch.no_grad()
def context_perplexity(model: nn.Module, docs: list[Tensor], contexts: list[int], score_tokens: int = 256,
                       progress: bool = True, chunk: int | None = None) -> dict[int, float]:
    """Perplexity of each document's last ``score_tokens`` tokens given the L tokens before them, per L: the
    same tokens are scored at every L (each document's tail), only the context before them changes. ``chunk``
    reads the context that many tokens at a time through the KV cache."""
    model.eval()
    device = next(model.parameters()).device
    result = {}
    with tqdm(total=len(contexts) * len(docs), desc="context perplexity", unit="doc", disable=not progress) as bar:
        for L in contexts:
            total, count = 0.0, 0
            for doc in docs:
                ids = doc[-(L + score_tokens):][None].to(device)  # (1, L + score)
                logits = tail_logits(model, ids, score_tokens + 1, chunk)[0, :-1].float()  # (score, V) predicts the tail
                total += F.cross_entropy(logits, ids[0, L:], reduction="sum").item()
                count += score_tokens
                bar.update(1)
            result[L] = math.exp(total / count)
    return result


@torch.no_grad()
def prefill_footprint(model: nn.Module, length: int, seed: int = 0, chunk: int | None = None) -> tuple[int, float]:
    """(bytes of K/V rows the model's cache holds after one ``length``-token prefill, seconds it took). ``chunk``
    prefills that many tokens at a time through the cache (what a long prompt needs where one forward does not
    fit). Heads that keep no cache (expert-choice MoSA, study baselines) hold nothing there: measure
    causal-routing models."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    cache = prefill(model, ids.to(device), chunk)[0]
    seconds = time.perf_counter() - start
    held = cache_bytes(cache)
    return held.dense + held.mosa, seconds
