"""The K/V a windowed head group keeps between forwards (streaming and key-selection MoSA heads). It holds and
updates tensors; the attention that reads them is ops/keys.py's (``window_step_attention``,
``window_chunk_attention``).

A query at position p of such a group sees the first ``sinks`` real tokens of its row and, for key-selection
heads, every token its unit routed (the *far* keys, values gated by the router, once they lie ``window`` or more
before it), plus its last ``window`` tokens (p - window < position <= p). So the store keeps, per unit and row:

* a **ring** of the last ``window`` cache positions (slot = position % window): K, V, whether the slot holds a
  real token, whether its token is kept (sink or routed) and its gate;
* an append-only list of **far rows**: when a kept token leaves the ring it is appended (its value gated); a far
  row is never moved again.

A decode step touches one ring slot and appends at most one far row per unit and row; its query reads
[ring | far rows] of one buffer (``step_rows``). Bytes held: (window + sinks + routed) rows per unit,
against T rows per KV head of the original cache.

Positions are cache positions (the index of a token among all tokens the layer has seen, padding included),
so distances match what a full forward over the padded row computes.

Shape legend: E units, B batch, G query heads per unit, T new tokens, w window (ring slots), C far capacity,
n far rows held (max over units and rows), d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.routing import kept_first


class WindowStore:
    """Rows kept for one layer's windowed group. ``k``/``v`` (E, B, w + C, d): ring slots first, far rows after;
    ``ring_valid`` (B, w), ``ring_keep`` / ``ring_gate`` (E, B, w), ``far_pos`` (E, B, C), ``count`` (E, B)."""

    def __init__(self, window: int, reach: int | None = None):
        self.window, self.reach = window, reach
        self.k = self.v = None
        self.ring_valid = self.ring_keep = self.ring_gate = self.far_pos = self.count = None
        self.next_pos = 0  # cache position of the next token

    # ------------------------------------------------------------------------------------------ state

    def _allocate(self, E: int, B: int, d: int, like: Tensor) -> None:
        w, C = self.window, 16
        self.k = like.new_zeros(E, B, w + C, d)
        self.v = like.new_zeros(E, B, w + C, d)
        self.ring_valid = torch.zeros(B, w, dtype=torch.bool, device=like.device)
        self.ring_keep = torch.zeros(E, B, w, dtype=torch.bool, device=like.device)
        self.ring_gate = torch.ones(E, B, w, dtype=like.dtype, device=like.device)
        self.far_pos = torch.zeros(E, B, C, dtype=torch.long, device=like.device)
        self.count = torch.zeros(E, B, dtype=torch.long, device=like.device)

    def _reserve(self, extra: int) -> None:
        """Room for ``extra`` more far rows per unit and row (capacity doubles: amortised O(1) per row)."""
        C = self.far_pos.shape[-1]
        need = int(self.count.max()) + extra
        if need <= C:
            return
        new = max(need, 2 * C)
        grow = lambda t: torch.cat((t, t.new_zeros(*t.shape[:2], new - C, *t.shape[3:])), dim=2)
        self.k, self.v, self.far_pos = grow(self.k), grow(self.v), grow(self.far_pos)

    @property
    def far_rows(self) -> int:
        return int(self.count.max()) if self.count is not None else 0

    def map(self, fn) -> None:
        """Apply ``fn(tensor, batch_dim)`` to every stored tensor (beam search reorders, batch expansion)."""
        if self.k is None:
            return
        self.k, self.v, self.ring_keep, self.ring_gate, self.far_pos, self.count = (
            fn(t, 1) for t in (self.k, self.v, self.ring_keep, self.ring_gate, self.far_pos, self.count))
        self.ring_valid = fn(self.ring_valid, 0)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the K/V rows held, bytes allocated by every tensor of the store)."""
        if self.k is None:
            return 0, 0
        size = lambda t: t.numel() * t.element_size()
        ring = self.ring_valid[None].expand_as(self.ring_keep)  # (E, B, w)
        if self.next_pos >= self.window:  # the oldest slot (position next_pos - w) is still read only if kept
            oldest = self.next_pos % self.window
            ring = ring.clone()
            ring[:, :, oldest] &= self.ring_keep[:, :, oldest]
        rows = int(ring.sum()) + int(self.count.sum())
        held = rows * self.k.shape[-1] * self.k.element_size() * 2
        return held, sum(size(t) for t in (self.k, self.v, self.ring_valid, self.ring_keep, self.ring_gate,
                                            self.far_pos, self.count))

    # ------------------------------------------------------------------------------------------ writing

    @torch.no_grad()
    def absorb(self, k: Tensor, v: Tensor, keep: Tensor, gate: Tensor | None, valid: Tensor) -> None:
        """Take T new tokens (k, v (E, B, T, d); keep (E, B, T); gate (E, B, T) or None; valid (B, T)) at the next
        positions: tokens leaving the ring that are kept become far rows, the last w tokens fill the ring."""
        E, B, T, d = k.shape
        if self.k is None:
            self._allocate(E, B, d, k)
        w, p = self.window, self.next_pos
        gate = torch.ones_like(keep, dtype=k.dtype) if gate is None else gate.to(k.dtype)
        if T == 1:
            slot = p % w
            if p >= w:  # the token at this slot (position p - w) leaves the ring; kept, it becomes a far row
                out = self.ring_keep[:, :, slot] & self.ring_valid[None, :, slot]  # (E, B)
                if bool(out.any()):
                    self._reserve(1)
                    at = (w + self.count)[..., None, None].expand(E, B, 1, d)
                    self.k.scatter_(2, at, self.k[:, :, slot: slot + 1].clone())
                    self.v.scatter_(2, at, self.v[:, :, slot: slot + 1] * self.ring_gate[:, :, slot, None, None])
                    self.far_pos.scatter_(2, self.count[..., None], torch.full_like(self.count[..., None], p - w))
                    self.count += out
            self.k[:, :, slot], self.v[:, :, slot] = k[:, :, 0], v[:, :, 0]
            self.ring_valid[:, slot] = valid[:, 0]
            self.ring_keep[:, :, slot], self.ring_gate[:, :, slot] = keep[:, :, 0], gate[:, :, 0]
            self.next_pos = p + 1
            return
        # T tokens: the sequence [ring (positions p - w .. p - 1) | new]; its first T rows leave the ring
        seq_k, seq_v, seq_valid, seq_keep, seq_gate = self.sequence(k, v, keep, gate, valid)  # (E, B, w + T, ..)
        leaving = seq_keep[:, :, :T]  # (E, B, T): positions p - w .. p - w + T - 1
        order, _ = kept_first(leaving)  # (E, B, n) kept first, in order
        n = order.shape[-1]
        if n:
            self._reserve(n)
            at = w + self.count[..., None] + torch.arange(n, device=k.device)  # (E, B, n); past a row's kept
            take = lambda t: t[:, :, :T].gather(2, order[..., None].expand(E, B, n, d))  # ones: free slots
            self.k.scatter_(2, at[..., None].expand(E, B, n, d), take(seq_k))
            self.v.scatter_(2, at[..., None].expand(E, B, n, d),
                            take(seq_v) * seq_gate[:, :, :T].gather(2, order)[..., None])
            self.far_pos.scatter_(2, at - w, order + (p - w))
            self.count += leaving.sum(-1)
        # the ring: positions p + T - w .. p + T - 1, each at its slot
        last = torch.arange(p + T - w, p + T, device=k.device)  # (w,)
        slot = last.remainder(w)
        order = torch.empty_like(slot)
        order[slot] = torch.arange(w, device=k.device)  # slot s holds sequence row T + order[s]
        rows = T + order
        self.k[:, :, :w], self.v[:, :, :w] = seq_k[:, :, rows], seq_v[:, :, rows]
        self.ring_valid = seq_valid[:, rows] & (last[order] >= 0)
        self.ring_keep, self.ring_gate = seq_keep[:, :, rows], seq_gate[:, :, rows]
        self.next_pos = p + T

    def ring_sequence(self) -> tuple[Tensor, ...]:
        """The ring in position order (positions next_pos - w .. next_pos - 1): k, v (E, B, w, d), valid (B, w),
        keep, gate (E, B, w)."""
        w, p = self.window, self.next_pos
        slots = torch.arange(p - w, p, device=self.k.device).remainder(w)
        valid = self.ring_valid[:, slots] & (torch.arange(p - w, p, device=self.k.device) >= 0)
        return (self.k[:, :, slots], self.v[:, :, slots], valid, self.ring_keep[:, :, slots],
                self.ring_gate[:, :, slots])

    # ------------------------------------------------------------------------------------------ reading

    def sequence(self, k: Tensor, v: Tensor, keep: Tensor, gate: Tensor | None, valid: Tensor) -> tuple[Tensor, ...]:
        """[the ring in position order | T new tokens] (positions next_pos - w .. next_pos + T - 1): k, v
        (E, B, w + T, d), valid (B, w + T), keep (E, B, w + T) (real tokens only), gate (E, B, w + T)."""
        rk, rv, rvalid, rkeep, rgate = self.ring_sequence()
        gate = torch.ones_like(keep, dtype=k.dtype) if gate is None else gate.to(k.dtype)
        seq_valid = torch.cat((rvalid, valid), 1)
        return (torch.cat((rk, k), 2), torch.cat((rv, v), 2), seq_valid, torch.cat((rkeep, keep), 2) & seq_valid[None],
                torch.cat((rgate, gate), 2))

    def far(self, origin: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The far rows: k, v (E, B, n, d) (values gated), positions relative to ``origin`` and rows in use
        (E, B, n)."""
        w, n = self.window, self.far_rows
        held = torch.arange(n, device=self.k.device) < self.count[..., None]
        return self.k[:, :, w: w + n], self.v[:, :, w: w + n], self.far_pos[:, :, :n] - origin, held

    def step_rows(self) -> tuple[Tensor, ...]:
        """What the newest token's query reads: k, v (E, B, w + n, d) (ring slots, then far rows), ring_valid
        (B, w), far positions and rows in use (E, B, n), the query's cache position."""
        n = self.far_rows
        _, _, far_pos, held = self.far()
        return (self.k[:, :, :self.window + n], self.v[:, :, :self.window + n], self.ring_valid, far_pos, held,
                self.next_pos - 1)
