"""Calibration: one pass of text through the *original* model to rank heads and initialise routers.

For every attention layer we read the input x_t of the attention module and each head's attention matrix
A (eager attention returns it), and accumulate two things (no backprop, nothing stored per token):

* **coverage** of head h: let S be the k = T // sparsity tokens that receive the most attention from the
  head (column sums of A; the first token always in S when include_first). coverage is the attention mass
  that queries in S place on keys in S, averaged over S: 1 means top-k sparse attention reproduces this
  head's attention exactly for the tokens it processes, 0 that it keeps nothing. ``head_choice='scored'``
  keeps the heads of *lowest* coverage dense.
* **router fit**: a MoSA head should select the tokens its dense attention relies on most. The target is
  z_h(t) = log of the attention mass token t receives from head h, standardised per sequence; the router
  is the ridge regression  w_h = argmin Σ_t (x_t·w - z_h(t))² + λ‖w‖²  (closed form from Σ x xᵀ and
  Σ x z), layer-local and cheap, then rescaled so the logits have unit RMS on the calibration text. A KV
  group that shares one router (router_granularity='kv_group') fits the sum of its heads' targets.
* **mean output** of head h (before the output projection): Σ_t Σ_s A_ts v_s / N = (Σ_t A_t·) V / N, from the
  column sums already at hand and the head's values; ``MoSAConfig(fill='mean')`` starts from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .sparse import tokens_per_head


@dataclass
class LayerStats:
    coverage: Tensor  # (H,) mean over sequences
    xtx: Tensor  # (D, D) Σ x xᵀ
    xtz: Tensor  # (D, H) Σ x z_h
    sequences: int
    out_sum: Tensor | None = None  # (H, d) Σ over tokens of each head's attention output
    xtz_dev: Tensor | None = None  # (D, H) Σ x z'_h: z' = standardised log-norm of what the head adds at t
    energy: Tensor | None = None  # (H,) Σ_t ‖(o_t − mean) W_o‖²: the damage of mean-ablating the head
    tokens: float = 0.0
    sparsity: float = 0.0  # what coverage was computed for
    include_first: bool = True

    def fit_router(self, heads: list[list[int]], ridge: float = 1e-2, target: str = "mass") -> Tensor:
        """Routers (E, D) for units that each combine the targets of ``heads[e]``."""
        D = self.xtx.shape[0]
        reg = ridge * self.xtx.diagonal().mean() * torch.eye(D, dtype=self.xtx.dtype)
        xtz = {"mass": self.xtz, "deviation": self.xtz_dev, "both": self.xtz + self.xtz_dev}[target]
        z = torch.stack([xtz[:, hs].sum(-1) for hs in heads], dim=1)  # (D, E)
        w = torch.linalg.solve(self.xtx + reg, z)  # (D, E)
        second_moment = torch.einsum("de,df,fe->e", w, self.xtx, w)  # Σ_t (x_t·w)²
        w = w / (second_moment / self.tokens).clamp_min(1e-12).sqrt()  # unit-RMS logits
        return w.t().contiguous()

    def mean_output(self, heads: list[list[int]]) -> Tensor:
        """(E, G·d): the mean attention output of each unit's heads, concatenated (the 'mean' fill)."""
        mean = self.out_sum / self.tokens  # (H, d)
        return torch.stack([mean[hs].reshape(-1) for hs in heads])


def collect_stats(model: nn.Module, input_ids: Tensor, sparsity: float, include_first: bool,
                  attention_modules: dict[int, nn.Module], progress: bool = True) -> dict[int, LayerStats]:
    """Run ``input_ids`` (N, T) one sequence at a time through the unconverted ``model`` (eager attention)."""
    from tqdm.auto import tqdm

    stats: dict[int, LayerStats] = {}
    inputs: dict[int, Tensor] = {}
    hooks = []

    def pre_hook(layer):
        def hook(module, args, kwargs):
            inputs[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def post_hook(layer):
        def hook(module, args, kwargs, output):
            A = output[1].detach().float()  # (1, H, T, T)
            x = inputs.pop(layer)[0].float()  # (T, D)
            _accumulate(stats, layer, x, A[0], sparsity, include_first, _values(module, x), _out_maps(module))
        return hook

    for layer, m in attention_modules.items():
        hooks.append(m.register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
        hooks.append(m.register_forward_hook(post_hook(layer), with_kwargs=True))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only backend that returns attention weights
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in tqdm(input_ids, desc="calibration", disable=not progress, unit="seq"):
                model(input_ids=row[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(previous)
        model.train(was_training)
    n_tokens = input_ids.shape[0] * input_ids.shape[1]
    for s in stats.values():
        s.coverage /= s.sequences
        s.tokens = float(n_tokens)
        s.sparsity, s.include_first = sparsity, include_first
    return stats


def _values(module: nn.Module, x: Tensor) -> Tensor:
    """(H, T, d): the value vector each query head reads at every token (GQA groups share theirs)."""
    from .families import family_of, head_to_kv

    W = family_of(module).head_weights(module)
    v = torch.einsum("kdD,tD->ktd", W.wv.detach().float(), x)  # (KV, T, d)
    if W.bv is not None:
        v = v + W.bv.detach().float()[:, None]
    return v[head_to_kv(W.num_heads, W.num_kv_heads)]


def _out_maps(module: nn.Module) -> Tensor:
    """(H, d, D): each head's output projection, applied as o @ W."""
    from .families import family_of

    W = family_of(module).head_weights(module)
    return W.wo.detach().float().permute(1, 2, 0)


def _standardise(z: Tensor) -> Tensor:
    return (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True).clamp_min(1e-6)


def _accumulate(stats, layer: int, x: Tensor, A: Tensor, sparsity: float, include_first: bool,
                values: Tensor, out_maps: Tensor) -> None:
    H, T, _ = A.shape
    received = A.sum(dim=1)  # (H, T) attention mass each token receives
    k = tokens_per_head(T, sparsity)
    score = received.clone()
    if include_first:
        score[:, 0] = float("inf")
    S = score.topk(k, dim=-1).indices  # (H, k)
    rows = A.gather(1, S[:, :, None].expand(H, k, T))  # (H, k, T) attention rows of the selected queries
    inside = rows.gather(2, S[:, None, :].expand(H, k, k)).sum(-1)  # (H, k) mass kept on selected keys
    coverage = inside.mean(-1)  # (H,)
    z = _standardise(received.clamp_min(1e-6).log())  # (H, T)
    o = torch.matmul(A, values)  # (H, T, d) each head's output at every token
    dev = torch.matmul(o - o.mean(1, keepdim=True), out_maps).norm(dim=-1)  # (H, T) what it adds beyond its mean
    z_dev = _standardise(dev.clamp_min(1e-6).log())
    xd = x.double()
    if layer not in stats:
        D = x.shape[1]
        stats[layer] = LayerStats(torch.zeros(H, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64),
                                  torch.zeros(D, H, dtype=torch.float64), 0,
                                  torch.zeros(H, values.shape[-1], dtype=torch.float64),
                                  torch.zeros(D, H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64))
    s = stats[layer]
    s.out_sum += torch.einsum("ht,htd->hd", received.double(), values.double())  # Σ_t of each head's output
    s.coverage += coverage.double()
    s.xtx += xd.t() @ xd
    s.xtz += xd.t() @ z.double().t()
    s.xtz_dev += xd.t() @ z_dev.double().t()
    s.energy += dev.double().pow(2).sum(-1)
    s.sequences += 1
