"""The K/V a windowed head group keeps between forwards (streaming and key-selection MoSA heads), and the cached
attention step that reads it.

A query at position p of such a group sees the first ``sinks`` real tokens of its row and, for key-selection
heads, every token its unit routed (the *far* keys, values gated by the router, once they lie ``window`` or more
before it), plus its last ``window`` tokens (p - window < position <= p). So the store keeps, per unit and row:

* a **ring** of the last ``window`` cache positions (slot = position % window): K, V, whether the slot holds a
  real token, whether its token is kept (sink or routed) and its gate;
* an append-only list of **far rows**: when a kept token leaves the ring it is appended (its value gated); a far
  row is never moved again.

A decode step touches one ring slot, appends at most one far row per unit and row, and runs one attention call
for all units over [ring | far rows] of one buffer. Bytes held: (window + sinks + routed) rows per unit,
against T rows per KV head of the original cache.

Positions are cache positions (the index of a token among all tokens the layer has seen, padding included),
so distances match what a full forward over the padded row computes.

Shape legend: E units, B batch, G query heads per unit, T new tokens, w window (ring slots), C far capacity,
n far rows held (max over units and rows), d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.keys import FarKeys, key_selection_attention
from ..ops.masks import key_visible


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
        rk, rv, rvalid, rkeep, rgate = self.ring_sequence()
        seq_k, seq_v = torch.cat((rk, k), 2), torch.cat((rv, v), 2)  # (E, B, w + T, d)
        seq_valid = torch.cat((rvalid, valid), 1)  # (B, w + T)
        seq_keep = torch.cat((rkeep, keep), 2) & seq_valid[None]  # (E, B, w + T)
        seq_gate = torch.cat((rgate, gate), 2)
        leaving = seq_keep[:, :, :T]  # (E, B, T): positions p - w .. p - w + T - 1
        n = int(leaving.sum(-1).max())
        if n:
            self._reserve(n)
            order = torch.argsort((~leaving).to(torch.int8), dim=-1, stable=True)[..., :n]  # kept first, in order
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

    def attend_step(self, q: Tensor, scale: float) -> Tensor:
        """One new query per row (already absorbed at position next_pos - 1): q (B, E·G, 1, d) against [ring | far
        rows], one attention call for all units. Returns (B, 1, E·G·d)."""
        E, B, _, d = self.k.shape
        H = q.shape[1]
        G = H // E
        w, p = self.window, self.next_pos - 1
        n = self.far_rows
        slot = p % w
        ring_ok = self.ring_valid
        if not bool(ring_ok[:, slot].all()):  # a padded query still sees itself
            ring_ok = ring_ok.clone()
            ring_ok[:, slot] = True
        ok = ring_ok[None].expand(E, B, w)
        if n:
            held = torch.arange(n, device=q.device) < self.count[..., None]  # (E, B, n)
            far_ok = key_visible(p - self.far_pos[:, :, :n], w, held, self.reach)  # far rows lie >= w before p
            ok = torch.cat((ok, far_ok), dim=-1)
        L = w + n
        qe = q.view(B, E, G, 1, d).transpose(0, 1).reshape(E * B, G, 1, d)
        kv = lambda t: t[:, :, :L].reshape(E * B, 1, L, d).expand(E * B, G, L, d)
        a = F.scaled_dot_product_attention(qe, kv(self.k), kv(self.v), attn_mask=ok.reshape(E * B, 1, 1, L),
                                           scale=scale)  # (E·B, G, 1, d)
        return a.view(E, B, G, d).transpose(0, 1).reshape(B, 1, E * G * d)

    def attend_chunk(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, gate: Tensor | None, valid: Tensor,
                     scale: float, backend: str) -> Tensor:
        """T > 1 new tokens after earlier ones (before ``absorb``): the key-selection kernel over [ring | new] with
        the far rows and the kept rows of that sequence as far keys. q (B, E·G, T, d), k, v (E, B, T, d).
        Returns (B, T, E·G·d)."""
        E, B, T, d = k.shape
        H = q.shape[1]
        w, p = self.window, self.next_pos
        rk, rv, rvalid, rkeep, rgate = self.ring_sequence()
        gate = torch.ones_like(keep, dtype=k.dtype) if gate is None else gate.to(k.dtype)
        seq_k, seq_v = torch.cat((rk, k), 2), torch.cat((rv, v), 2)  # (E, B, w + T, d), positions p - w ..
        seq_valid = torch.cat((rvalid, valid), 1)
        seq_keep = torch.cat((rkeep, keep), 2) & seq_valid[None]
        seq_gate = torch.cat((rgate, gate), 2)
        # far keys: the far rows, then the sequence's kept rows, positions relative to the sequence start
        n, S = self.far_rows, w + T
        M = int(seq_keep.sum(-1).max())
        rel = torch.arange(S, device=k.device)
        key = torch.where(seq_keep, rel, rel + S).sort(dim=-1).values[..., :M]  # (E, B, M) kept first
        idx, live = key.remainder(S), key < S
        at = idx[..., None].expand(E, B, M, d)
        far_k = torch.cat((self.k[:, :, w: w + n], seq_k.gather(2, at)), 2)
        far_v = torch.cat((self.v[:, :, w: w + n], seq_v.gather(2, at) * seq_gate.gather(2, idx)[..., None]), 2)
        far_pos = torch.cat((self.far_pos[:, :, :n] - (p - w), idx), 2)
        far_ok = torch.cat((torch.arange(n, device=k.device) < self.count[..., None], live), 2)
        far = FarKeys(*(t.transpose(0, 1) for t in (far_k, far_v, far_pos, far_ok)))
        qs = torch.cat((q.new_zeros(B, H, w, d), q), 2)  # the ring's positions ask nothing
        a = key_selection_attention(qs, seq_k.transpose(0, 1), seq_v.transpose(0, 1), w, scale, far,
                                    seq_valid, self.reach, 0.0, backend)  # (B, S, H, d)
        return a[:, w:].reshape(B, T, H * d)
