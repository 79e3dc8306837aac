"""Router warm-up objective: teach every router which tokens its head's *dense* attention relies on.

For MoSA unit e (a head, or a KV group sharing one router) on a sequence, the target is the attention mass
each token t receives from the unit's heads run densely with the frozen original weights,

    m_e(t) = Σ_{heads h of e} Σ_{queries i ≥ t} A_h[i, t],      p_e(t) = m_e(t) / Σ_t' m_e(t'),

and the loss is  KL(p_e ‖ softmax_t(x_t · w_e)),  averaged over units, sequences and layers. Only the ranking
of the router logits matters to top-k selection, and the softmax cross-entropy rewards putting the highest
logits on the tokens of largest mass. Padded tokens are excluded, and so is token 0 when ``include_first``
(it is always selected). The layer input x is detached: each router learns from its own layer only, and
the forward of the model itself runs without autograd.

Shape legend: B batch, T tokens, D width, n MoSA query heads of the layer, E units, G heads per unit, d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..convert.families import HeadWeights, head_to_kv
from ..ops.masks import key_padding
from ..ops.rope import apply_rope
from ..ops.sparse import softcap_logits


def gathered(param: Tensor) -> Tensor:
    """``param`` whole: a sharded DTensor is gathered, its gradient going back to the shards as a sum over
    processes (``Partial``); any other tensor as it is."""
    from torch.distributed.tensor import DTensor, Partial

    return param.full_tensor(grad_placements=[Partial()]) if isinstance(param, DTensor) else param


def attention_mass(module: nn.Module, x: Tensor, W: HeadWeights, mask, cos, sin) -> tuple[Tensor, Tensor]:
    """Received dense-attention mass per MoSA unit (B, E, T) and the valid-token mask (B, T)."""
    fam, plan = module.mosa_family, module.mosa_plan
    B, T, D = x.shape
    heads = torch.tensor(plan.mosa, device=x.device)  # (n,)
    kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
    kv = torch.tensor([kv_of[h] for h in plan.mosa], device=x.device)  # (n,) K/V head of every query head
    q = torch.einsum("btD,ncD->bntc", x, W.wq[heads])  # (B, n, T, d)
    k = torch.einsum("btD,ncD->bntc", x, W.wk[kv])
    if W.bq is not None:
        q = q + W.bq[heads][None, :, None]
    if W.bk is not None:
        k = k + W.bk[kv][None, :, None]
    q = q * fam.query_prescale(module)
    q_norm, k_norm = fam.norms(module)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if cos is not None:
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * fam.scaling(module)  # (B, n, T, T)
    cap = fam.softcap(module)
    if cap is not None:
        s = softcap_logits(s, cap)
    i = torch.arange(T, device=x.device)
    allowed = i[None, :] <= i[:, None]  # (T, T) query i sees key j <= i
    window = fam.sliding_window(module)
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    valid = key_padding(mask, T)
    valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid  # (B, T)
    allowed = allowed[None] & valid[:, None, :]  # (B, T, T)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)[None]  # no empty rows
    probs = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)  # (B, n, T, T)
    probs = probs * valid[:, None, :, None]  # padded queries give nothing
    mass = probs.sum(-2)  # (B, n, T)
    G = plan.heads_per_unit
    return mass.view(B, -1, G, T).sum(2), valid  # (B, E, T), (B, T)


def router_warmup_loss(router: Tensor, x: Tensor, mass: Tensor, valid: Tensor, include_first: bool) -> Tensor:
    """KL(p ‖ softmax(router logits)) over the tokens, mean over units and sequences."""
    logits = torch.einsum("btD,eD->bet", x.float(), router.float())  # (B, E, T)
    keep = valid.clone()
    if include_first:
        keep[:, 0] = False
    keep = keep[:, None, :]  # (B, 1, T)
    p = (mass * keep).clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    logq = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), torch.zeros_like(p)).sum(-1)  # (B, E)
    return kl.mean()


class RouterWarmup:
    """Installs the warm-up observer on every converted layer and collects the per-layer losses."""

    def __init__(self, layers: dict[int, nn.Module]):
        baseline = sorted(i for i, m in layers.items() if m.mosa_plan.config.sparse_heads != "mosa")
        if baseline:
            raise ValueError(f"router warm-up needs MoSA heads of the paper's form (sparse_heads='mosa'), but layers "
                             f"{baseline} have sparse_heads={layers[baseline[0]].mosa_plan.config.sparse_heads!r}")
        self.layers = layers
        self.seen: list[tuple[nn.Module, Tensor, Tensor, Tensor]] = []

    def _observe(self, module, x, W, mask, cos, sin) -> None:
        with torch.no_grad():
            mass, valid = attention_mass(module, x.detach(), W, mask, cos, sin)
        self.seen.append((module, x.detach(), mass, valid))  # the loss is taken after the forward (pop_loss)

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
            losses = [router_warmup_loss(gathered(m.mosa_router), x, mass, valid, m.mosa_plan.config.include_first)
                      for m, x, mass, valid in self.seen]
        self.seen = []
        return torch.stack(losses).mean()
