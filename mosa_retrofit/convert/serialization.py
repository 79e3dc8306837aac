"""Save and load converted models.

A converted model saves with the stock ``model.save_pretrained(dir)``: standard safetensors (the base
weights under their own names plus ``*.mosa_router`` and ``*.mosa_fill``) and the MoSA config inside ``config.json`` under
``"mosa"``, with the resolved dense heads of every layer. ``load(dir)`` rebuilds the hybrid model through
the stock ``from_pretrained`` (dtype, sharding, device_map keep working) by re-applying the surgery in
``__init__``. ``load(base_dir, config=...)`` converts on load.

Loading a converted checkpoint with plain ``AutoModelForCausalLM.from_pretrained`` runs it dense: the routers
are dropped. Importing ``mosa_retrofit`` changes nothing in transformers, so what says so is transformers'
own load report (the routers, fills and thresholds listed as unexpected keys) and ``warn_if_dense_load``,
which ``load_any`` (the CLI's loader) and any caller can run on a loaded model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

from torch import Tensor, nn

from ..text.assets import model_reference, resolve_model
from .attention import init_router_, init_threshold_
from .config import MoSAConfig
from .surgery import apply_plan_, convert_, plan_layers

logger = logging.getLogger("mosa_retrofit")

DENSE_LOAD_WARNING = (
    "this checkpoint was converted to MoSA by mosa_retrofit (config.json has a 'mosa' block), but it is being "
    "loaded as a plain dense model: the MoSA routers are dropped and every head runs dense. "
    "Load it with mosa_retrofit.load(path) instead."
)


def rebuild_(model: nn.Module, config: MoSAConfig) -> nn.Module:
    """The structure a saved (resolved) ``config`` describes, applied to ``model`` with nothing fitted: its plan
    names every layer's dense heads, so planning needs no evidence; the weights come from the checkpoint."""
    return apply_plan_(model, plan_layers(model, config))


@functools.lru_cache(maxsize=None)
def _mosa_model_class(base_cls: type) -> type:
    """The base model class, with an ``__init__`` that re-applies the surgery from ``config.mosa``."""

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        rebuild_(self, MoSAConfig.from_dict(config.mosa))

    # The loader class keeps the base's name and module: transformers looks its checkpoint conversions up by
    # class name / model_type and skips them for classes outside transformers (GPT-NeoX's embed_out -> lm_head).
    return type(base_cls.__name__, (base_cls,), {"__init__": __init__, "_mosa_loader": True,
                                                  "__module__": base_cls.__module__,
                                                  "__qualname__": base_cls.__qualname__})


def load(path: str, config: MoSAConfig | None = None, calibration: Tensor | None = None, allow_partial: bool = False,
         **kwargs) -> nn.Module:
    """Load a converted model (a folder or hub id), or convert a base model on load.

    Args:
        path: a folder written by ``save_pretrained`` of a converted model, or a base checkpoint with ``config``.
        config: convert on load with this config (the checkpoint's own ``mosa`` block is used if omitted).
        calibration: token ids (N, T) for ``router_init='calibrated'`` / ``head_choice='scored'`` on load.
        allow_partial: load a checkpoint that lacks MoSA tensors its block needs, or holds some it does not use
            (an edited or cut-short save): missing routers start at random, fills at zero, thresholds at the
            normal quantile of the sparsity, each named in a warning. Without it such a checkpoint is refused.
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``attn_implementation``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    saved = getattr(hf_config, "mosa", None)
    if config is None and not saved:
        raise ValueError(f"{path} is not a converted MoSA checkpoint (no 'mosa' block in config.json); "
                         "pass config=MoSAConfig(...) to convert it on load")
    mapping = AutoModelForCausalLM._model_mapping
    if type(hf_config) not in mapping:
        raise ValueError(f"{type(hf_config).__name__} has no causal-LM class in transformers")
    base_cls = mapping[type(hf_config)]
    if config is not None and not saved:  # convert on load: base weights + new routers
        if config.base_model_name_or_path is None:
            config = dataclasses.replace(config, base_model_name_or_path=model_reference(str(path)))
        model = base_cls.from_pretrained(path, **kwargs)
        return convert_(model, config, calibration=calibration)
    if config is not None:
        hf_config.mosa = config.to_dict()
    user_ignores = kwargs.pop("ignore_mismatched_sizes", False)
    model, info = _mosa_model_class(base_cls).from_pretrained(path, config=hf_config, output_loading_info=True,
                                                             ignore_mismatched_sizes=True, **kwargs)
    wrong = [(name, tuple(saved), tuple(built)) for name, saved, built in sorted(info.get("mismatched_keys", ()))
             if "mosa_" in name or not user_ignores]
    if wrong:
        name, saved, built = wrong[0]
        raise ValueError(f"{path}: {name} has shape {saved} in the checkpoint, the structure in config.json's "
                         f"'mosa' block needs {built}{f' ({len(wrong) - 1} more tensors too)' if len(wrong) > 1 else ''}"
                         "; was the checkpoint or its 'mosa' block (dense_head_ids, ...) edited?")
    check_mosa_state_(model, path, info, allow_partial)
    return model


_STARTS = {"mosa_router": "initialised at random", "mosa_fill": "left at zero",
           "mosa_threshold": "set to the normal quantile of the sparsity"}


def check_mosa_state_(model: nn.Module, path: str, info: dict, allow_partial: bool = False) -> None:
    """The MoSA state a checkpoint loaded into ``model`` is the whole state its 'mosa' block describes: every
    router, fill and threshold present and finite, none left over; else one clear error (``allow_partial``:
    missing tensors get defined starting values, each named in a warning; left-over ones are ignored)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if "mosa_" in k)
    unused = sorted(k for k in info.get("unexpected_keys", ()) if "mosa_" in k)

    def names(keys):
        return f"{', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"

    if (missing or unused) and not allow_partial:
        what = []
        if missing:
            what.append(f"lacks {len(missing)} MoSA tensor(s) its 'mosa' block needs ({names(missing)})")
        if unused:
            what.append(f"holds {len(unused)} MoSA tensor(s) its 'mosa' block does not use ({names(unused)})")
        raise ValueError(f"{path} {' and '.join(what)}: its model.safetensors or the 'mosa' block of its "
                         "config.json was edited, or a save was cut short; load the folder convert or train wrote, "
                         "or pass allow_partial=True to start the missing ones afresh")
    if unused:
        logger.warning("%s: MoSA tensors its 'mosa' block does not use, ignored: %s", path, names(unused))
    if missing:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        for name in missing:
            kind = name.rsplit(".", 1)[-1]
            logger.warning("%s: %s missing, %s (allow_partial=True)", path, name, _STARTS.get(kind, "left as built"))
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if kind == "mosa_router":
                init_router_(params[name])
            elif kind == "mosa_fill":
                params[name].data.zero_()
            elif kind == "mosa_threshold":
                init_threshold_(buffers[name], module.mosa_plan.config.sparsity)
    bad = [name for name, t in model.named_parameters() if "mosa_" in name and not t.isfinite().all()]
    # thresholds: -inf routes every token (sparsity 1), anything else must be a number
    bad += [name for name, t in model.named_buffers() if "mosa_" in name and (t.isnan() | (t == float("inf"))).any()]
    if bad:
        raise ValueError(f"{path} holds non-finite MoSA weights ({names(bad)}): the checkpoint was saved from a "
                         "diverged run; use an earlier checkpoint")


def warn_if_dense_load(model: nn.Module) -> bool:
    """Warn (and return True) when ``model`` carries a converted checkpoint's 'mosa' block but runs dense."""
    if getattr(model.config, "mosa", None) and not any(hasattr(m, "mosa_plan") for m in model.modules()):
        logger.warning(DENSE_LOAD_WARNING)
        warnings.warn(DENSE_LOAD_WARNING, UserWarning, stacklevel=2)
        return True
    return False


def load_any(name_or_path: str, **kwargs) -> tuple[nn.Module, str]:
    """(model, resolved source) for a converted checkpoint (``load``) or an original one (plain transformers);
    ``name_or_path`` may also be 'smollm2-135m', the embedded default."""
    from transformers import AutoConfig, AutoModelForCausalLM


    source = resolve_model(name_or_path)
    hf_config = AutoConfig.from_pretrained(source)
    if getattr(hf_config, "mosa", None):
        return load(source, **kwargs), source
    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    left = sorted(k for k in info.get("unexpected_keys", ()) if "mosa_" in k)
    if left or "mosa" in vars(hf_config):  # an emptied or nulled block, or MoSA tensors without one
        raise ValueError(f"{name_or_path} holds a converted model's tensors ({', '.join(left[:2]) or 'none'}) or an "
                         f"empty 'mosa' block in its config.json ({vars(hf_config).get('mosa', 'absent')!r}), so it "
                         "would run every head dense: restore the 'mosa' block convert or train wrote")
    return model, source
