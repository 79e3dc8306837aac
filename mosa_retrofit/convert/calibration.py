"""Calibration: one pass of text through the *original* model to rank heads and initialise routers and fills.

For every attention layer we read the input x_t of the attention module and each head's attention matrix
A (eager attention returns it), compute each head's output o_t = Σ_s A_ts v_s, and accumulate (no backprop,
nothing stored per token):

* **mean output** μ_h = Σ_t o_t / N (before the output projection): ``MoSAConfig(fill='mean')`` starts from it.
* **energy** of head h: Σ_t ‖(o_t − f) W_o‖², the change to the layer's output if the head wrote only its fill
  f at every token (f = the sequence mean of o for fill='mean', 0 for fill='zero'). ``head_choice='scored'``
  keeps the heads of *highest* energy dense: replacing them would hurt most. (Sink heads, whose output barely
  moves, cost almost nothing to sparsify; with fill='mean' they are nearly free.)
* **sparsifying damage** at sparsity s: Σ_t ‖(ô_t − o_t) W_o‖² summed over a unit's heads, where ô is what the
  head would output as a MoSA unit that selects the T/s tokens (and the first) of highest router target z
  (below; a KV-group unit by the sum of its heads' z): at a selected query, attention renormalised over
  the selected keys (a softmax over a subset is the full softmax renormalised on it), elsewhere the fill.
  ``head_choice='scored'`` keeps dense the heads, or KV groups, of highest damage: those that MoSA would
  change most. Unlike the energy it sees which heads survive sparse selection (a head that reads a few
  salient tokens does; a local, previous-token head does not).
* **router fit**: a MoSA unit should select the tokens that matter to its heads, as keys and as queries. The
  target is z_h(t) = mass_h(t) + dev_h(t), each standardised per sequence: mass = log of the attention mass
  token t receives (tokens others read), dev = log ‖(o_t − f) W_o‖ (tokens where the head's output departs from
  what it writes when it skips them). The router is the ridge regression  w = argmin Σ_t (x_t·w − z(t))² + λ‖w‖²
  (closed form from Σ x xᵀ and Σ x z), layer-local and cheap, rescaled so the logits have unit RMS on the
  calibration text. A KV-group unit (router_granularity='kv_group') caches one K/V row per selected token for
  all its heads, so it fits the group's own target: log of the mass its heads give token t together plus log
  ‖Σ_h (o_h(t) − f_h) W_o^h‖ (what they add together), each standardised; other multi-head units fit the sum of
  their heads' targets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..ops.routing import tokens_per_head
from ..text.data import DataSpec, builtin_parts, documents, token_stream
from ..text.protocol import PROTOCOL
from ..validate import positions_of
from .families import family_of, head_to_kv
from .hub import load_tokenizer

FILL_KINDS = ("zero", "mean")
UNITS = ("head", "kv_group")

logger = logging.getLogger("mosa_retrofit")


@dataclass
class LayerStats:
    xtx: Tensor  # (D, D) Σ x xᵀ
    xtz_mass: Tensor  # (D, H) Σ x mass_h
    xtz_dev: dict  # fill -> (D, H) Σ x dev_h
    energy: dict  # fill -> (H,) Σ_t ‖(o_t − f) W_o‖²
    out_sum: Tensor  # (H, d) Σ_t o_t
    kv_heads: int = 1  # KV groups of the layer
    xtz_group: dict = field(default_factory=dict)  # fill -> (D, KV) Σ x z_g, the router target of each KV group
    xtz_far: dict = field(default_factory=dict)  # window -> (D, H) Σ x far_h, the key-selection target per head
    xtz_far_group: dict = field(default_factory=dict)  # window -> (D, KV) Σ x far_g, per KV group
    damage: dict = field(default_factory=dict)  # (unit, fill, sparsity) -> (H,) or (KV,) sparsifying damage
    sequences: int = 0
    tokens: float = 0.0

    def head_scores(self, fill: str = "zero", sparsity: float | None = None, unit: str = "head") -> Tensor:
        """How much the layer output changes if each head (``unit='head'``, (H,)) or KV group (``'kv_group'``,
        (KV,)) becomes a MoSA unit at ``sparsity`` (None: is replaced by its ``fill`` at every token; groups sum
        their heads' energies). Higher: keep dense. A sparsity that was not simulated uses the nearest one."""
        if sparsity is not None and self.damage:
            done = sorted({s for (u, f, s) in self.damage if u == unit and f == fill})
            if done:
                near = min(done, key=lambda s: (abs(math.log(s / sparsity)), s))
                return self.damage[(unit, fill, near)]
        if unit == "kv_group":
            raise ValueError("group scores need the sparsifying damage: collect_stats(..., sparsities=...)")
        return self.energy[fill]

    def fit_router(self, heads: list[list[int]], fill: str = "zero", ridge: float = 1e-2,
                   window: int | None = None) -> Tensor:
        """Routers (E, D) for units of ``heads[e]``: a whole KV group fits its group target, other units the sum
        of their heads' targets. ``window``: key-selection units (they route keys for queries beyond their
        recent ``window``) fit the *far* target instead: the attention a token receives from queries at least
        ``window`` tokens later (needs ``collect_stats(..., windows=(window,))``)."""
        D = self.xtx.shape[0]
        reg = ridge * self.xtx.diagonal().mean() * torch.eye(D, dtype=self.xtx.dtype, device=self.xtx.device)
        if window is not None and window not in self.xtz_far:
            raise ValueError(f"no key-selection router targets for window {window}: collect_stats(..., "
                             f"windows=({window},)); have {sorted(self.xtz_far)}")
        xtz = self.xtz_far[window] if window is not None else self.xtz_mass + self.xtz_dev[fill]
        group_xtz = self.xtz_far_group.get(window) if window is not None else self.xtz_group.get(fill)
        G = xtz.shape[1] // self.kv_heads

        def target(hs: list[int]) -> Tensor:
            g = hs[0] // G
            if group_xtz is not None and G > 1 and list(hs) == list(range(g * G, (g + 1) * G)):
                return group_xtz[:, g]
            return xtz[:, hs].sum(-1)

        z = torch.stack([target(hs) for hs in heads], dim=1)  # (D, E)
        w = torch.linalg.solve(self.xtx + reg, z)  # (D, E)
        second_moment = torch.einsum("de,df,fe->e", w, self.xtx, w)  # Σ_t (x_t·w)²
        w = w / (second_moment / self.tokens).clamp_min(1e-12).sqrt()  # unit-RMS logits
        return w.t().contiguous()

    def mean_output(self, heads: list[list[int]]) -> Tensor:
        """(E, G·d): the mean attention output of each unit's heads, concatenated (the 'mean' fill)."""
        mean = self.out_sum / self.tokens  # (H, d)
        return torch.stack([mean[hs].reshape(-1) for hs in heads])


def calibration_ids(tokenizer, data: str = "wikipedia-offline", sequences: int = 16, length: int = 512,
                    progress: bool = True) -> Tensor:
    """(sequences, length) calibration token ids from ``data``: an embedded text without the documents the
    evaluation protocol holds out, or all of a user's files / hub dataset (one that cannot be reached falls back
    to the embedded Wikipedia text, with a warning)."""
    n = sequences * length
    try:
        docs, stream = documents(DataSpec(source=data, block_size=max(length, 2), streaming=True))
        if docs is not None and builtin_parts(data) is not None:
            docs = docs[:-PROTOCOL.validation_documents]  # never calibrate on the held-out documents
        ids = token_stream(tokenizer, docs if docs is not None else stream, n, progress, "tokenising calibration text")
    except (ConnectionError, OSError) as e:  # a hub dataset that cannot be reached (a missing file is an error)
        if builtin_parts(data) is not None or Path(data.split(",")[0]).suffix or Path(data).exists():
            raise
        logger.warning("mosa_retrofit: calibration data %r could not be read (%s: %s); using the embedded "
                       "wikipedia-offline text instead", data, type(e).__name__, e)
        return calibration_ids(tokenizer, "wikipedia-offline", sequences, length, progress)
    if ids.numel() < n:
        raise ValueError(f"calibration data {data!r} has {ids.numel()} tokens; {sequences} sequences x {length} "
                         f"tokens need {n}")
    return ids.long().view(sequences, length)


def model_tokenizer(model: nn.Module, tokenizer=None):
    """``tokenizer``, or the model's own (found through ``model.name_or_path``); a clear error if neither."""
    if tokenizer is None:
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        try:
            tokenizer = load_tokenizer(source) if source else None
        except (OSError, ValueError):
            tokenizer = None
    if tokenizer is None:
        raise ValueError("this conversion needs calibration text (scored or retrieval dense heads, calibrated "
                         "routers or a mean fill) and the model has no tokenizer to read the default text with: "
                         "pass calibration= token ids (N, T) or tokenizer=..., or use MoSAConfig.paper(), which "
                         "needs none")
    return tokenizer


def default_calibration(model: nn.Module, tokenizer=None, sequences: int = 16, length: int = 512) -> Tensor:
    """(sequences, length) token ids of the embedded Wikipedia text (training articles only: the held-out ones
    stay unseen), tokenised by ``tokenizer`` or by the model's own (``model.name_or_path``)."""
    tokenizer = model_tokenizer(model, tokenizer)
    limit = positions_of(model.config) or length
    return calibration_ids(tokenizer, "wikipedia-offline", sequences, min(length, limit), progress=False)


def collect_stats(model: nn.Module, input_ids: Tensor, attention_modules: dict[int, nn.Module],
                  progress: bool = True, sparsities: tuple = (2, 4, 8, 16), include_first: bool = True,
                  fills: tuple = FILL_KINDS, windows: tuple = ()) -> dict[int, LayerStats]:
    """Run ``input_ids`` (N, T) one sequence at a time through the unconverted ``model`` (eager attention).

    ``sparsities`` / ``fills``: where the sparsifying damage of every head and KV group is simulated;
    ``windows``: the recent windows of key-selection heads whose router targets are accumulated."""
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
            W = family_of(module).head_weights(module)
            _accumulate(stats, layer, x, A[0], _values(W, x), _out_maps(W), W.num_kv_heads, sparsities,
                        include_first, fills)
            for window in windows:
                _accumulate_far(stats[layer], x, A[0], window)
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


def _values(W, x: Tensor) -> Tensor:
    """(H, T, d): the value vector each query head reads at every token (GQA groups share theirs)."""
    v = torch.einsum("kdD,tD->ktd", W.wv.detach().float(), x)  # (KV, T, d)
    if W.bv is not None:
        v = v + W.bv.detach().float()[:, None]
    return v[head_to_kv(W.num_heads, W.num_kv_heads)]


def _out_maps(W) -> Tensor:
    """(H, d, D): each head's output projection, applied as o @ W."""
    return W.wo.detach().float().permute(1, 2, 0)


def _gram(out_maps: Tensor, units: int) -> Tensor:
    """(U, n·d, n·d) W Wᵀ of each unit's stacked output maps (n = H / U heads a unit): ‖x W‖² = x W Wᵀ xᵀ."""
    H, d, D = out_maps.shape
    w = out_maps.reshape(units, H // units * d, D)
    return torch.matmul(w, w.transpose(1, 2))


def _standardise(z: Tensor) -> Tensor:
    return (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True).clamp_min(1e-6)


def _accumulate(stats, layer: int, x: Tensor, A: Tensor, values: Tensor, out_maps: Tensor, kv_heads: int,
                sparsities: tuple = (), include_first: bool = True, fills: tuple = FILL_KINDS) -> None:
    H, T, _ = A.shape
    received = A.sum(dim=1)  # (H, T) attention mass each token receives
    o = torch.matmul(A, values)  # (H, T, d) each head's output at every token
    xd = x.double()
    if layer not in stats:
        D = x.shape[1]
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=x.device)  # where the model runs
        stats[layer] = LayerStats(zeros(D, D), zeros(D, H), {f: zeros(D, H) for f in FILL_KINDS},
                                  {f: zeros(H) for f in FILL_KINDS}, zeros(H, values.shape[-1]), kv_heads=kv_heads)
    s = stats[layer]
    s.xtx += xd.t() @ xd
    mass = _standardise(received.clamp_min(1e-6).log())  # (H, T)
    s.xtz_mass += xd.t() @ mass.double().t()
    G = H // kv_heads
    grams = {"head": _gram(out_maps, H), "kv_group": _gram(out_maps, kv_heads)}  # (H, d, d), (KV, G·d, G·d)
    group_gram = grams["kv_group"]
    if G > 1:  # a KV group caches one K/V row per token for all its heads: the mass its heads give it together
        group_mass = _standardise(received.view(kv_heads, G, T).sum(1).clamp_min(1e-6).log())  # (KV, T)
    for fill, f in (("zero", torch.zeros_like(o[:, :1])), ("mean", o.mean(1, keepdim=True))):
        dev = torch.matmul(o - f, out_maps).norm(dim=-1)  # (H, T) what the head adds beyond its fill
        s.energy[fill] += dev.double().pow(2).sum(-1)
        z = mass + _standardise(dev.clamp_min(1e-6).log())  # (H, T) the router target
        s.xtz_dev[fill] += xd.t() @ _standardise(dev.clamp_min(1e-6).log()).double().t()
        z_group = None
        if G > 1:  # and what its heads add together beyond their fills: ‖Σ_h (o_h − f_h) W_o^h‖
            delta = (o - f).view(kv_heads, G, T, -1).transpose(1, 2).reshape(kv_heads, T, -1)  # (KV, T, G·d)
            group_dev = (torch.matmul(delta, group_gram) * delta).sum(-1).clamp_min(1e-12).sqrt()  # (KV, T)
            z_group = group_mass + _standardise(group_dev.clamp_min(1e-6).log())  # (KV, T)
            s.xtz_group[fill] = s.xtz_group.get(fill, 0) + xd.t() @ z_group.double().t()
        for sparsity in sparsities if fill in fills else ():
            _simulate(s, fill, f, sparsity, z, A, values, o, grams, include_first)
    s.out_sum += o.double().sum(1)
    s.sequences += 1


def _accumulate_far(s: LayerStats, x: Tensor, A: Tensor, window: int) -> None:
    """Key-selection router targets: per head (and KV group), log of the mean attention a token receives from
    the queries at least ``window`` tokens after it (those that can reach it only if it is routed),
    standardised over the tokens that have such queries (0 for the others). Calibration rows shorter than twice
    the window use half the row as the distance (the same kind of target, the only one such rows can show)."""
    H, T, _ = A.shape
    i = torch.arange(T, device=A.device)
    far = (i[:, None] - i[None, :]) >= min(window, max(T // 2, 1))  # (T, T) query i, key j
    count = far.sum(0)  # (T,) far queries of each key
    has = count > 0
    received = (A * far).sum(1) / count.clamp_min(1)  # (H, T) mean far attention per far query
    G = H // s.kv_heads

    def target(mass: Tensor) -> Tensor:  # (U, T) -> standardised log over keys with far queries, 0 elsewhere
        z = torch.zeros_like(mass)
        z[:, has] = _standardise(mass[:, has].clamp_min(1e-6).log())
        return z

    xd = x.double()
    s.xtz_far[window] = s.xtz_far.get(window, 0) + xd.t() @ target(received).double().t()
    group = received.view(s.kv_heads, G, T).sum(1)  # (KV, T)
    s.xtz_far_group[window] = s.xtz_far_group.get(window, 0) + xd.t() @ target(group).double().t()


def _simulate(s: LayerStats, fill: str, f: Tensor, sparsity: float, z: Tensor, A: Tensor, values: Tensor,
              o: Tensor, grams: dict, include_first: bool) -> None:
    """Accumulate the damage of turning each head, and each KV group, into a MoSA unit at ``sparsity``: a unit
    selects the tokens of highest router target z (H, T) (summed over a group's heads)."""
    H, T, _ = A.shape
    KV = s.kv_heads
    G = H // KV
    k = tokens_per_head(T, sparsity)
    units = [("head", z)]
    if G > 1:  # a group selects by its heads' summed targets (picked the better dense groups than z_group on
        units.append(("kv_group", z.view(KV, G, T).sum(1).repeat_interleave(G, dim=0)))  # SmolLM2: 3.8x vs 4.2x)
    for unit, score in units:
        if include_first:
            score = score.clone()
            score[:, 0] = float("inf")
        top = score.topk(k, dim=-1).indices  # (H, k) selected tokens
        d = values.shape[-1]
        rows = A.gather(1, top[..., None].expand(H, k, T))  # (H, k, T) selected queries
        a = rows.gather(2, top[:, None, :].expand(H, k, k))  # (H, k, k) ... attending selected keys (A is causal)
        v = values.gather(1, top[..., None].expand(H, k, d))  # (H, k, d)
        o_sel = torch.matmul(a, v) / a.sum(-1, keepdim=True).clamp_min(1e-30)  # (H, k, d) renormalised attention
        o_hat = f.expand(H, T, d).clone().scatter_(1, top[..., None].expand(H, k, d), o_sel)  # fill elsewhere
        delta = o_hat - o  # (H, T, d) change of each head's output; the layer's is Σ_h delta_h W_o^h
        if unit == "kv_group":  # a group's heads change the output together: ‖[δ_1 .. δ_G] W_g‖², W_g (G·d, D)
            delta = delta.view(KV, G, T, -1).transpose(1, 2).reshape(KV, T, -1)  # (KV, T, G·d)
        key = (unit, fill, sparsity)
        s.damage[key] = s.damage.get(key, 0) + (torch.matmul(delta, grams[unit]) * delta).sum((-1, -2)).double()
    if G == 1:  # one head per KV group: a group is a head
        s.damage[("kv_group", fill, sparsity)] = s.damage[("head", fill, sparsity)]
