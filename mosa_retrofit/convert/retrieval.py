"""Retrieval heads: which heads of a pretrained model read a hidden fact back when it is asked for.

Retrieval prompts hide four named 5-digit keys in ordinary text (the asked one at a depth between 10 % and
90 %) and ask for one at the end (longctx.passkey_prompt, variant 'multi'). Teacher-forced through the
*original* model, every query head's attention from the answer positions onto the asked key's sentence is
summed: the **retrieval score** of the head (the retrieval heads of Wu et al., arXiv 2404.15574, measured by
attention mass instead of argmax hits). A KV group's score is the sum of its heads'. A conversion with
``head_choice='retrieval'`` keeps the highest-scoring heads dense; with ``dense_scope='model'`` wherever they
are. On SmolLM2-135M a few layers hold them (layers 6-8 and 14-24); keeping a quarter of the KV groups dense by
this score and the rest streaming (sinks + a 256-token window, DuoAttention's layout) kept passkey retrieval at
2,048 tokens (12 of 12), where the groups with the largest output energy per layer kept none.

The masses are read through a registered transformers attention function (``AttentionInterface``), so any
family that dispatches attention through it is scored without knowing its layout: q is (B, H, T, d) after
RoPE, k/v (B, KV, T, d).

Shape legend: B batch, H query heads, KV key/value heads, G = H / KV, T tokens, d head dim, r answer rows.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..text.assets import wikipedia_articles
from ..text.prompts import Prompt, passkey_prompt
from ..text.protocol import PROTOCOL
from .families import attention_layers, family_of

PROBE = "mosa_retrofit_retrieval_probe"


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):
    """Causal attention that also adds each head's attention mass from ``rows`` onto ``span`` to
    ``module.mosa_retrieval_mass`` (H,). The prompts are unpadded single rows: the mask is the causal one."""
    rows, (lo, hi) = module.mosa_retrieval_probe
    B, H, T, d = query.shape
    G = H // key.shape[1]
    k, v = key.repeat_interleave(G, dim=1), value.repeat_interleave(G, dim=1)  # (B, H, T, d)
    mask = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    if sliding_window is not None:
        i = torch.arange(T, device=query.device)
        mask = mask & (i[:, None] - i[None, :] < sliding_window)
    s = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, T, T), fp32 in any dtype
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    module.mosa_retrieval_mass += p[0, :, rows, lo:hi].sum(-1).mean(-1).cpu()  # (H,)
    return torch.matmul(p.to(v.dtype), v).transpose(1, 2).contiguous(), None


def retrieval_prompts(tokenizer, texts: list[str], count: int, length: int, seed: int = 0) -> list[Prompt]:
    """``count`` multi-key prompts of ``length`` tokens: four named keys hidden in ordinary text (``texts``, one
    per prompt in turn), the asked one at depths spread over 10 %..90 %."""
    rng = random.Random(f"retrieval-calibration-{seed}")
    return [passkey_prompt(tokenizer, length, 0.1 + 0.8 * (i + 0.5) / count, rng, "multi",
                           filler=texts[i % len(texts)]) for i in range(count)]


@torch.no_grad()
def retrieval_scores(model: nn.Module, prompts: list[Prompt], layers: list[int] | None = None,
                     progress: bool = True) -> dict[int, Tensor]:
    """``{layer: (H,) score}``: each query head's attention mass from the answer positions onto the asked key's
    sentence, averaged over answer positions and summed over ``prompts`` (one forward each)."""
    from transformers import (
        AttentionInterface,  # (our own name in transformers' registry of functions)
    )

    AttentionInterface.register(PROBE, _probe_attention)
    family = family_of(model)
    modules = {i: m for i, (_, m) in attention_layers(model, family).items()}  # (every layer runs the probe)
    for i, m in modules.items():
        m.mosa_retrieval_mass = torch.zeros(family.head_weights(m).num_heads)
    previous, was_training = model.config._attn_implementation, model.training
    device = next(model.parameters()).device
    model.set_attn_implementation(PROBE)
    model.eval()
    try:
        for prompt in tqdm(prompts, desc="retrieval heads", unit="prompt", disable=not progress):
            span = (prompt.needle_at, prompt.needle_at + prompt.needle_tokens)
            rows = list(range(prompt.answer_start - 1, prompt.ids.shape[1] - 1))  # positions predicting the answer
            for m in modules.values():
                m.mosa_retrieval_probe = (rows, span)
            model(input_ids=prompt.ids.to(device), use_cache=False)
        return {i: m.mosa_retrieval_mass.clone() for i, m in modules.items() if layers is None or i in layers}
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)
        for m in modules.values():
            for name in ("mosa_retrieval_mass", "mosa_retrieval_probe"):
                m.__dict__.pop(name, None)


def default_retrieval_prompts(tokenizer, count: int = 16, length: int = 1024) -> list[Prompt]:
    """Retrieval prompts over the embedded Wikipedia training articles (never the held-out ones)."""
    articles = wikipedia_articles()[: -PROTOCOL.validation_documents]
    texts = [" ".join(articles[i: i + 10]) for i in range(0, min(len(articles), 40), 10)]
    try:
        return retrieval_prompts(tokenizer, texts, count, length)
    except ValueError as e:  # the model's positions cannot hold four keys and a question
        raise ValueError(f"head_choice='retrieval' hides 4 keys in prompts of {length} tokens, the model's "
                         f"positions allow no more and that is too short ({e}); use head_choice='scored'") from None
