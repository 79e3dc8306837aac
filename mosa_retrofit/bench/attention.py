"""Benchmark: one attention layer of MoSA heads (all-MoSA, and a hybrid) against dense causal attention.

Every number is a ratio against a dense causal multi-head layer of the same width and head count (SDPA,
same partial RoPE), measured in the same run. FLOPs count the causal half on both sides:
    dense head: 8·h·d·T + 2·d·T²          MoSA head: 8·h·d·k + 2·d·k² + 2·h·T        (k = T // sparsity)
Peak memory is the most memory that one forward+backward holds at once above what was in use before it
(allocator-level: the profiler's allocation events on CPU, max_memory_allocated on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..convert.costs import dense_flops, mosa_flops
from ..layers.modules import DenseHeadsModule, MoSA, PureMoSA
from ..ops.routing import tokens_per_head


@dataclass(frozen=True)
class Row:
    T: int
    sparsity: float
    k: int
    layer: str  # "mosa" (all heads MoSA) or "hybrid" (some dense heads kept)
    fwd: float  # time ratio against dense, forward only (no grad)
    fwd_bwd: float  # time ratio against dense, forward + backward
    flops: float  # FLOP ratio against dense
    peak_mib: float  # peak extra memory of forward + backward, MiB
    dense_peak_mib: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_mib(fn: Callable[[], None], device: torch.device) -> float:
    """Peak bytes allocated by ``fn`` above what was live before it, in MiB (allocator-level, exact)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _step_fns(layer: nn.Module, x: torch.Tensor):
    def fwd() -> None:
        with torch.no_grad():
            layer(x)

    def fwd_bwd() -> None:
        layer(x).sum().backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    return fwd, fwd_bwd


def bench_attention(
    seq_lens: tuple[int, ...] = (1024, 4096, 8192),
    sparsities: tuple[float, ...] = (4, 8, 16),
    h: int = 1024,
    heads: int = 16,
    head_dim: int = 64,
    hybrid_dense_heads: int = 4,
    batch: int = 1,
    reps: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool = True,
) -> list[Row]:
    """Time and measure the layers; returns one :class:`Row` per (T, sparsity, layer)."""
    from tqdm.auto import tqdm

    dev = torch.device(device)
    torch.manual_seed(0)
    n_mosa_hybrid = heads - hybrid_dense_heads
    dense = DenseHeadsModule(h, head_dim, heads).to(dev, dtype)
    cases = [(T, s) for T in seq_lens for s in sparsities]
    bar = tqdm(total=len(seq_lens) + 2 * len(cases), desc="bench attention", disable=not progress)
    rows, dense_cost = [], {}
    for T in seq_lens:
        x = torch.randn(batch, T, h, device=dev, dtype=dtype, requires_grad=True)
        fwd, fwd_bwd = _step_fns(dense, x)
        reps_dense = max(1, reps if T <= 4096 else reps - 1)
        dense_cost[T] = (median_time(fwd, reps_dense, dev), median_time(fwd_bwd, reps_dense, dev),
                         _peak_mib(fwd_bwd, dev))
        bar.update()
        for s in (s for t, s in cases if t == T):
            k = tokens_per_head(T, s)
            layers = {
                "mosa": PureMoSA(h=h, h_prim=head_dim, num_mosa_heads=heads, sparsity=s),
                "hybrid": MoSA(h=h, h_prim=head_dim, num_mosa_heads=n_mosa_hybrid,
                               num_other_heads=hybrid_dense_heads, max_seq_len=T, sparsity=s),
            }
            for name, layer in layers.items():
                layer.to(dev, dtype)
                fwd, fwd_bwd = _step_fns(layer, x)
                t_f, t_fb = median_time(fwd, 2 * reps + 1, dev), median_time(fwd_bwd, 2 * reps + 1, dev)
                peak = _peak_mib(fwd_bwd, dev)
                n_mosa = heads if name == "mosa" else n_mosa_hybrid
                flops = (n_mosa * mosa_flops(h, head_dim, T, k)
                         + (heads - n_mosa) * dense_flops(h, head_dim, T)) / (heads * dense_flops(h, head_dim, T))
                d_f, d_fb, d_peak = dense_cost[T]
                rows.append(Row(T, s, k, name, t_f / d_f, t_fb / d_fb, flops, peak, d_peak))
                bar.update()
    bar.close()
    return rows


def format_table(rows: list[Row]) -> str:
    """Markdown table: each time ratio beside its FLOP ratio, and peak memory."""
    lines = [
        "| T | sparsity | k | layer | fwd time × | fwd+bwd time × | FLOP × | peak MiB (dense) | memory × |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = r.peak_mib / r.dense_peak_mib if r.dense_peak_mib > 0 else float("nan")
        lines.append(
            f"| {r.T} | {r.sparsity:g} | {r.k} | {r.layer} | {r.fwd:.4f} | {r.fwd_bwd:.4f} | {r.flops:.4f} "
            f"| {r.peak_mib:.1f} ({r.dense_peak_mib:.1f}) | {mem:.3f} |"
        )
    return "\n".join(lines)


def profile_mosa(T: int = 8192, sparsity: float = 8, h: int = 1024, heads: int = 16, head_dim: int = 64,
                 device: str = "cpu", rows: int = 12) -> str:
    """Where the time of one all-MoSA forward+backward goes: the profiler's top operators."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    layer = PureMoSA(h=h, h_prim=head_dim, num_mosa_heads=heads, sparsity=sparsity).to(dev)
    x = torch.randn(1, T, h, device=dev, requires_grad=True)
    _, fwd_bwd = _step_fns(layer, x)
    fwd_bwd()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with _quiet_stderr(), profile(activities=activities, record_shapes=True) as prof:
        fwd_bwd()
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=rows, max_name_column_width=48, max_shapes_column_width=60)
