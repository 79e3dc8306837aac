"""Speed of a converted model beside its original, in one run: prefill, decoding, a training step, peak memory,
each next to the FLOP or byte ratio that bounds it.

* **prefill**: one forward over T tokens with a fresh KV cache and the logits of the last token only (what
  ``generate`` does before its first token; with ``chunk``, forwards of that many tokens through the cache, as
  ``generate(prefill_chunk_size=)`` runs a long prompt); bound: model FLOPs (attention with its projections,
  MLP, one lm_head row);
* **decode**: greedy steps one token at a time after a T-token prefill, for each batch size (the prefilled
  cache is repeated to the batch, so every row holds T tokens); bound: bytes read per step (every weight once,
  the KV cache once per row);
* **train step**: forward + backward of a T-token sequence with labels; bound: model FLOPs with the lm_head at
  every token (the backward costs about twice the forward for both models);
* **peak memory**: the resident memory a prefill adds at its peak (CPU: the process's high-water mark, reset
  before the call, where Linux allows; CUDA: the allocator's peak).

Every time is the minimum over ``reps`` runs, alternating the two models, so load drifts hit both.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..convert.cache import cache_bytes
from ..convert.compat import prefill, with_cache
from ..convert.costs import attention_costs
from ..convert.families import attention_layers, family_of


@dataclass(frozen=True)
class SpeedRow:
    measure: str  # e.g. "prefill", "decode b=8", "train step", "peak memory", "KV cache"
    tokens: int  # T (prefill / training length, decode context)
    original: float  # seconds (prefill, train), tokens/s (decode), bytes (memory)
    converted: float
    ratio: float | None  # speed-up (original / converted time, converted / original tokens/s); bytes: conv / orig
    limit: float | None  # what the FLOPs or bytes allow for that ratio
    limit_of: str  # "FLOPs" | "bytes" | ""


def model_flops(model: nn.Module, T: int, logits_tokens: int) -> int:
    """Forward FLOPs at T tokens: attention (with Q/K/V/O projections, from the cost model), every other linear
    layer at every token, and the lm_head at ``logits_tokens`` tokens."""
    fam = family_of(model)
    attention = sum(r.flops for r in attention_costs(model, T))
    inside = {id(p) for _, m in attention_layers(model, fam).values() for p in m.parameters()}
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    other = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
                and id(m.weight) not in inside and id(m.weight) not in head_params)
    lm = head.weight.numel() if head is not None else 0
    return attention + 2 * T * other + 2 * logits_tokens * lm


def original_flops(model: nn.Module, T: int, logits_tokens: int) -> int:
    """The same count for the unconverted layout of ``model`` (attention as the original's)."""
    converted = sum(r.flops for r in attention_costs(model, T))
    original = sum(r.flops_original for r in attention_costs(model, T))
    return model_flops(model, T, logits_tokens) - converted + original


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def greedy_prefill(model: nn.Module, ids: Tensor, chunk: int | None = None):
    """(the KV cache after ``ids`` (B, T), the greedy next token (B, 1)); ``chunk`` tokens per forward."""
    cache, logits = prefill(model, ids, chunk)
    return cache, logits.argmax(-1, keepdim=True)


def decode_seconds(model: nn.Module, cache, token: Tensor, steps: int) -> float:
    """Seconds per greedy step (batch = token rows), after one untimed step."""
    dev = token.device
    with torch.no_grad():
        token = model(input_ids=token, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits.argmax(-1)

        def run():
            nonlocal token
            for _ in range(steps):
                token = model(input_ids=token, **with_cache(model, cache), use_cache=True,
                              logits_to_keep=1).logits.argmax(-1)

        return _clock(run, dev) / steps


def train_step_seconds(model: nn.Module, ids: Tensor) -> float:
    """One forward + backward with labels (gradients dropped afterwards; the weights do not change)."""
    was = model.training
    model.train()
    saved = {n: t.detach().clone() for n, t in list(model.named_buffers()) + list(model.named_parameters())
             if n.endswith("mosa_threshold")}

    def run():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    seconds = _clock(run, ids.device)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # causal routing moves its thresholds in training: put them back
        for n, t in list(model.named_buffers()) + list(model.named_parameters()):
            if n in saved:
                t.copy_(saved[n])
    model.train(was)
    return seconds


def _high_water_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@contextlib.contextmanager
def _heap_as_used():
    """While measuring on CPU: every allocation of 64 KiB or more gets pages of its own, returned on free (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``), and the heap's free pages go back first (``malloc_trim``), so that resident
    memory follows what is live. Without it a call reuses pages an earlier call freed but kept, and the second
    model measured reads near 0. Afterwards the threshold is 32 MiB (where glibc's own adapts to with large
    tensors). A no-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both)
    except (OSError, AttributeError):
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)


def peak_bytes(fn, device: torch.device) -> int | None:
    """Memory ``fn()`` adds at its peak: CUDA allocator peak, or the CPU process's resident high-water mark above
    what was resident before, with the heap following what is live (None where Linux does not let us reset the
    mark)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _heap_as_used():
        try:
            before = _status_kib("VmRSS")
            if not _high_water_reset():
                return None
            fn()
            return max(0, _status_kib("VmHWM") - before) * 1024
        except OSError:
            return None


def bench_model(converted: nn.Module, original: nn.Module, ids: Tensor, contexts: list[int], batches: list[int],
                decode_steps: int, train_length: int | None, reps: int = 3, progress: bool = True,
                positions: int | None = None, chunk: int | None = None) -> list[SpeedRow]:
    """``ids`` (1, N) with N >= every length; both models on the same device and dtype. With ``positions`` (the
    model's), decoding never runs past them: where T + ``decode_steps`` + 1 (the untimed first step) would, the
    decode rows are timed after ``positions - decode_steps - 1`` tokens and say so (their ``tokens``). ``chunk``:
    every prefill reads that many tokens per forward."""
    from tqdm.auto import tqdm

    dev = ids.device
    models = {"original": original.eval(), "converted": converted.eval()}
    rows: list[SpeedRow] = []
    steps = len(contexts) * (1 + len(batches)) + (1 if train_length else 0) + 1
    bar = tqdm(total=steps, desc="bench", disable=not progress)
    for T in contexts:
        best = {k: float("inf") for k in models}
        for _ in range(reps):  # alternate the models
            for name, m in models.items():
                best[name] = min(best[name], _clock(lambda: prefill(m, ids[:, :T], chunk), dev))
        limit = original_flops(converted, T, 1) / model_flops(converted, T, 1)
        rows.append(SpeedRow("prefill", T, best["original"], best["converted"], best["original"] / best["converted"],
                             limit, "FLOPs"))
        bar.update(1)
        Td = T if positions is None else min(T, positions - decode_steps - 1)  # + 1 untimed step
        rows += _decode_rows(models, ids[:, :T], Td, batches, decode_steps, bar, chunk)
    T = max(contexts)
    mem = {name: peak_bytes(lambda: prefill(m, ids[:, :T], chunk), dev) for name, m in models.items()}
    if None not in mem.values():  # (a ratio only where the original's peak rose measurably: never 0/0)
        rows.append(SpeedRow("peak memory", T, mem["original"], mem["converted"],
                             mem["converted"] / mem["original"] if mem["original"] > 0 else None, None, ""))
    bar.update(1)
    if train_length:
        x = ids[:, :train_length]
        best = {k: float("inf") for k in models}
        for _ in range(max(1, reps - 1)):
            for name, m in models.items():
                best[name] = min(best[name], train_step_seconds(m, x))
        limit = original_flops(converted, train_length, train_length) / model_flops(converted, train_length,
                                                                                    train_length)
        rows.append(SpeedRow("train step", train_length, best["original"], best["converted"],
                             best["original"] / best["converted"], limit, "FLOPs"))
        bar.update(1)
    bar.close()
    return rows


def _decode_rows(models: dict, x: Tensor, Td: int, batches: list[int], decode_steps: int, bar,
                 chunk: int | None = None) -> list[SpeedRow]:
    """Greedy decoding after the first ``Td`` tokens of ``x`` at every batch size (each beside the bytes a step
    reads: weights + b rows of KV cache), then the KV cache both models hold after all of ``x``."""
    T = x.shape[1]
    wbytes = {k: weight_bytes(m) for k, m in models.items()}
    rows, kv = [], {}
    if Td != T:
        for name, m in models.items():
            kv[name] = sum(cache_bytes(prefill(m, x, chunk)[0])[:2])
    for b in batches:
        rate = {}
        for name, m in models.items():
            cache, token = greedy_prefill(m, x[:, :Td], chunk)
            kv.setdefault(name, sum(cache_bytes(cache)[:2]))
            if b > 1:  # every row holds the same T tokens: the bytes a step reads are b rows' worth
                cache.batch_repeat_interleave(b)
                token = token.repeat_interleave(b, 0)
            rate[name] = decode_seconds(m, cache, token, decode_steps)
            del cache
        per_token = {name: wbytes[name] + b * kv[name] for name in models}
        rows.append(SpeedRow(f"decode b={b}", Td, b / rate["original"], b / rate["converted"],
                             rate["original"] / rate["converted"], per_token["original"] / per_token["converted"],
                             "bytes"))
        bar.update(1)
    rows.append(SpeedRow("KV cache", T, kv["original"], kv["converted"], kv["converted"] / kv["original"], None, ""))
    return rows


def format_rows(rows: list[SpeedRow]) -> str:
    lines = ["| measure | tokens | original | converted | converted vs original | the limit (what bounds it) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.measure in ("prefill", "train step"):
            fig = lambda s: f"{s:,.2f} s" if s >= 1 else f"{s * 1e3:,.3g} ms"
            rel = f"**{r.ratio:.2f}x** faster"
        elif r.measure.startswith("decode"):
            fig = lambda s: f"{s:,.1f} tok/s"
            rel = f"**{r.ratio:.2f}x** tokens/s"
        else:
            fig = lambda b: f"{b / 2**20:,.1f} MiB"
            rel = f"{r.ratio:.3f}x the bytes" if r.ratio is not None else \
                "not measurable (the original's peak did not rise above what was resident)"
        limit = f"{r.limit:.2f}x ({r.limit_of})" if r.limit is not None else ""
        ctx = f"after {r.tokens:,}" if r.measure.startswith("decode") or r.measure == "KV cache" else f"{r.tokens:,}"
        lines.append(f"| {r.measure} | {ctx} | {fig(r.original)} | {fig(r.converted)} | {rel} | {limit} |")
    return "\n".join(lines)
