"""``convert_(model, config)``: turn a pretrained model's attention layers into hybrid MoSA layers, in place, in
three steps that can also be called one by one:

1. ``evidence = gather(model, config, ...)``: what the config needs from the unconverted model, computed once
   (calibration token ids, retrieval scores, head statistics with the router targets of each kind);
2. ``plans = plan_layers(model, config, evidence)``: per layer, the config and the heads it resolves (which stay
   dense, which become the sparse kind); everything is validated here, before the model is touched;
3. ``apply_plan_(model, plans, evidence)``: swap each layer's class, create the parameters its kinds own, and
   fit them from the evidence (routers, fills, thresholds); without evidence (loading a checkpoint, resuming)
   the parameters are left for the checkpoint to fill.

The resolved per-layer dense heads are written back into ``model.config.mosa``, so a saved checkpoint plans
exactly the same structure again without any evidence.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..text.assets import model_reference
from ..validate import positions_of
from .adapter import record_base_
from .attention import LayerPlan, mosa_class
from .calibration import LayerStats, collect_stats, default_calibration, model_tokenizer
from .card import write_card
from .config import MoSAConfig
from .costs import attention_costs, ratios
from .families import attention_layers, dense_kv_layout, family_of, mosa_layers
from .heads import HEAD_GROUPS
from .hub import declare
from .retrieval import default_retrieval_prompts, retrieval_scores
from .thresholds import calibrate_thresholds_, threshold_rows

logger = logging.getLogger("mosa_retrofit")


@dataclass
class Evidence:
    """What planning and fitting read from the unconverted model."""

    calibration: Tensor | None = None  # (N, T) calibration token ids (causal thresholds are set on them)
    stats: dict[int, LayerStats] | None = None  # head statistics per layer (scores, router targets, fills)
    retrieval: dict[int, Tensor] | None = None  # (H,) retrieval scores per layer


def _selected(model: nn.Module, config: MoSAConfig, filter_fn) -> dict[int, nn.Module]:
    """The attention modules ``config`` (and ``filter_fn``) convert, by layer index."""
    family = family_of(model)
    layers = attention_layers(model, family)
    return {idx: m for idx, (name, m) in sorted(layers.items())
            if config.converts_layer(idx, family.sliding_window(m)) and (filter_fn is None or filter_fn(m, name))}


def _windows(config: MoSAConfig, family, modules: dict[int, nn.Module]) -> dict[int, int | None]:
    """Per layer, the window whose far attention calibrated routers fit (None: the kind's routers fit no window)."""
    kind = HEAD_GROUPS[config.sparse_heads]
    if not (kind.routed and kind.far_router):
        return {idx: None for idx in modules}
    return {idx: kind.window_for(config, family.sliding_window(m)) for idx, m in modules.items()}


def gather(model: nn.Module, config: MoSAConfig, calibration: Tensor | None = None, tokenizer=None,
           stats: dict[int, LayerStats] | None = None, retrieval: dict[int, Tensor] | None = None,
           filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = True) -> Evidence:
    """Everything ``config`` needs from the unconverted ``model``, each computed once: calibration text (the
    embedded Wikipedia text tokenised with ``tokenizer`` when the config needs text and none is given),
    retrieval scores (head_choice='retrieval'), head statistics (scored heads, calibrated routers, mean fills;
    one pass that also accumulates the far-attention targets of key-selection routers). ``stats`` and
    ``retrieval`` from an earlier call are reused (a sweep)."""
    if calibration is not None and (not isinstance(calibration, Tensor) or calibration.dim() != 2):
        raise ValueError(f"calibration must be a (N, T) tensor of token ids, got {getattr(calibration, 'shape', calibration)}")
    family = family_of(model)
    modules = _selected(model, config, filter_fn)
    kind = HEAD_GROUPS[config.sparse_heads]
    fitted = (config.fill == "mean" and kind.fills) or (kind.routed and config.router_init == "calibrated")
    scored = config.head_choice == "scored"
    if (scored or fitted) and calibration is None and stats is None:
        calibration = default_calibration(model, tokenizer)
    keeps_some = config.dense_heads or any(config.dense_heads_pattern.values()) or config.dense_head_ids
    if config.head_choice == "retrieval" and retrieval is None and keeps_some:  # (none kept: nothing to rank)
        length = min(1024, positions_of(model.config) or 1024)
        prompts = default_retrieval_prompts(model_tokenizer(model, tokenizer), length=length)
        retrieval = retrieval_scores(model, prompts, list(modules), progress)
    windows = tuple(sorted({w for w in _windows(config, family, modules).values() if w is not None}))
    lacking = stats is None or any(i not in stats or any(w not in stats[i].xtz_far for w in windows) for i in modules)
    if (scored or fitted) and lacking and (stats is None or calibration is not None):  # (given stats that lack
        # layers and no text to complete them: convert_ says which layers)
        stats = collect_stats(model, calibration, modules, progress, sparsities=(config.sparsity,) if scored else (),
                              include_first=config.include_first, fills=(config.fill,), windows=windows)
    return Evidence(calibration, stats, retrieval)


def plan_layers(model: nn.Module, config: MoSAConfig, evidence: Evidence | None = None,
                filter_fn: Callable[[nn.Module, str], bool] | None = None,
                notes: list[str] | None = None) -> dict[int, LayerPlan]:
    """Per converted layer, the config and which heads stay dense and which become the sparse kind (validates
    everything). ``evidence.stats`` scores heads for ``head_choice='scored'``, ``evidence.retrieval`` for
    ``head_choice='retrieval'``; a config whose layers all name their dense heads (``dense_head_ids``, as a
    saved checkpoint's does) needs no evidence.

    ``notes`` (if given) receives one line per adjustment a user should know of: a dense count rounded up to
    whole KV groups, or layers whose dense heads split a KV group (their MoSA heads then route one by one).
    """
    family = family_of(model)
    layers = attention_layers(model, family)
    _check_layer_names(model, config, layers)
    plans, rounded, split = {}, {}, []
    stats, retrieval = (evidence.stats, evidence.retrieval) if evidence is not None else (None, None)
    selected = _selected(model, config, filter_fn)
    named = all(str(idx) in config.dense_head_ids for idx in selected)  # a saved, resolved block
    ranked = config.dense_scope == "model" and config.head_choice in ("scored", "retrieval") and not named
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
        _check_softcap(config, family, m, dense, mosa)
        if mosa:  # (every head dense: the layer is left as it is)
            plans[idx] = LayerPlan(config, tuple(dense), tuple(mosa), granularity, G)
    if notes is not None:
        notes += _plan_notes(rounded, split)
    return plans


def _check_layer_names(model: nn.Module, config: MoSAConfig, layers: dict) -> None:
    """The layers the config names exist in the model."""
    if not layers:
        raise ValueError(f"no attention modules found in {type(model).__name__}")
    unknown = sorted(int(k) for k in config.dense_head_ids if int(k) not in layers)
    if unknown:
        raise ValueError(f"MoSAConfig.dense_head_ids names layers {unknown}; the model has layers 0..{max(layers)}")
    if isinstance(config.layers, list) and any(i not in layers for i in config.layers):
        bad = [i for i in config.layers if i not in layers]
        raise ValueError(f"MoSAConfig.layers names layers {bad}; the model has layers 0..{max(layers)}")


def _check_softcap(config: MoSAConfig, family, m: nn.Module, dense: list, mosa: list) -> None:
    """Attention logit soft-capping (Gemma2) only with head kinds that apply it."""
    for field, heads in (("kept_heads", dense), ("sparse_heads", mosa)):
        kind = getattr(config, field)
        if heads and not HEAD_GROUPS[kind].softcap and family.softcap(m) is not None:
            able = [k for k, cls in HEAD_GROUPS.items() if cls.softcap and getattr(cls, "keeps" if field ==
                    "kept_heads" else "replaces")]
            raise ValueError(f"{field}={kind!r} does not support attention logit soft-capping (Gemma2); use one "
                             f"of {able}")


def _plan_notes(rounded: dict, split: list) -> list[str]:
    """What the plan changed from what was asked: dense counts rounded up to whole KV groups, split groups."""
    notes = []
    for (asked, n, G), idxs in rounded.items():
        notes.append(f"dense heads rounded up from {asked} to {n} (whole KV groups of {G} query heads) in "
                     f"{_layer_list(idxs)}, so the KV cache holds each K/V row once; "
                     "router_granularity='head' keeps the count as asked")
    if split:
        notes.append(f"{_layer_list(split)}: the dense heads split a KV group, so the MoSA heads there route "
                     "one by one (router_granularity='head') and each caches its own K/V copy; dense heads in "
                     "whole KV groups shrink the cache more")
    return notes


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
    if n == 0:
        return []
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
    shapes = {idx: family.dims(m)[:2] for idx, m in modules.items()}  # {layer: (H, KV)}
    unit = {idx: H // KV if config.router_granularity == "kv_group" else 1 for idx, (H, KV) in shapes.items()}
    total = int(round(sum(config.dense_count(idx, H) / unit[idx] for idx, (H, _) in shapes.items())))
    placed = {idx: [] for idx in modules}
    if total == 0:  # nothing kept dense: nothing to rank (no scores needed)
        return placed
    units = []
    for idx, (_, KV) in shapes.items():
        G = unit[idx]
        score = _scores(config, stats, retrieval, idx, KV, "kv_group" if G > 1 else "head")
        units += [(float(v), idx, [u * G + h for h in range(G)]) for u, v in enumerate(score)]
    units.sort(key=lambda t: -t[0])
    for _, idx, heads in units[:max(total, _large_count([u[0] for u in units], config.dense_share))]:
        placed[idx] += heads
    return {idx: sorted(h) for idx, h in placed.items()}


def _large_count(scores: list[float], share: float) -> int:
    """How many of ``scores`` (descending) are at least ``share`` of their sum (0: none), leaving one out."""
    total = sum(max(v, 0.0) for v in scores)
    if share <= 0 or total <= 0:
        return 0
    return min(sum(v >= share * total for v in scores), len(scores) - 1)


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
    positions = positions_of(model.config)
    if config.routed and isinstance(positions, int) and config.sparsity > positions:
        raise ValueError(f"MoSAConfig.sparsity={config.sparsity:g} routes less than one token per sequence of the "
                         f"model's {positions} positions; use a sparsity in 1..{positions}")


def apply_plan_(model: nn.Module, plans: dict[int, LayerPlan], evidence: Evidence | None = None) -> nn.Module:
    """Put ``plans`` in place: each planned layer gets the MoSA attention class and the parameters its kinds own
    (``mosa_router``, ``mosa_threshold``, ``mosa_fill``); with ``evidence`` they are fitted (calibrated routers,
    mean fills, causal thresholds on its calibration text), without it they keep their initial values for a
    checkpoint to fill. Writes the resolved block into ``model.config.mosa``."""
    if not plans:
        return model
    family = family_of(model)
    layers = attention_layers(model, family)
    config = next(iter(plans.values())).config
    stats = evidence.stats if evidence is not None else None
    windows = _windows(config, family, {i: layers[i][1] for i in plans})
    for idx, plan in plans.items():
        _, m = layers[idx]
        weights = family.head_weights(m)
        m.__class__ = mosa_class(type(m))
        m.mosa_family, m.mosa_plan = family, plan
        if plan.dense:  # what the attention backend repeats the kept heads' K/V by
            m.num_key_value_groups = dense_kv_layout(plan.dense, weights.num_heads, weights.num_kv_heads)[1]
        for group in m.mosa_groups:  # each kind makes (and fits) what it owns
            group.own(m, weights, stats.get(idx) if stats is not None else None, windows[idx])
    if evidence is not None and config.routing == "causal" and evidence.calibration is not None:
        positions = positions_of(model.config)
        calibrate_thresholds_(model, threshold_rows(evidence.calibration, config.threshold_length, positions))
    if evidence is not None and config.routing == "causal":
        model.config.mosa_thresholds_for = config.sparsity  # what the thresholds route (checked on load)
    resolved = dataclasses.replace(config, dense_head_ids={str(i): list(p.dense) for i, p in plans.items()},
                                   layers=sorted(plans))
    model.config.mosa = resolved.to_dict()
    model.mosa_targets = [layers[i][0] for i in plans]
    if isinstance(model, PreTrainedModel):  # saves a declared folder, loads through mosa_retrofit.load (hub.py)
        model.__class__ = mosa_model_class(type(model))
    return model


def rebuild_(model: nn.Module, config: MoSAConfig) -> nn.Module:
    """The structure a saved (resolved) ``config`` describes, applied to ``model`` with nothing fitted: its plan
    names every layer's dense heads, so planning needs no evidence; the weights come from the checkpoint."""
    return apply_plan_(model, plan_layers(model, config))


@functools.lru_cache(maxsize=None)
def mosa_model_class(base_cls: type) -> type:
    """``base_cls`` as a converted model's class (``apply_plan_`` gives a converted model this class): its
    ``__init__`` re-applies the surgery ``config.mosa`` describes, ``save_pretrained`` declares the folder
    (hub.py) and writes its card (card.py), ``push_to_hub`` uploads that folder as it is.

    The class keeps the base's name and module: transformers looks its checkpoint conversions up by class name and
    model_type and skips them for custom code (GPT-NeoX's embed_out -> lm_head), and isinstance checks hold."""
    if getattr(base_cls, "_mosa_loader", False):
        return base_cls

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        rebuild_(self, MoSAConfig.from_dict(config.mosa))

    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing: the folder's code is written by ``save_pretrained`` (a class marked as remote code would lose
        transformers' checkpoint conversions)."""

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported for a MoSA model: call "
                             "model.push_to_hub(repo_id), which uploads the saved folder as it is")
        super(loader, self).save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            declare(Path(save_directory))
            write_card(Path(save_directory), structure_of(self))

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token=None, max_shard_size="50GB", create_pr: bool = False, revision: str | None = None,
                    commit_description: str | None = None, **kwargs):
        """Upload the folder ``save_pretrained`` writes (weights, declared config, modeling_mosa.py, the model card)
        as it is: the stock method would replace the card with a generic one."""
        from transformers.utils.hub import hf_api

        if kwargs:
            raise TypeError(f"push_to_hub got unexpected arguments {sorted(kwargs)}")
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size)
            return self._upload_modified_files(tmp, repo_id, files_timestamps={},
                                               commit_message=commit_message or "Upload MoSA model",
                                               token=token, create_pr=create_pr, revision=revision,
                                               commit_description=commit_description)

    loader = type(base_cls.__name__, (base_cls,), {
        "__init__": __init__, "_mosa_loader": True, "__module__": base_cls.__module__,
        "__qualname__": base_cls.__qualname__,
        "register_for_auto_class": classmethod(register_for_auto_class),
        "save_pretrained": save_pretrained, "push_to_hub": push_to_hub})
    return loader


def meta_twin(model: nn.Module) -> nn.Module:
    """The converted structure ``model.config`` describes, on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(model.config)
    return rebuild_(twin, MoSAConfig.from_dict(model.config.mosa))


def structure_of(model: nn.Module) -> nn.Module:
    """``model``, or (its weights sharded over processes, FSDP) its ``meta_twin``: what cost tables and cards
    read without gathering a weight."""
    return meta_twin(model) if any(type(p).__name__ == "DTensor" for p in model.parameters()) else model


def _reference(model: nn.Module) -> str | None:
    """Where ``model`` was loaded from (a folder as its absolute path, a hub id as given), if transformers says."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return model_reference(name) if name else None


def check_inputs(model: nn.Module, config: MoSAConfig, calibration) -> None:
    """What ``convert_`` reads besides the config: weights that exist, and calibration token ids of the model's
    vocabulary (one line naming the bad value, before any work)."""
    if config.needs_calibration and any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are on the meta device (a structure without weights): this config "
                         "fits dense heads, routers or fills on the model's own attention, so load the weights "
                         "first (from_pretrained), or convert with MoSAConfig.paper() which needs none")
    if calibration is None:
        return
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.dtype.is_floating_point \
            or calibration.dtype == torch.bool or calibration.dtype.is_complex:
        what = (f"a {calibration.dim()}-d {calibration.dtype} tensor" if isinstance(calibration, Tensor)
                else type(calibration).__name__)
        raise ValueError(f"calibration must be integer token ids of shape (sequences, tokens), got {what}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if calibration.numel() == 0 or int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
        found = "no tokens" if calibration.numel() == 0 else \
            f"ids from {int(calibration.min())} to {int(calibration.max())}"
        raise ValueError(f"calibration must hold token ids in 0..{vocab - 1} (the model's vocabulary), got {found}")
    positions = positions_of(model.config)
    if positions is not None and calibration.shape[1] > positions:
        raise ValueError(f"calibration rows hold {calibration.shape[1]:,} tokens, beyond the model's {positions:,} "
                         f"positions; give rows of at most {positions:,} tokens")


def convert_(model: nn.Module, config: MoSAConfig | None = None, calibration: Tensor | None = None,
             filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = True,
             stats: dict[int, LayerStats] | None = None, tokenizer=None,
             retrieval: dict[int, Tensor] | None = None, checked: bool = False) -> nn.Module:
    """Convert ``model``'s attention to hybrid MoSA in place and return it: ``check_config``, ``gather``,
    ``plan_layers``, ``apply_plan_`` (see the module docstring).

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
        checked: the caller has run ``check_config(model, config, filter_fn)`` on this model already (as the CLI
            does before its own work): the structural check is not planned a second time.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        >>> convert_(model, MoSAConfig(sparsity=8, dense_heads=3))   # calibrates on the embedded text
        >>> convert_(model, MoSAConfig.paper())                        # the paper's conversion, no calibration
    """
    config = MoSAConfig() if config is None else config
    if not isinstance(config, MoSAConfig):
        raise TypeError(f"config must be a MoSAConfig, got {type(config).__name__}")
    family_of(model)
    if not checked:
        check_config(model, config, filter_fn)  # before any calibration work
    check_inputs(model, config, calibration)
    evidence = gather(model, config, calibration, tokenizer, stats, retrieval, filter_fn, progress)
    notes: list[str] = []
    plans = plan_layers(model, config, evidence, filter_fn, notes)  # raises before anything is modified
    for note in notes:
        logger.warning("mosa_retrofit: %s", note)
    missing = [i for i in plans if evidence.stats is not None and i not in evidence.stats]
    if missing:
        raise ValueError(f"stats lack layers {missing} that this config converts")
    record_base_(model, config.base_model_name_or_path or _reference(model))
    apply_plan_(model, plans, evidence)
    ratio = ratios(attention_costs(model, 8192)).kv_bytes
    if ratio >= 1:
        logger.warning("mosa_retrofit: this layout caches %.2fx the original's KV bytes at T = 8192 (it will "
                       "not shrink the cache): under GQA keep whole KV groups dense and route per group "
                       "(router_granularity='kv_group')", ratio)
    return model
