"""Decoding benchmark: KV-cache bytes after a prefill of T tokens and decode speed, MoSA model vs original.

Both models prefill the same text with ``use_cache=True``; the cache is then measured (dense heads' K/V plus
the K/V MoSA units actually hold) and ``decode_tokens`` greedy steps are timed one token at a time.
Every figure is a ratio against the original model in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..convert.cache import cache_bytes
from .model import decode_seconds, greedy_prefill


@dataclass(frozen=True)
class GenRow:
    context: int
    kv_bytes: int
    kv_bytes_original: int
    decode_s: float | None  # seconds per decoded token (None: not timed at this context)
    decode_s_original: float | None


def bench_generate(model: nn.Module, original: nn.Module, ids: Tensor, contexts: list[int], timed_context: int,
                   decode_tokens: int, progress: bool = True) -> list[GenRow]:
    """``ids`` (1, N) with N >= max(contexts); contexts are prefilled, the one equal to ``timed_context`` timed."""
    from tqdm.auto import tqdm


    rows = []
    for T in tqdm(sorted(set(contexts) | {timed_context}), desc="contexts", disable=not progress):
        figures = []
        for m in (model, original):
            cache, token = greedy_prefill(m, ids[:, :T])
            dense, sparse, _ = cache_bytes(cache)
            t = decode_seconds(m, cache, token, decode_tokens) if T == timed_context else None
            figures.append((dense + sparse, t))
            del cache
        rows.append(GenRow(T, figures[0][0], figures[1][0], figures[0][1], figures[1][1]))
    return rows


def format_rows(rows: list[GenRow]) -> str:
    lines = ["| context T | KV bytes MoSA | KV bytes original | KV × | decode tok/s MoSA | decode tok/s original | "
             "decode speed × |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mib = lambda b: f"{b / 2**20:,.1f} MiB"
        if r.decode_s is None:
            speed = "| - | - | - |"
        else:
            speed = f"| {1 / r.decode_s:,.2f} | {1 / r.decode_s_original:,.2f} | {r.decode_s_original / r.decode_s:.2f} |"
        lines.append(f"| {r.context} | {mib(r.kv_bytes)} | {mib(r.kv_bytes_original)} | "
                     f"{r.kv_bytes / r.kv_bytes_original:.3f} {speed}")
    return "\n".join(lines)
