"""Router warm-up objective: teach every router which tokens its head's *dense* attention relies on.

For MoSA unit e (a head, or a KV group sharing one router) on a sequence, the target is the attention mass
each token t receives from the unit's heads run densely with the frozen original weights,

    m_e(t) = Σ_{heads h of e} Σ_{queries i ≥ t} A_h[i, t],      p_e(t) = m_e(t) / Σ_t' m_e(t'),

and the loss is  KL(p_e ‖ softmax_t(x_t · w_e)),  averaged over units, sequences and layers. Only the ranking
of the router logits matters to top-k selection, and the softmax cross-entropy rewards putting the highest
logits on the tokens of largest mass. Padded tokens are excluded, and so is token 0 when ``include_first``
(it is always selected).

Key-selection units (``mosa_keys``: every query sees its last w tokens and the sinks anyway) need their routers
only for the tokens a query reaches from beyond its window, so their target is the *far* mass: the mean
attention token t receives from the queries i ≥ t + w,

    m_e(t) = Σ_{heads h of e} Σ_{i ≥ t + w} A_h[i, t] / #{i ≥ t + w},

over the tokens that have such queries and are not sinks (the calibrated router's target, calibration.py,
here at the training length instead of 512 tokens), estimated from FAR_QUERIES evenly spaced queries. The layer input x is detached: each router learns from its own layer only, and
the forward of the model itself runs without autograd.

With ``answer_weight`` > 0 and training blocks that hold keys and ask for them (``data.needles``), each unit's
loss adds that weight times the same KL toward the far mass from the queries that predict the answers alone:
what a retrieval query reaches for from beyond the window (the key sentence), which the mean over hundreds of
queries hides. A router learns to pass a token only from such a target: the straight-through gate gives
gradient to tokens already passed, never to one the threshold keeps out.

Shape legend: B batch, T tokens, D width, n MoSA query heads of the layer, E units, G heads per unit, d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..convert.families import HeadWeights, head_to_kv
from ..kinds import kinds
from ..ops.masks import key_padding
from ..ops.rope import apply_rope
from ..ops.sparse import softcap_logits


def gathered(param: Tensor) -> Tensor:
    """``param`` whole: a sharded DTensor is gathered, its gradient going back to the shards as a sum over
    processes (``Partial``); any other tensor as it is."""
    from torch.distributed.tensor import DTensor, Partial

    return param.full_tensor(grad_placements=[Partial()]) if isinstance(param, DTensor) else param


FAR_QUERIES = 512
"""Queries, evenly spaced, from which a key-selection unit's far target is averaged (all of them in rows up to
this long): the mean attention from beyond the window is well estimated from a few hundred queries, and a
4,096-token row then costs 1/8 of the full attention matrix."""


def attention_mass(module: nn.Module, x: Tensor, W: HeadWeights, mask, cos, sin, far: int = 0,
                   queries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Received dense-attention mass per MoSA unit (B, E, T) and the valid-token mask (B, T). With ``far`` > 0
    only queries at least ``far`` tokens after the key count, and the mass is their mean (0 without any), taken
    over every ``ceil(T / FAR_QUERIES)``-th query (the last one included), or over the ``queries`` (B, T) bool
    of each row."""
    fam, plan = module.mosa_family, module.mosa_plan
    B, T, D = x.shape
    heads = torch.tensor(plan.mosa, device=x.device)  # (n,)
    kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
    kv = torch.tensor([kv_of[h] for h in plan.mosa], device=x.device)  # (n,) K/V head of every query head
    i = torch.arange(T, device=x.device)
    stride = -(-T // FAR_QUERIES)  # ceil
    if queries is not None:  # the positions any row asks from; each row counts its own
        rows = queries.any(0).nonzero().flatten()  # (Q,)
    else:
        rows = i if far == 0 else torch.arange(T - 1, -1, -stride, device=x.device).flip(0)  # (Q,) queries that count
    q = torch.einsum("btD,ncD->bntc", x[:, rows], W.wq[heads])  # (B, n, Q, d)
    k = torch.einsum("btD,ncD->bntc", x, W.wk[kv])  # (B, n, T, d)
    if W.bq is not None:
        q = q + W.bq[heads][None, :, None]
    if W.bk is not None:
        k = k + W.bk[kv][None, :, None]
    q = q * fam.query_prescale(module)
    q_norm, k_norm = fam.norms(module)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if cos is not None:
        q = apply_rope(q, cos[:, None, rows], sin[:, None, rows])
        k = apply_rope(k, cos[:, None], sin[:, None])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * fam.scaling(module)  # (B, n, Q, T)
    cap = fam.softcap(module)
    if cap is not None:
        s = softcap_logits(s, cap)
    allowed = i[None, :] <= rows[:, None]  # (Q, T) query i sees key j <= i
    window = fam.sliding_window(module)
    if window is not None:
        allowed = allowed & (rows[:, None] - i[None, :] < window)
    valid = key_padding(mask, T)
    valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid  # (B, T)
    allowed = allowed[None] & valid[:, None, :]  # (B, Q, T)
    allowed = allowed | (rows[:, None] == i[None, :])[None]  # no empty rows
    probs = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)  # (B, n, Q, T)
    counted = valid[:, rows] if queries is None else valid[:, rows] & queries[:, rows]  # (B, Q)
    probs = probs * counted[:, None, :, None]  # padded (or, with ``queries``, other) queries give nothing
    if far > 0:
        reach = (rows[:, None] - i[None, :]) >= far  # (Q, T) query i lies beyond key j's window
        probs = probs * reach
        count = (reach[None] & counted[:, :, None]).sum(1)  # (B, T) far real queries of each key
        mass = probs.sum(-2) / count.clamp_min(1)[:, None]  # (B, n, T) mean far attention
    else:
        mass = probs.sum(-2)  # (B, n, T)
    G = plan.heads_per_unit
    return mass.view(B, -1, G, T).sum(2), valid  # (B, E, T), (B, T)


def warmup_target(module: nn.Module, x: Tensor, W: HeadWeights, mask, cos, sin, queries: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """The routers' target mass (B, E, T) of a converted layer and the tokens it covers (B, T): total mass for
    paper-form units; far mass, without sinks and tokens no query reaches from afar, for key-selection units;
    from the ``queries`` (B, T) bool only, where given (else from all, or evenly spaced ones)."""
    group = next(g for g in module.mosa_groups if g.routed)
    cfg = module.mosa_plan.config
    B, T, _ = x.shape
    far = group.window(module.mosa_family.sliding_window(module)) if group.far_router else 0
    mass, keep = attention_mass(module, x, W, mask, cos, sin, far, queries)
    keep = keep.clone()
    if far > 0:
        index = keep.long().cumsum(-1) - 1  # (B, T) position among the row's real tokens
        last = keep.long().sum(-1, keepdim=True) - 1  # (B, 1) the last real token
        keep &= (index >= cfg.sink_tokens) & (index <= last - far)  # not a sink, reached from beyond a window
    if cfg.include_first:
        keep &= index >= 1 if far > 0 else torch.arange(T, device=x.device)[None] >= 1
    return mass, keep


def router_warmup_loss(router: Tensor, x: Tensor, mass: Tensor, keep: Tensor) -> Tensor:
    """KL(p ‖ softmax(router logits)) over the ``keep`` tokens (B, T), mean over units and sequences (rows
    without a kept token give 0)."""
    logits = torch.einsum("btD,eD->bet", x.float(), router.float())  # (B, E, T)
    keep = keep[:, None, :]  # (B, 1, T)
    p = (mass * keep).clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    logq = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
    logq = torch.where(keep, logq, torch.zeros_like(logq))  # (no -inf where p is 0: finite gradients)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), torch.zeros_like(p)).sum(-1)  # (B, E)
    return kl.mean()


class RouterWarmup:
    """Installs the warm-up observer on every converted layer and collects the per-layer losses."""

    def __init__(self, layers: dict[int, nn.Module], answer_weight: float = 0.0):
        unrouted = sorted(i for i, m in layers.items() if m.mosa_plan.mosa and not any(g.routed for g in m.mosa_groups))
        if unrouted:
            raise ValueError(f"router warm-up needs routed MoSA heads (sparse_heads one of {kinds(routed=True)}), but "
                             f"layers {unrouted} have sparse_heads="
                             f"{layers[unrouted[0]].mosa_plan.config.sparse_heads!r}, which have no router")
        self.layers = layers
        self.answer_weight = answer_weight
        self.answers: Tensor | None = None  # (B, T) bool: the tokens of the next forward that answer (needles)
        self.seen: list[tuple[nn.Module, Tensor, list]] = []

    def _observe(self, module, x, W, mask, cos, sin) -> None:
        x = x.detach()
        targets = []  # (weight, mass, keep): the loss is taken after the forward (pop_loss)
        with torch.no_grad():
            targets.append((1.0, *warmup_target(module, x, W, mask, cos, sin)))
            if self.answer_weight > 0 and self.answers is not None and self.answers.any():
                asking = torch.zeros_like(self.answers)
                asking[:, :-1] = self.answers[:, 1:]  # the positions that predict an answer's tokens
                targets.append((self.answer_weight, *warmup_target(module, x, W, mask, cos, sin, asking)))
        self.seen.append((module, x, targets))

    def __enter__(self) -> RouterWarmup:
        for m in self.layers.values():
            m.mosa_observer = self._observe
        return self

    def __exit__(self, *exc) -> None:
        for m in self.layers.values():
            m.__dict__.pop("mosa_observer", None)

    def pop_loss(self) -> Tensor:
        """Mean of the layer losses of the forwards since the last call (and reset). Taken after the forward,
        from each router as the module holds it then: under FSDP the sharded parameter, gathered here so that
        its gradient is reduce-scattered back into the shards (summed over processes)."""
        if not self.seen:
            raise RuntimeError("no converted layer ran: nothing to warm up")
        with torch.enable_grad():
            losses = []
            for m, x, targets in self.seen:
                router = gathered(m.mosa_router)
                losses.append(sum(w * router_warmup_loss(router, x, mass, keep) for w, mass, keep in targets))
        self.seen = []
        return torch.stack(losses).mean()
