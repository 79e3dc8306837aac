"""The K/V a windowed head group keeps between forwards (streaming and key-selection MoSA heads), and the cached
attention step that reads it.

A query at position p of such a group sees: the first ``sinks`` real tokens of its row, its last ``window``
tokens (p - window < position <= p), and, for key-selection heads, every token its unit routed. So after a
forward the store keeps, per unit and row, exactly the rows a later query can still see: sinks, routed tokens
and the last ``window`` tokens; the rest are dropped. Bytes held: (sinks + window + routed) rows per unit,
against the T rows per KV head of the original cache.

Positions are cache positions (the index of a token among all tokens the layer has seen, padding included),
so distances match what a full forward over the padded row computes.

Shape legend: E units, B batch, T new tokens, L stored rows, d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


class WindowStore:
    """Rows kept for one layer's windowed group: k/v (E, B, L, d), pos (E, B, L), keep (E, B, L) (sinks and
    routed tokens: never dropped), valid (E, B, L) (False: an empty slot)."""

    def __init__(self, window: int, reach: int | None = None):
        self.window, self.reach = window, reach
        self.k = self.v = self.pos = self.keep = self.valid = None

    def rows(self, k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
        """The stored rows followed by these new ones (E, B, T, ...): what this forward's queries read."""
        if self.k is None:
            return k, v, pos, keep, valid
        cat = lambda old, new: torch.cat((old, new), dim=2)
        return cat(self.k, k), cat(self.v, v), cat(self.pos, pos), cat(self.keep, keep), cat(self.valid, valid)

    def retain(self, k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, valid: Tensor, next_pos: int) -> None:
        """Keep the rows a query at ``next_pos`` or later can still see, packed to the front of each unit/row."""
        alive = valid & (keep | (next_pos - pos < self.window))
        if self.reach is not None:
            alive = alive & (next_pos - pos < self.reach)
        L = int(alive.sum(-1).max()) if alive.numel() else 0
        order = (~alive).to(torch.int8).argsort(dim=-1, stable=True)[..., :L]  # alive rows first, in order
        take = lambda t: t.gather(2, order if t.dim() == 3 else order[..., None].expand(*order.shape, t.shape[-1]))
        self.k, self.v, self.pos, self.keep = take(k), take(v), take(pos), take(keep)
        self.valid = take(alive)

    def map(self, fn) -> None:
        """Apply ``fn(tensor, batch_dim)`` to every stored tensor (beam search reorders, batch expansion)."""
        if self.k is not None:
            self.k, self.v, self.pos, self.keep, self.valid = (fn(t, 1) for t in
                                                               (self.k, self.v, self.pos, self.keep, self.valid))

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the K/V rows held, bytes allocated by every tensor of the store)."""
        if self.k is None:
            return 0, 0
        size = lambda t: t.numel() * t.element_size()
        held = int(self.valid.sum()) * self.k.shape[-1] * self.k.element_size() * 2
        return held, sum(size(t) for t in (self.k, self.v, self.pos, self.keep, self.valid))
