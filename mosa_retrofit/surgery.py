"""``convert_(model, config)``: turn a pretrained model's attention layers into hybrid MoSA layers, in place.

Everything is validated before the model is touched. The resolved per-layer dense heads are written back
into ``model.config.mosa`` so a saved checkpoint rebuilds exactly the same structure.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import LayerPlan, dense_kv_layout, init_router_, init_threshold_, mosa_class
from .calibration import LayerStats, collect_stats
from .config import MoSAConfig
from .families import Family, family_of


def attention_layers(model: nn.Module, family: Family | None = None) -> dict[int, tuple[str, nn.Module]]:
    """``{layer_idx: (qualified name, module)}`` of the model's self-attention modules."""
    family = family or family_of(model)
    found = {}
    for name, m in model.named_modules():
        if family.is_attention(m):
            found[int(m.layer_idx)] = (name, m)
    return found


def plan_layers(model: nn.Module, config: MoSAConfig, stats: dict[int, LayerStats] | None = None,
                filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[int, LayerPlan]:
    """Per converted layer, which heads stay dense and which become MoSA heads (validates everything)."""
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
    plans = {}
    for idx, (name, m) in sorted(layers.items()):
        if not config.converts_layer(idx) or (filter_fn is not None and not filter_fn(m, name)):
            continue
        H, KV, _ = family.dims(m)
        G = H // KV
        n = config.dense_count(idx, H)
        if n > H:
            raise ValueError(f"MoSAConfig.dense_heads asks for {n} dense heads in layer {idx}, which has {H} heads")
        if str(idx) in config.dense_head_ids:
            dense = sorted(config.dense_head_ids[str(idx)])
            if len(set(dense)) != len(dense) or (dense and dense[-1] >= H):
                raise ValueError(f"MoSAConfig.dense_head_ids['{idx}'] = {dense}: need distinct heads in 0..{H - 1}")
        elif config.head_choice == "first":
            dense = list(range(n))
        elif config.head_choice == "last":
            dense = list(range(H - n, H))
        else:  # scored: keep dense the heads (or KV groups) whose replacement would change the output most
            score = stats[idx].head_scores(config.fill)
            if config.router_granularity == "kv_group" and n % G == 0:
                groups = score.view(KV, G).sum(-1).argsort(descending=True)[: n // G].tolist()
                dense = sorted(h for g in groups for h in range(g * G, (g + 1) * G))
            else:
                dense = sorted(score.argsort(descending=True)[:n].tolist())
        mosa = [h for h in range(H) if h not in dense]
        if config.router_granularity == "kv_group" and G > 1:
            split = [g for g in range(KV) if 0 < sum(h in mosa for h in range(g * G, (g + 1) * G)) < G]
            if split:
                raise ValueError(
                    f"router_granularity='kv_group' needs whole KV groups of {G} heads in each part, but layer {idx} "
                    f"splits groups {split} (dense heads {dense}); use a multiple of {G} dense heads or "
                    f"router_granularity='head'")
        if config.kept_heads == "local" and family.softcap(m) is not None and dense:
            raise ValueError("kept_heads='local' does not support attention logit soft-capping (Gemma2); use 'dense'")
        if config.sparse_heads == "local" and family.softcap(m) is not None:
            raise ValueError("sparse_heads='local' does not support attention logit soft-capping (Gemma2)")
        if not mosa:
            continue  # every head stays dense: the layer is left as it is
        plans[idx] = LayerPlan(
            dense=tuple(dense), mosa=tuple(mosa), sparsity=config.sparsity, include_first=config.include_first,
            router_score=config.router_score, granularity=config.router_granularity if G > 1 else "head",
            kept_heads=config.kept_heads, local_window=config.local_window, group_size=G, routing=config.routing,
            threshold_momentum=config.threshold_momentum, sparse_heads=config.sparse_heads, fill=config.fill,
        )
    return plans


def convert_(model: nn.Module, config: MoSAConfig, calibration: Tensor | None = None,
             filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = True,
             stats: dict[int, LayerStats] | None = None, _structure_only: bool = False) -> nn.Module:
    """Convert ``model``'s attention to hybrid MoSA in place and return it.

    Args:
        model: a supported causal LM (see ``families.supported_families()``).
        config: what to convert.
        calibration: token ids (N, T) of calibration text; needed for ``head_choice='scored'`` and
            ``router_init='calibrated'``.
        filter_fn: optional ``(module, qualified_name) -> bool`` to convert only some attention modules.
        stats: calibration statistics from ``calibration.collect_stats`` on this (unconverted) model, to reuse
            one calibration pass across many conversions (a sweep); causal routing still needs ``calibration``
            for its thresholds.
        _structure_only: build the layers a saved checkpoint describes (its dense heads are resolved) without
            fitting anything: the weights come from the checkpoint (used by ``load`` and resumed training).

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        >>> convert_(model, MoSAConfig(sparsity=8, dense_heads=3))
    """
    if not isinstance(config, MoSAConfig):
        raise TypeError(f"config must be a MoSAConfig, got {type(config).__name__}")
    family = family_of(model)
    if mosa_layers(model):
        raise ValueError("this model is already converted (it has MoSA attention layers)")
    routed = config.sparse_heads == "mosa"  # the baselines have no routers
    fitted = not _structure_only and (config.fill == "mean" or (routed and config.router_init == "calibrated"))
    needs_calibration = config.head_choice == "scored" or fitted
    if needs_calibration and calibration is None and stats is None:
        raise ValueError(f"head_choice={config.head_choice!r} / router_init={config.router_init!r} / "
                         f"fill={config.fill!r} need calibration token ids (N, T); pass calibration=... (or use "
                         "head_choice='first', router_init='random', fill='zero')")
    if calibration is not None and (not isinstance(calibration, Tensor) or calibration.dim() != 2):
        raise ValueError(f"calibration must be a (N, T) tensor of token ids, got {getattr(calibration, 'shape', calibration)}")
    layers = attention_layers(model, family)
    if config.head_choice == "scored" and stats is None:
        plans_probe = {i for i in layers if config.converts_layer(i)}
        stats = collect_stats(model, calibration, {i: layers[i][1] for i in plans_probe}, progress)
    plans = plan_layers(model, config, stats, filter_fn)  # raises before anything is modified
    if fitted and stats is None:
        stats = collect_stats(model, calibration, {i: layers[i][1] for i in plans}, progress)
    if fitted and any(i not in stats for i in plans):
        raise ValueError(f"stats lack layers {sorted(i for i in plans if i not in stats)} that this config converts")

    for idx, plan in plans.items():
        _, m = layers[idx]
        weights = family.head_weights(m)
        m.__class__ = mosa_class(type(m))
        m.mosa_family, m.mosa_plan = family, plan
        if plan.dense:
            m._mosa_dense_kv = dense_kv_layout(plan.dense, weights.num_heads, weights.num_kv_heads)
            m.num_key_value_groups = m._mosa_dense_kv[1]  # what the attention backend repeats K/V by
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
        from .causal import calibrate_thresholds_

        calibrate_thresholds_(model, calibration)
    resolved = dataclasses.replace(config, dense_head_ids={str(i): list(p.dense) for i, p in plans.items()},
                                   layers=sorted(plans))
    model.config.mosa = resolved.to_dict()
    model.mosa_targets = [layers[i][0] for i in plans]
    return model


def mosa_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Converted attention modules by layer index."""
    return {int(m.layer_idx): m for m in model.modules() if hasattr(m, "mosa_plan")}
