"""Key-selection attention on CPU through PyTorch's fused flash kernel (``aten._scaled_dot_product_flash_attention_
for_cpu``, the kernel behind CPU ``scaled_dot_product_attention``), forward and backward.

Every call works on the blocked layout of keys.py: queries in blocks of c, the unit's G query heads folded into
a block's c·G rows (K/V are never copied per head), and three parts, each one kernel call per chunk of blocks:

* **band**: each block against its c + w - 1 keys, read as overlapping views of the padded K/V (no copy);
  blocks from n0 on share one (c·G, L) mask, the first n0 blocks (keys before the sequence, padding) get
  per-row masks (keys.partial_blocks);
* **far, whole**: far keys every query of the block sees (position <= the block's first query - w), one mask
  row per block broadcast over its rows; chunks of blocks read only the far keys their blocks can see;
* **far, partial**: the few far keys that become visible inside the block (at 1/64 routing, about one per
  block of 64), gathered per block with a per-row mask.

The parts' softmaxes merge by their log-sum-exps (o = lerp(o₁, o₂, exp(lse₂ - lse)), one pass). The backward is
the kernel's own backward on each part, given the *merged* output and log-sum-exp: its probabilities are then
the merged softmax's, and the gradients are exactly those of one softmax over all the keys.

Shape legend as in keys.py; F = B·E, P far keys that are partial in some block, m far keys a chunk reads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocks import (
    FarKeys,
    Layout,
    additive,
    band_allowed,
    band_view,
    blocked_queries,
    fold_band,
    layout,
    padded_keys,
    partial_band_mask,
    partial_blocks,
    unblocked,
)

FAR_CHUNK = 1024  # queries per far-key call: a chunk reads the far keys its blocks can see, not all M
FAR_BLOCK = 256  # queries per far block (whole / partial far keys are decided per far block)


def flash_key_selection(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, far: FarKeys | None,
                        key_valid: Tensor | None, reach: int | None, block: int) -> Tensor:
    """See keys.key_selection_attention. Returns (B, T, H, d)."""
    r = max(1, min(FAR_BLOCK // block, -(-q.shape[2] // block))) if far is not None else 1
    lay = layout(q, k, window, block, r)
    plan = _Plan(lay, r, far, key_valid, reach, scale, q.device, q.dtype)
    tensors = (q, k, v) if far is None else (q, k, v, far.k, far.v)
    return unblocked(_KeySelection.apply(plan, *tensors), lay)  # (B, T, H, d)


class _Plan:
    """Everything but the differentiable tensors: layout, masks, chunks, gathers (built once per call)."""

    def __init__(self, lay: Layout, r: int, far: FarKeys | None, key_valid: Tensor | None, reach: int | None,
                 scale: float, device, dtype):
        self.lay, self.scale = lay, scale
        G, N, c, w = lay.G, lay.N, lay.c, lay.w
        F_ = lay.B * lay.E
        self.band_mask = additive(band_allowed(lay, device), dtype).repeat_interleave(G, 0)  # (c·G, L)
        self.n0 = partial_blocks(lay, key_valid, device)
        self.partial_mask = None
        if self.n0:
            m = partial_band_mask(lay, self.n0, key_valid, device)  # (B | 1, n0, c, L)
            m = additive(m, dtype).repeat_interleave(G, 2)  # (B | 1, n0, c·G, L)
            self.partial_mask = m[:, None].expand(lay.B, lay.E, *m.shape[1:]).reshape(F_, *m.shape[1:])
        self.chunks, self.few, self.r = [], None, 1
        if far is None:
            return
        M = far.pos.shape[-1]
        self.r = r  # band blocks per far block (layout() made N a multiple of r)
        N, c = N // r, c * r  # from here on: far blocks
        pos = far.pos.reshape(F_, 1, M)
        valid = far.valid.reshape(F_, 1, M) if far.valid is not None else torch.ones_like(pos, dtype=torch.bool)
        first = (torch.arange(N, device=device) * c)[None, :, None]  # (1, N, 1) first query of each far block
        last = first + c - 1
        reach_ = reach if reach is not None else 1 << 62
        all_see = valid & (first - pos >= w) & (last - pos < reach_)  # (F, N, M) seen by every query of the block
        some_see = valid & (last - pos >= w) & (first - pos < reach_)
        few = some_see & ~all_see  # (F, N, M) seen by some
        # whole: chunks of blocks, each reading the far keys [lo, hi) that any of its blocks sees whole
        per = max(1, FAR_CHUNK // c)  # far blocks per chunk
        idx = torch.arange(M, device=device)
        for n_a in range(0, N, per):
            n_b = min(n_a + per, N)
            seen = all_see[:, n_a:n_b].any(1).any(0)  # (M,)
            if bool(seen.any()):
                lo, hi = int(idx[seen].min()), int(idx[seen].max()) + 1
                self.chunks.append((n_a, n_b, lo, hi))
        self.whole_mask = additive(all_see, dtype)[:, :, None, :]  # (F, N, 1, M): broadcast over the rows
        self.whole_seen = all_see.any(-1)  # (F, N)
        # partial: per block the P far keys only some of its queries see, gathered, with per-row masks
        P = int(few.sum(-1).max())
        if P:
            order = torch.argsort((~few).to(torch.int8), dim=-1, stable=True)[..., :P]  # (F, N, P) those first
            live = few.gather(-1, order)
            fpos = pos.expand(F_, N, M).gather(-1, order)  # (F, N, P)
            t = (first + torch.arange(c, device=device).view(1, 1, c)).view(1, N, c, 1)  # query positions
            dist = t - fpos[:, :, None, :]  # (F, N, c, P)
            ok = live[:, :, None, :] & (dist >= w) & (dist < reach_)
            self.few = order  # (F, N, P)
            self.few_mask = additive(ok, dtype).repeat_interleave(G, 2)  # (F, N, c·G, P)
            self.few_seen = ok.any(-1).repeat_interleave(G, 2)  # (F, N, c·G)


def _flash(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                      scale=scale)


def _flash_backward(do, q, k, v, o, lse, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, False,
                                                                               attn_mask=mask, scale=scale)


def _merge_(o: Tensor, lse: Tensor, o2: Tensor, lse2: Tensor) -> None:
    """In place: (o, lse) <- the softmax over both parts' keys (lse2 = -inf where part 2 saw no key)."""
    total = torch.logaddexp(lse, lse2)
    o.lerp_(o2, (lse2 - total).exp_().unsqueeze(-1).to(o.dtype))
    lse.copy_(total)


def _far_blocks(t: Tensor, plan: _Plan) -> Tensor:
    """(F, N, c·G, ...) -> (F, N / r, r·c·G, ...): a view, r consecutive band blocks as one far block."""
    return t.view(t.shape[0], t.shape[1] // plan.r, t.shape[2] * plan.r, *t.shape[3:])


def _far_kv(far_k: Tensor, lay: Layout) -> Tensor:
    return far_k.reshape(lay.B * lay.E, 1, -1, lay.d)  # (F, 1, M, d)


class _KeySelection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, far_k=None, far_v=None):
        lay, scale, n0 = plan.lay, plan.scale, plan.n0
        qb = blocked_queries(q, lay)  # (F, N, c·G, d)
        kp, vp = padded_keys(k, lay), padded_keys(v, lay)
        kb, vb = band_view(kp, lay), band_view(vp, lay)  # (F, N, L, d) views
        o = torch.empty_like(qb)
        lse = qb.new_empty(qb.shape[:3], dtype=torch.float32)
        if n0:
            o[:, :n0], lse[:, :n0] = _flash(qb[:, :n0], kb[:, :n0], vb[:, :n0], plan.partial_mask, scale)
        if n0 < lay.N:
            o[:, n0:], lse[:, n0:] = _flash(qb[:, n0:], kb[:, n0:], vb[:, n0:], plan.band_mask, scale)
        if far_k is not None:
            fk, fv = _far_kv(far_k, lay), _far_kv(far_v, lay)
            qf, of_, lf_ = (_far_blocks(t, plan) for t in (qb, o, lse))  # views: r band blocks per far block
            if plan.chunks:
                ow = torch.zeros_like(qf)
                lw = torch.full_like(lf_, -math.inf)
                for n_a, n_b, lo, hi in plan.chunks:
                    nb, m = n_b - n_a, hi - lo
                    ow[:, n_a:n_b], lw[:, n_a:n_b] = _flash(
                        qf[:, n_a:n_b], fk[:, :, lo:hi].expand(-1, nb, m, -1), fv[:, :, lo:hi].expand(-1, nb, m, -1),
                        plan.whole_mask[:, n_a:n_b, :, lo:hi].expand(-1, nb, qf.shape[2], m), scale)
                lw.masked_fill_(~plan.whole_seen[..., None], -math.inf)  # the kernel's lse is 0 on empty rows
                _merge_(of_, lf_, ow, lw)
            if plan.few is not None:
                o2, l2 = _flash(qf, *_few_kv(fk, fv, plan), plan.few_mask, scale)
                _merge_(of_, lf_, o2, l2.masked_fill_(~plan.few_seen, -math.inf))
        ctx.plan = plan
        ctx.save_for_backward(qb, kp, vp, o, lse, far_k, far_v)
        return o

    @staticmethod
    def backward(ctx, do):
        plan = ctx.plan
        lay, scale, n0 = plan.lay, plan.scale, plan.n0
        qb, kp, vp, o, lse, far_k, far_v = ctx.saved_tensors
        do = do.contiguous()
        kb, vb = band_view(kp, lay), band_view(vp, lay)
        dq = torch.empty_like(qb)
        dkb, dvb = qb.new_empty(kb.shape), qb.new_empty(vb.shape)
        if n0:
            dq[:, :n0], dkb[:, :n0], dvb[:, :n0] = _flash_backward(
                do[:, :n0], qb[:, :n0], kb[:, :n0], vb[:, :n0], o[:, :n0], lse[:, :n0], plan.partial_mask, scale)
        if n0 < lay.N:
            dq[:, n0:], dkb[:, n0:], dvb[:, n0:] = _flash_backward(
                do[:, n0:], qb[:, n0:], kb[:, n0:], vb[:, n0:], o[:, n0:], lse[:, n0:], plan.band_mask, scale)
        dfk = dfv = None
        if far_k is not None:
            fk, fv = _far_kv(far_k, lay), _far_kv(far_v, lay)
            dfk, dfv = torch.zeros_like(fk), torch.zeros_like(fv)  # (F, 1, M, d)
            qf, dof, of_, lf_, dqf = (_far_blocks(t, plan) for t in (qb, do, o, lse, dq))
            for n_a, n_b, lo, hi in plan.chunks:
                nb, m = n_b - n_a, hi - lo
                gq, gk, gv = _flash_backward(
                    dof[:, n_a:n_b], qf[:, n_a:n_b], fk[:, :, lo:hi].expand(-1, nb, m, -1),
                    fv[:, :, lo:hi].expand(-1, nb, m, -1), of_[:, n_a:n_b], lf_[:, n_a:n_b],
                    plan.whole_mask[:, n_a:n_b, :, lo:hi].expand(-1, nb, qf.shape[2], m), scale)
                dqf[:, n_a:n_b] += gq
                dfk[:, :, lo:hi] += gk.sum(1, keepdim=True)
                dfv[:, :, lo:hi] += gv.sum(1, keepdim=True)
            if plan.few is not None:
                gq, gk, gv = _flash_backward(dof, qf, *_few_kv(fk, fv, plan), of_, lf_, plan.few_mask, scale)
                dqf += gq
                at = plan.few[..., None].expand(*plan.few.shape, lay.d).flatten(1, 2)  # (F, N·P, d)
                dfk[:, 0].scatter_add_(1, at, gk.flatten(1, 2))
                dfv[:, 0].scatter_add_(1, at, gv.flatten(1, 2))
            dfk, dfv = dfk.view_as(far_k), dfv.view_as(far_v)
        B, E, G, T, d = lay.B, lay.E, lay.G, lay.T, lay.d
        gq = dq.view(B, E, lay.Tp, G, d)[:, :, :T].transpose(2, 3).reshape(B, E * G, T, d)
        gk = fold_band(dkb, lay).view(B, E, T, d)
        gv = fold_band(dvb, lay).view(B, E, T, d)
        return None, gq, gk, gv, dfk, dfv


def _few_kv(fk: Tensor, fv: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """(F, N, P, d) keys and values of each block's partially visible far keys."""
    F_, N, P = plan.few.shape
    at = plan.few.reshape(F_, N * P, 1).expand(F_, N * P, fk.shape[-1])
    return fk[:, 0].gather(1, at).view(F_, N, P, -1), fv[:, 0].gather(1, at).view(F_, N, P, -1)
