"""Benchmark: the key-selection attention op (ops/keys.py) against fused dense causal SDPA, per backend.

Both sides get the same GQA layout (E key/value heads, G query heads each) and the same Q/K/V; the op's far
keys are the sinks and 1/sparsity of the tokens at random positions, per unit. FLOPs count the score and value
products of the pairs each side must compute (dense: the causal half; the op: its band and the far keys before
each query's window), so ``time ratio / FLOP ratio`` says how far the op is from running at dense SDPA's speed
per FLOP (1.0: as efficient; the goal is 1.3 at 8k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..convert.costs import window_pairs
from ..ops.keys import FarKeys, key_selection_attention, resolve_backend
from .attention import median_time


@dataclass(frozen=True)
class KeysRow:
    T: int
    backend: str
    fwd: float  # time ratio against dense causal SDPA, forward (no grad)
    fwd_bwd: float | None  # forward + backward (None: not measured)
    flops: float  # FLOP ratio against dense

    @property
    def fwd_vs_limit(self) -> float:
        return self.fwd / self.flops


def _inputs(T: int, E: int, G: int, d: int, window: int, sparsity: float, sinks: int, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, E * G, d, generator=g).transpose(1, 2)  # (1, H, T, d), the layout a projection gives
    k = torch.randn(1, T, E, d, generator=g).transpose(1, 2)
    v = torch.randn(1, T, E, d, generator=g).transpose(1, 2)
    M = sinks + int(T // sparsity)
    pos = torch.stack([torch.cat((torch.arange(sinks), sinks + torch.randperm(T - sinks, generator=g)[: M - sinks]))
                       .sort().values for _ in range(E)])[None]  # (1, E, M)
    at = pos[..., None].expand(1, E, M, d)
    far = FarKeys(k.gather(2, at), v.gather(2, at), pos, None)
    pairs = window_pairs(T, window) + int((torch.arange(T)[:, None] - pos[0, 0][None] >= window).sum())
    move = lambda t: t.to(device, dtype)
    return (move(q), move(k), move(v), FarKeys(move(far.k), move(far.v), far.pos.to(device), None),
            pairs / (T * (T + 1) / 2))


def bench_keys(seq_lens, backends, heads: int = 9, kv_heads: int = 3, head_dim: int = 64, window: int = 256,
               sparsity: float = 64, sinks: int = 4, reps: int = 3, backward: bool = True,
               device: str = "cpu", dtype=torch.float32) -> list[KeysRow]:
    dev = torch.device(device)
    G = heads // kv_heads
    rows = []
    for T in seq_lens:
        q, k, v, far, flops = _inputs(T, kv_heads, G, head_dim, window, sparsity, sinks, dev, dtype)
        scale = head_dim ** -0.5
        with torch.no_grad():
            dense = median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                        enable_gqa=True), reps, dev)
        dense_fb = None
        if backward:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            dense_fb = median_time(lambda: F.scaled_dot_product_attention(
                *leaves, is_causal=True, scale=scale, enable_gqa=True).sum().backward(), reps, dev)
        for backend in backends:
            if resolve_backend(backend, q) != backend:
                continue
            with torch.no_grad():
                t = median_time(lambda: key_selection_attention(q, k, v, window, scale, far, backend=backend),
                                 reps, dev)
            fb = None
            if backward and not (backend == "flex" and dev.type == "cpu"):  # FlexAttention: no CPU backward
                leaves = [t_.detach().requires_grad_() for t_ in (q, k, v, far.k, far.v)]
                run = lambda: key_selection_attention(leaves[0], leaves[1], leaves[2], window, scale,
                                                      FarKeys(leaves[3], leaves[4], far.pos), backend=backend)
                fb = median_time(lambda: run().sum().backward(), reps, dev) / dense_fb
            rows.append(KeysRow(T, backend, t / dense, fb, flops))
    return rows


def format_keys(rows: list[KeysRow]) -> str:
    lines = ["| T | backend | FLOPs vs dense | forward time vs dense | × its FLOP limit | forward+backward time "
             "vs dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        fb = f"{r.fwd_bwd:.3f}" if r.fwd_bwd is not None else "-"
        lines.append(f"| {r.T:,} | {r.backend} | {r.flops:.3f} | {r.fwd:.3f} | {r.fwd_vs_limit:.2f} | {fb} |")
    return "\n".join(lines)
