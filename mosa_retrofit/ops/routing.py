"""Routing: router logits, which tokens each unit selects (expert choice or causal thresholds), the gate of a
selected token, and the thresholds causal routing compares against. One function per rule, called by every
path: full forwards (sparse.py, the windowed heads), the cached step (convert/cache.py), calibration.

Shape legend: E routed units, B batch, T tokens, h model width, K selected tokens per unit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def router_logits(router: Tensor, x: Tensor) -> Tensor:
    """(E, B, T) logits of every unit's router (E, h) on x (B, T, h)."""
    B, T, h = x.shape
    return torch.matmul(router, x.reshape(B * T, h).t()).view(router.shape[0], B, T)


def first_real(valid: Tensor | None, seen_real: Tensor | None = None, shape: tuple[int, int] | None = None,
               device=None) -> Tensor:
    """(B, T) bool: the row's first real token, if it is among these T (``seen_real`` (B,): real tokens the
    row had before them; ``valid`` (B, T): real tokens, None for all)."""
    if valid is None:
        valid = torch.ones(shape, dtype=torch.bool, device=device)
    index = valid.long().cumsum(-1)  # (B, T) 1-based index among the row's real tokens
    if seen_real is not None:
        index = index + seen_real[:, None]
    return valid & (index == 1)


def causal_select(logits: Tensor, threshold: Tensor, valid: Tensor | None, first: Tensor | None) -> Tensor:
    """(E, B, T) bool: causal routing selects token t iff its logit exceeds the unit's threshold (a real token),
    or it is the row's first real token (``first``, when the first token is always selected)."""
    chosen = logits.detach() > threshold.view(-1, 1, 1).to(logits.dtype)
    if valid is not None:
        chosen = chosen & valid
    return chosen | first if first is not None else chosen


def tokens_per_head(n_tokens: int, sparsity: float) -> int:
    """K = min(max(T // sparsity, 2), T): the paper's k = T/ρ, at least 2 (short inputs), at most T."""
    return min(max(int(n_tokens // sparsity), 2), n_tokens)


class Selection(NamedTuple):
    idx: Tensor  # (E, B, K) token indices, ascending along K
    live: Tensor | None  # (E, B, K) bool; False marks a dead slot (sorted last); None when all are live


def select_tokens(
    logits: Tensor, sparsity: float, include_first: bool = False, valid: Tensor | None = None
) -> Selection:
    """Expert-choice top-K over the sequence, per unit and row.

    Args:
        logits: (E, B, T) router logits (only their order matters; no gradient flows through here).
        sparsity: ρ; each unit keeps K = min(max(n // ρ, 2), n) of the row's n real tokens.
        include_first: always keep the row's first real token; the other K-1 are top-scored.
        valid: (B, T) bool, False for padding. A padded token is never selected. Rows with fewer real
            tokens than others get a smaller K (the same K they would get unpadded); their spare slots
            are *dead*: sorted after every live slot, so under the causal mask no live query sees them.
    """
    E, B, T = logits.shape
    scores = logits.detach()
    if valid is None:
        K = tokens_per_head(T, sparsity)
        if include_first:
            scores = scores.clone()
            scores[..., 0] = math.inf
        idx = scores.topk(K, dim=-1, sorted=False).indices.sort(dim=-1).values  # (E, B, K)
        return Selection(idx, None)

    n_real = valid.sum(-1).tolist()
    ks = [tokens_per_head(n, sparsity) if n > 0 else 0 for n in n_real]
    K = max(ks)
    scores = scores.masked_fill(~valid, -math.inf)
    if include_first:
        first = valid.int().argmax(-1)  # (B,) first real token of each row
        scores = scores.scatter(-1, first.view(1, B, 1).expand(E, B, 1), math.inf)
    top = scores.topk(K, dim=-1, sorted=True).indices  # (E, B, K) best first
    k_row = torch.tensor(ks, device=logits.device)
    dead = torch.arange(K, device=logits.device) >= k_row[:, None]  # (B, K) slots past the row's K
    if not dead.any():
        return Selection(top.sort(dim=-1).values, None)
    key = (top + T * dead).sort(dim=-1).values  # dead slots sort after all live ones
    return Selection(key.remainder(T), key < T)


def select_tokens_causal(
    logits: Tensor, threshold: Tensor, include_first: bool = False, valid: Tensor | None = None,
    first: Tensor | None = None,
) -> Selection:
    """Causal routing: unit e selects token t iff its router logit exceeds the unit's threshold.

    Whether t is selected depends on x_t alone (and on whether t is the row's first real token), never on
    other tokens, so prefill + token-by-token decoding selects exactly what a full forward selects.
    The number of selected tokens varies per unit and row; K is the largest, shorter rows get dead slots
    (sorted after every live slot, as in :func:`select_tokens`).

    Args:
        logits: (E, B, T) router logits. threshold: (E,) per-unit thresholds (-inf selects everything).
        include_first: always select the row's first real token. valid: (B, T) bool, False for padding.
        first: (B, T) bool marking first real tokens (default: the first True of ``valid`` per row).
    """
    E, B, T = logits.shape
    if include_first and first is None:
        first = first_real(valid, shape=(B, T), device=logits.device)
    chosen = causal_select(logits, threshold, valid, first if include_first else None)  # (E, B, T)
    idx, live = kept_first(chosen)  # (E, B, K)
    return Selection(idx, None if bool(live.all()) else live)


def kept_first(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Where each row of ``keep`` (..., S) bool is True, in position order, first: positions (..., M) and
    ``live`` (..., M), False at the slots after a row's last kept position (M: the most any row keeps)."""
    S = keep.shape[-1]
    M = int(keep.sum(-1).max()) if keep.numel() else 0
    pos = torch.arange(S, device=keep.device)
    key = torch.where(keep, pos, pos + S).sort(dim=-1).values[..., :M]  # kept positions first, in order
    return key.remainder(S), key < S


def router_gates(selected_logits: Tensor, router_score: str) -> Tensor:
    """Multiplier for each selected output row.

    ``sigmoid``: σ(logit), the paper's scaling. ``straight_through``: exactly 1.0 in the forward pass,
    with the gradient of σ/σ.detach() (computed as exp(logσ - logσ.detach()), which cannot divide by 0),
    so a converted model starts function-preserving while the router still learns.
    """
    if router_score == "sigmoid":
        return torch.sigmoid(selected_logits)
    if router_score == "straight_through":
        log_s = F.logsigmoid(selected_logits)
        return torch.exp(log_s - log_s.detach())
    raise ValueError(f"router_score must be one of ('sigmoid', 'straight_through'), got {router_score!r}")


def logit_quantile(router: Tensor, x: Tensor, valid: Tensor | None, sparsity: float, include_first: bool) -> Tensor:
    """(E,) (1 - 1/sparsity) quantile of each unit's router logits over the real tokens of x (B, T, h)."""
    return threshold_of(budget_logits(router, x, valid, include_first), sparsity)


def budget_logits(router: Tensor, x: Tensor, valid: Tensor | None, include_first: bool) -> Tensor:
    """(n, E) fp32 router logits of the tokens that count against the routing budget: the real tokens of x
    (B, T, h), the first of each row left out when it is always selected. Pooled over micro-batches and
    processes, they give the threshold of the whole batch (``threshold_of``)."""
    B, T, h = x.shape
    logits = (x.reshape(B * T, h).float() @ router.float().t())  # (B·T, E)
    keep = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid.clone()
    if include_first:  # the first token is always selected: it does not count against the budget
        keep = keep & (keep.int().cumsum(-1) > 1)
    return logits[keep.reshape(-1)]


def threshold_of(logits: Tensor, sparsity: float) -> Tensor:
    """(E,) the threshold that passes 1/sparsity of ``logits`` (n, E) per unit (NaN where n = 0)."""
    if logits.shape[0] == 0:
        return torch.full((logits.shape[1],), float("nan"), device=logits.device)
    n = logits.shape[0]
    k = min(max(int(round(n / sparsity)), 1), n)  # tokens to pass
    v = logits.sort(dim=0, descending=True).values  # (n, E)
    # halfway between the k-th largest logit and the next smaller distinct one: no calibration logit sits on
    # the threshold (repeated tokens give equal logits in the first layer), so float noise from another
    # kernel or batch shape cannot flip a token seen in calibration
    above = v[k - 1]  # (E,)
    smaller = v[k:] < above  # (n-k, E), descending: the first True is the next smaller distinct value
    if smaller.shape[0] == 0:
        return above - 1.0
    first = smaller.int().argmax(0)  # (E,)
    below = v[k:].gather(0, first[None])[0]
    return torch.where(smaller.any(0), (above + below) / 2, above - 1.0)
