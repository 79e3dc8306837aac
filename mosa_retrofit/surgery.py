"""``convert_(model, config)``: turn a pretrained model's attention layers into hybrid MoSA layers, in place.

Everything is validated before the model is touched. The resolved per-layer dense heads are written back
into ``model.config.mosa`` so a saved checkpoint rebuilds exactly the same structure.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import LayerPlan, init_router_, init_threshold_, mosa_class, mosa_layers
from .calibration import LayerStats, collect_stats, default_calibration
from .causal import calibrate_thresholds_, threshold_rows
from .config import MoSAConfig
from .costs import attention_costs, ratios
from .families import attention_layers, dense_kv_layout, family_of

logger = logging.getLogger("mosa_retrofit")


def plan_layers(model: nn.Module, config: MoSAConfig, stats: dict[int, LayerStats] | None = None,
                filter_fn: Callable[[nn.Module, str], bool] | None = None,
                notes: list[str] | None = None) -> dict[int, LayerPlan]:
    """Per converted layer, which heads stay dense and which become MoSA heads (validates everything).

    ``notes`` (if given) receives one line per adjustment a user should know of: a dense count rounded up to
    whole KV groups, or layers whose dense heads split a KV group (their MoSA heads then route one by one).
    """
    family = family_of(model)
    layers = attention_layers(model, family)
    if not layers:
        raise ValueError(f"no attention modules found in {type(model).__name__}")
    unknown = sorted(int(k) for k in config.dense_head_ids if int(k) not in layers)
    if unknown:
        raise ValueError(f"MoSAConfig.dense_head_ids names layers {unknown}; the model has layers 0..{max(layers)}")
    if isinstance(config.layers, list) and any(i not in layers for i in config.layers):
        bad = [i for i in config.layers if i not in layers]
        raise ValueError(f"MoSAConfig.layers names layers {bad}; the model has layers 0..{max(layers)}")
    plans, rounded, split = {}, {}, []
    for idx, (name, m) in sorted(layers.items()):
        if not config.converts_layer(idx) or (filter_fn is not None and not filter_fn(m, name)):
            continue
        H, KV, _ = family.dims(m)
        G = H // KV
        granularity = config.router_granularity if G > 1 else "head"
        if str(idx) in config.dense_head_ids:
            dense = sorted(config.dense_head_ids[str(idx)])
            if len(set(dense)) != len(dense) or (dense and dense[-1] >= H):
                raise ValueError(f"MoSAConfig.dense_head_ids['{idx}'] = {dense}: need distinct heads in 0..{H - 1}")
        else:
            asked = config.dense_count(idx, H)
            if asked > H:
                raise ValueError(f"MoSAConfig.dense_heads asks for {asked} dense heads in layer {idx}, which has {H} "
                                 "heads")
            n = asked
            if granularity == "kv_group" and n % G and -(-n // G) * G < H:
                n = -(-n // G) * G  # whole KV groups: each K/V row is cached once
                rounded.setdefault((asked, n, G), []).append(idx)
            dense = _choose_dense(config, stats, idx, n, H, KV, whole_groups=granularity == "kv_group")
        mosa = [h for h in range(H) if h not in dense]
        if granularity == "kv_group" and any(0 < sum(h in mosa for h in range(g * G, (g + 1) * G)) < G
                                             for g in range(KV)):
            granularity = "head"  # a group split between dense and MoSA heads has no unit of whole groups
            split.append(idx)
        if config.kept_heads == "local" and family.softcap(m) is not None and dense:
            raise ValueError("kept_heads='local' does not support attention logit soft-capping (Gemma2); use 'dense'")
        if config.sparse_heads == "local" and family.softcap(m) is not None:
            raise ValueError("sparse_heads='local' does not support attention logit soft-capping (Gemma2)")
        if not mosa:
            continue  # every head stays dense: the layer is left as it is
        plans[idx] = LayerPlan(
            dense=tuple(dense), mosa=tuple(mosa), sparsity=config.sparsity, include_first=config.include_first,
            router_score=config.router_score, granularity=granularity, kept_heads=config.kept_heads,
            local_window=config.local_window, group_size=G, routing=config.routing,
            threshold_momentum=config.threshold_momentum, sparse_heads=config.sparse_heads, fill=config.fill,
        )
    if notes is not None:
        for (asked, n, G), idxs in rounded.items():
            notes.append(f"dense heads rounded up from {asked} to {n} (whole KV groups of {G} query heads) in "
                         f"{_layer_list(idxs)}, so the KV cache holds each K/V row once; "
                         "router_granularity='head' keeps the count as asked")
        if split:
            notes.append(f"{_layer_list(split)}: the dense heads split a KV group, so the MoSA heads there route "
                         "one by one (router_granularity='head') and each caches its own K/V copy; dense heads in "
                         "whole KV groups shrink the cache more")
    return plans


def _choose_dense(config: MoSAConfig, stats, idx: int, n: int, H: int, KV: int, whole_groups: bool) -> list[int]:
    """``n`` dense heads of a layer by ``config.head_choice`` (whole KV groups where ``whole_groups`` allows)."""
    if config.head_choice == "first":
        return list(range(n))
    if config.head_choice == "last":
        return list(range(H - n, H))
    # scored: keep dense the heads (or KV groups) that sparse selection would change most
    G = H // KV
    if whole_groups and G > 1 and n % G == 0:
        score = stats[idx].head_scores(config.fill, config.sparsity, "kv_group")  # (KV,)
        groups = score.argsort(descending=True)[: n // G].tolist()
        return sorted(h for g in groups for h in range(g * G, (g + 1) * G))
    score = stats[idx].head_scores(config.fill, config.sparsity, "head")  # (H,)
    return sorted(score.argsort(descending=True)[:n].tolist())


def _layer_list(idxs: list[int]) -> str:
    """'layer 3' / 'layers 0-29' / 'layers [1, 4, 7]'."""
    if len(idxs) == 1:
        return f"layer {idxs[0]}"
    if idxs == list(range(idxs[0], idxs[-1] + 1)):
        return f"layers {idxs[0]}-{idxs[-1]}"
    return f"layers {idxs}"


def convert_(model: nn.Module, config: MoSAConfig | None = None, calibration: Tensor | None = None,
             filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = True,
             stats: dict[int, LayerStats] | None = None, tokenizer=None,
             _structure_only: bool = False) -> nn.Module:
    """Convert ``model``'s attention to hybrid MoSA in place and return it.

    Args:
        model: a supported causal LM (see ``families.supported_families()``).
        config: what to convert (default ``MoSAConfig()``, the best retrofit we know).
        calibration: token ids (N, T) of calibration text, for scored heads, calibrated routers, mean fills and
            causal thresholds. When a config needs it and none is given, ``calibration.default_calibration``
            tokenises the embedded Wikipedia text with ``tokenizer`` (or the model's own, found through
            ``model.name_or_path``).
        filter_fn: optional ``(module, qualified_name) -> bool`` to convert only some attention modules.
        stats: calibration statistics from ``calibration.collect_stats`` on this (unconverted) model, to reuse
            one calibration pass across many conversions (a sweep); causal routing still needs ``calibration``
            for its thresholds.
        tokenizer: the model's tokenizer, for the default calibration text.
        _structure_only: build the layers a saved checkpoint describes (its dense heads are resolved) without
            fitting anything: the weights come from the checkpoint (used by ``load`` and resumed training).

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        >>> convert_(model, MoSAConfig(sparsity=8, dense_heads=3))   # calibrates on the embedded text
        >>> convert_(model, MoSAConfig.paper())                        # the paper's conversion, no calibration
    """
    config = MoSAConfig() if config is None else config
    if not isinstance(config, MoSAConfig):
        raise TypeError(f"config must be a MoSAConfig, got {type(config).__name__}")
    family = family_of(model)
    if mosa_layers(model) or getattr(model.config, "mosa", None):
        raise ValueError("this model is already converted (it has MoSA attention layers or a 'mosa' config "
                         "block); load a converted checkpoint with mosa_retrofit.load, and convert the original "
                         "to change a conversion")
    if calibration is not None and (not isinstance(calibration, Tensor) or calibration.dim() != 2):
        raise ValueError(f"calibration must be a (N, T) tensor of token ids, got {getattr(calibration, 'shape', calibration)}")
    routed = config.sparse_heads == "mosa"  # the baselines have no routers
    fitted = not _structure_only and ((config.fill == "mean" and config.sparse_heads != "local")
                                      or (routed and config.router_init == "calibrated"))
    layers = attention_layers(model, family)
    if not _structure_only and config.needs_calibration and calibration is None and stats is None:
        plan_layers(model, dataclasses.replace(config, head_choice="first"), None, filter_fn)  # validate first
        calibration = default_calibration(model, tokenizer)
    if config.head_choice == "scored" and stats is None:
        plans_probe = {i for i in layers if config.converts_layer(i)}
        stats = collect_stats(model, calibration, {i: layers[i][1] for i in plans_probe}, progress,
                              sparsities=(config.sparsity,), include_first=config.include_first,
                              fills=(config.fill,))
    notes: list[str] = []
    plans = plan_layers(model, config, stats, filter_fn, notes)  # raises before anything is modified
    if not _structure_only:
        for note in notes:
            logger.warning("mosa_retrofit: %s", note)
        if not plans:
            logger.warning("mosa_retrofit: this config converts no attention layer (every head of the selected "
                           "layers stays dense, or no layer is selected): the model is unchanged")
    if fitted and stats is None:
        stats = collect_stats(model, calibration, {i: layers[i][1] for i in plans}, progress, sparsities=())
    if fitted and any(i not in stats for i in plans):
        raise ValueError(f"stats lack layers {sorted(i for i in plans if i not in stats)} that this config converts")

    for idx, plan in plans.items():
        _, m = layers[idx]
        weights = family.head_weights(m)
        m.__class__ = mosa_class(type(m))
        m.mosa_family, m.mosa_plan = family, plan
        if plan.dense:  # what the attention backend repeats the kept heads' K/V by
            m.num_key_value_groups = dense_kv_layout(plan.dense, weights.num_heads, weights.num_kv_heads)[1]
        G = plan.heads_per_unit if routed else 1
        units = [list(plan.mosa[i: i + G]) for i in range(0, len(plan.mosa), G)]
        ref = weights.wq
        if plan.fill == "mean" and plan.sparse_heads != "local":
            m.mosa_fill = nn.Parameter(torch.zeros(len(units), G * weights.head_dim, device=ref.device,
                                                   dtype=ref.dtype))
            if not _structure_only:
                with torch.no_grad():
                    m.mosa_fill.copy_(stats[idx].mean_output(units).to(ref.dtype))
        if not routed:
            continue
        m.mosa_router = nn.Parameter(torch.empty(len(units), weights.wq.shape[2], device=ref.device, dtype=ref.dtype))
        if config.router_init == "calibrated" and not _structure_only:
            with torch.no_grad():
                m.mosa_router.copy_(stats[idx].fit_router(units, config.fill).to(ref.dtype))
        else:
            init_router_(m.mosa_router)
        if plan.routing == "causal":
            m.register_buffer("mosa_threshold", torch.empty(len(units), device=ref.device, dtype=torch.float32))
            init_threshold_(m.mosa_threshold, plan.sparsity)

    if config.routing == "causal" and calibration is not None:
        positions = getattr(model.config, "max_position_embeddings", None)
        calibrate_thresholds_(model, threshold_rows(calibration, config.threshold_length, positions))
    resolved = dataclasses.replace(config, dense_head_ids={str(i): list(p.dense) for i, p in plans.items()},
                                   layers=sorted(plans))
    model.config.mosa = resolved.to_dict()
    model.mosa_targets = [layers[i][0] for i in plans]
    if not _structure_only and plans:
        ratio = ratios(attention_costs(model, 8192)).kv_bytes
        if ratio >= 1:
            logger.warning("mosa_retrofit: this layout caches %.2fx the original's KV bytes at T = 8192 (it will "
                           "not shrink the cache): under GQA keep whole KV groups dense and route per group "
                           "(router_granularity='kv_group')", ratio)
    return model
