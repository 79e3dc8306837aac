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
from .calibration import LayerStats, collect_stats, default_calibration, model_tokenizer
from .config import MoSAConfig
from .costs import attention_costs, ratios
from .families import attention_layers, dense_kv_layout, family_of
from .retrieval import default_retrieval_prompts, retrieval_scores
from .thresholds import calibrate_thresholds_, threshold_rows

logger = logging.getLogger("mosa_retrofit")


def plan_layers(model: nn.Module, config: MoSAConfig, stats: dict[int, LayerStats] | None = None,
                filter_fn: Callable[[nn.Module, str], bool] | None = None,
                notes: list[str] | None = None, retrieval: dict[int, Tensor] | None = None) -> dict[int, LayerPlan]:
    """Per converted layer, which heads stay dense and which become MoSA heads (validates everything).

    ``stats`` (calibration) scores heads for ``head_choice='scored'``, ``retrieval`` ((H,) per layer,
    retrieval.py) for ``head_choice='retrieval'``.

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
    selected = {idx: m for idx, (name, m) in sorted(layers.items())
                if config.converts_layer(idx) and (filter_fn is None or filter_fn(m, name))}
    ranked = config.dense_scope == "model" and config.head_choice in ("scored", "retrieval")
    placed = _place_dense(config, family, selected, stats, retrieval) if ranked else {}
    for idx, m in selected.items():
        H, KV, _ = family.dims(m)
        G = H // KV
        granularity = config.router_granularity if G > 1 else "head"
        if idx in placed and str(idx) not in config.dense_head_ids:
            dense = placed[idx]
        elif str(idx) in config.dense_head_ids:
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
            dense = _choose_dense(config, stats, retrieval, idx, n, H, KV, whole_groups=granularity == "kv_group")
        mosa = [h for h in range(H) if h not in dense]
        if granularity == "kv_group" and any(0 < sum(h in mosa for h in range(g * G, (g + 1) * G)) < G
                                             for g in range(KV)):
            granularity = "head"  # a group split between dense and MoSA heads has no unit of whole groups
            split.append(idx)
        if config.kept_heads == "local" and family.softcap(m) is not None and dense:
            raise ValueError("kept_heads='local' does not support attention logit soft-capping (Gemma2); use 'dense'")
        if config.sparse_heads in ("local", "streaming", "mosa_keys") and family.softcap(m) is not None:
            raise ValueError(f"sparse_heads={config.sparse_heads!r} does not support attention logit soft-capping "
                             "(Gemma2); use 'mosa' or 'pruned'")
        if not mosa:
            continue  # every head stays dense: the layer is left as it is
        plans[idx] = LayerPlan(config, tuple(dense), tuple(mosa), granularity, G)
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


def _scores(config: MoSAConfig, stats, retrieval, idx: int, KV: int, unit: str) -> Tensor:
    """(KV,) or (H,): how much each KV group / head should stay dense, by ``config.head_choice``."""
    if config.head_choice == "retrieval":  # attention mass from answers onto hidden keys, summed per group
        score = retrieval[idx].float()
        return score.view(KV, -1).sum(1) if unit == "kv_group" else score
    # scored: the heads (or KV groups) that sparse selection would change most
    return stats[idx].head_scores(config.fill, config.sparsity, unit)


def _choose_dense(config: MoSAConfig, stats, retrieval, idx: int, n: int, H: int, KV: int,
                  whole_groups: bool) -> list[int]:
    """``n`` dense heads of a layer by ``config.head_choice`` (whole KV groups where ``whole_groups`` allows)."""
    if config.head_choice == "first":
        return list(range(n))
    if config.head_choice == "last":
        return list(range(H - n, H))
    G = H // KV
    if whole_groups and G > 1 and n % G == 0:
        groups = _scores(config, stats, retrieval, idx, KV, "kv_group").argsort(descending=True)[: n // G].tolist()
        return sorted(h for g in groups for h in range(g * G, (g + 1) * G))
    return sorted(_scores(config, stats, retrieval, idx, KV, "head").argsort(descending=True)[:n].tolist())


def _place_dense(config: MoSAConfig, family, modules: dict, stats, retrieval) -> dict[int, list[int]]:
    """dense_scope='model': the layers' dense counts summed, then given to the highest-scoring units (whole KV
    groups with router_granularity='kv_group', else heads) wherever they are. {layer: dense heads}."""
    units, total = [], 0.0
    for idx, m in modules.items():
        H, KV, _ = family.dims(m)
        G = H // KV if config.router_granularity == "kv_group" else 1
        total += config.dense_count(idx, H) / G
        score = _scores(config, stats, retrieval, idx, KV, "kv_group" if G > 1 else "head")
        units += [(float(v), idx, [u * G + h for h in range(G)]) for u, v in enumerate(score)]
    keep = sorted(units, key=lambda t: -t[0])[: int(round(total))]
    placed = {idx: [] for idx in modules}
    for _, idx, heads in keep:
        placed[idx] += heads
    return {idx: sorted(h) for idx, h in placed.items()}


def _layer_list(idxs: list[int]) -> str:
    """'layer 3' / 'layers 0-29' / 'layers [1, 4, 7]'."""
    if len(idxs) == 1:
        return f"layer {idxs[0]}"
    if idxs == list(range(idxs[0], idxs[-1] + 1)):
        return f"layers {idxs[0]}-{idxs[-1]}"
    return f"layers {idxs}"


def check_config(model: nn.Module, config: MoSAConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
                 ) -> None:
    """Raise ValueError, naming the value, if ``convert_(model, config, filter_fn=...)`` would fail or convert
    nothing: an already converted model, layers or heads the model lacks, a config that keeps every head dense,
    a sparsity that routes less than one token per sequence. Cheap: no calibration, nothing modified."""
    if mosa_layers(model) or getattr(model.config, "mosa", None):
        raise ValueError("this model is already converted (it has MoSA attention layers or a 'mosa' config "
                         "block); load a converted checkpoint with mosa_retrofit.load, and convert the original "
                         "to change a conversion")
    plans = plan_layers(model, dataclasses.replace(config, head_choice="first", dense_scope="layer"), None, filter_fn)
    if not plans:
        raise ValueError(f"this config converts no attention layer (dense_heads={config.dense_heads!r} keeps every "
                         f"head of the selected layers dense, or layers={config.layers!r} / the filter selects none): "
                         "nothing to convert; keep fewer heads dense or select some layers")
    positions = getattr(model.config, "max_position_embeddings", None)
    if config.routed and isinstance(positions, int) and config.sparsity > positions:
        raise ValueError(f"MoSAConfig.sparsity={config.sparsity:g} routes less than one token per sequence of the "
                         f"model's {positions} positions; use a sparsity in 1..{positions}")


def convert_(model: nn.Module, config: MoSAConfig | None = None, calibration: Tensor | None = None,
             filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = True,
             stats: dict[int, LayerStats] | None = None, tokenizer=None,
             retrieval: dict[int, Tensor] | None = None, _structure_only: bool = False) -> nn.Module:
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
        tokenizer: the model's tokenizer, for the default calibration text and retrieval prompts.
        retrieval: retrieval scores ``{layer: (H,)}`` from ``retrieval.retrieval_scores`` on this model, for
            ``head_choice='retrieval'`` (default: measured on 16 multi-key prompts of 1,024 tokens built from
            the embedded Wikipedia text).
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
    if not _structure_only:  # validate before any calibration work
        check_config(model, config, filter_fn)
    if calibration is not None and (not isinstance(calibration, Tensor) or calibration.dim() != 2):
        raise ValueError(f"calibration must be a (N, T) tensor of token ids, got {getattr(calibration, 'shape', calibration)}")
    routed = config.routed  # the baselines have no routers
    fitted = not _structure_only and ((config.fill == "mean" and config.fills)
                                      or (routed and config.router_init == "calibrated"))
    layers = attention_layers(model, family)
    needs_text = config.head_choice == "scored" or fitted  # (retrieval heads read prompts of their own)
    if not _structure_only and needs_text and calibration is None and stats is None:
        calibration = default_calibration(model, tokenizer)
    if config.head_choice == "retrieval" and retrieval is None and not _structure_only:
        length = min(1024, getattr(model.config, "max_position_embeddings", None) or 1024)
        prompts = default_retrieval_prompts(model_tokenizer(model, tokenizer), length=length)
        retrieval = retrieval_scores(model, prompts, [i for i in layers if config.converts_layer(i)], progress)
    if config.head_choice == "scored" and stats is None:
        plans_probe = {i for i in layers if config.converts_layer(i)}
        stats = collect_stats(model, calibration, {i: layers[i][1] for i in plans_probe}, progress,
                              sparsities=(config.sparsity,), include_first=config.include_first,
                              fills=(config.fill,))
    notes: list[str] = []
    plans = plan_layers(model, config, stats, filter_fn, notes, retrieval)  # raises before anything is modified
    if not _structure_only:
        for note in notes:
            logger.warning("mosa_retrofit: %s", note)
    windows = (config.local_window,) if routed and config.sparse_heads == "mosa_keys" else ()
    if fitted and (stats is None or any(i in stats and w not in stats[i].xtz_far for i in plans for w in windows)):
        stats = collect_stats(model, calibration, {i: layers[i][1] for i in plans}, progress, sparsities=(),
                              windows=windows)
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
        if plan.config.fill == "mean" and config.fills:
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
                window = config.local_window if config.sparse_heads == "mosa_keys" else None
                m.mosa_router.copy_(stats[idx].fit_router(units, config.fill, window=window).to(ref.dtype))
        else:
            init_router_(m.mosa_router)
        if plan.config.routing == "causal":
            m.register_buffer("mosa_threshold", torch.empty(len(units), device=ref.device, dtype=torch.float32))
            init_threshold_(m.mosa_threshold, plan.config.sparsity)

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
