"""Calibration: one pass of text through the *original* model to rank heads and initialise routers and fills.

For every attention layer we read the input x_t of the attention module and each head's attention matrix
A (eager attention returns it), compute each head's output o_t = Σ_s A_ts v_s, and accumulate (no backprop,
nothing stored per token):

* **mean output** μ_h = Σ_t o_t / N (before the output projection): ``MoSAConfig(fill='mean')`` starts from it.
* **energy** of head h: Σ_t ‖(o_t − f) W_o‖², the change to the layer's output if the head wrote only its fill
  f at every token (f = the sequence mean of o for fill='mean', 0 for fill='zero'). ``head_choice='scored'``
  keeps the heads of *highest* energy dense: replacing them would hurt most. (Sink heads, whose output barely
  moves, cost almost nothing to sparsify; with fill='mean' they are nearly free.)
* **router fit**: a MoSA unit should select the tokens that matter to its heads, as keys and as queries. The
  target is z_h(t) = mass_h(t) + dev_h(t), each standardised per sequence: mass = log of the attention mass
  token t receives (tokens others read), dev = log ‖(o_t − f) W_o‖ (tokens where the head's output departs from
  what it writes when it skips them). The router is the ridge regression  w = argmin Σ_t (x_t·w − z(t))² + λ‖w‖²
  (closed form from Σ x xᵀ and Σ x z), layer-local and cheap, rescaled so the logits have unit RMS on the
  calibration text. A unit of several heads (router_granularity='kv_group') fits the sum of their targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

FILL_KINDS = ("zero", "mean")


@dataclass
class LayerStats:
    xtx: Tensor  # (D, D) Σ x xᵀ
    xtz_mass: Tensor  # (D, H) Σ x mass_h
    xtz_dev: dict  # fill -> (D, H) Σ x dev_h
    energy: dict  # fill -> (H,) Σ_t ‖(o_t − f) W_o‖²
    out_sum: Tensor  # (H, d) Σ_t o_t
    sequences: int = 0
    tokens: float = 0.0

    def head_scores(self, fill: str = "zero") -> Tensor:
        """(H,) how much replacing each head by its ``fill`` changes the layer output (higher: keep dense)."""
        return self.energy[fill]

    def fit_router(self, heads: list[list[int]], fill: str = "zero", ridge: float = 1e-2) -> Tensor:
        """Routers (E, D) for units that each combine the targets of ``heads[e]``."""
        D = self.xtx.shape[0]
        reg = ridge * self.xtx.diagonal().mean() * torch.eye(D, dtype=self.xtx.dtype)
        xtz = self.xtz_mass + self.xtz_dev[fill]
        z = torch.stack([xtz[:, hs].sum(-1) for hs in heads], dim=1)  # (D, E)
        w = torch.linalg.solve(self.xtx + reg, z)  # (D, E)
        second_moment = torch.einsum("de,df,fe->e", w, self.xtx, w)  # Σ_t (x_t·w)²
        w = w / (second_moment / self.tokens).clamp_min(1e-12).sqrt()  # unit-RMS logits
        return w.t().contiguous()

    def mean_output(self, heads: list[list[int]]) -> Tensor:
        """(E, G·d): the mean attention output of each unit's heads, concatenated (the 'mean' fill)."""
        mean = self.out_sum / self.tokens  # (H, d)
        return torch.stack([mean[hs].reshape(-1) for hs in heads])


def collect_stats(model: nn.Module, input_ids: Tensor, attention_modules: dict[int, nn.Module],
                  progress: bool = True) -> dict[int, LayerStats]:
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
            _accumulate(stats, layer, x, A[0], _values(module, x), _out_maps(module))
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
        s.tokens = float(n_tokens)
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


def _accumulate(stats, layer: int, x: Tensor, A: Tensor, values: Tensor, out_maps: Tensor) -> None:
    H, T, _ = A.shape
    received = A.sum(dim=1)  # (H, T) attention mass each token receives
    o = torch.matmul(A, values)  # (H, T, d) each head's output at every token
    xd = x.double()
    if layer not in stats:
        D = x.shape[1]
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
        stats[layer] = LayerStats(zeros(D, D), zeros(D, H), {f: zeros(D, H) for f in FILL_KINDS},
                                  {f: zeros(H) for f in FILL_KINDS}, zeros(H, values.shape[-1]))
    s = stats[layer]
    s.xtx += xd.t() @ xd
    s.xtz_mass += xd.t() @ _standardise(received.clamp_min(1e-6).log()).double().t()
    for fill, f in (("zero", 0.0), ("mean", o.mean(1, keepdim=True))):
        dev = torch.matmul(o - f, out_maps).norm(dim=-1)  # (H, T) what the head adds beyond its fill
        s.energy[fill] += dev.double().pow(2).sum(-1)
        s.xtz_dev[fill] += xd.t() @ _standardise(dev.clamp_min(1e-6).log()).double().t()
    s.out_sum += o.double().sum(1)
    s.sequences += 1
