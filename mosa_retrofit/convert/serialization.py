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

from ..text.assets import resolve_model
from .attention import init_router_
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


def load(path: str, config: MoSAConfig | None = None, calibration: Tensor | None = None, **kwargs) -> nn.Module:
    """Load a converted model (a folder or hub id), or convert a base model on load.

    Args:
        path: a folder written by ``save_pretrained`` of a converted model, or a base checkpoint with ``config``.
        config: convert on load with this config (the checkpoint's own ``mosa`` block is used if omitted).
        calibration: token ids (N, T) for ``router_init='calibrated'`` / ``head_choice='scored'`` on load.
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
            config = dataclasses.replace(config, base_model_name_or_path=str(path))
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
    missing = info.get("missing_keys", [])
    missing_fill = [k for k in missing if k.endswith("mosa_fill")]
    if missing_fill:
        logger.warning("fills missing from %s, left at zero: %s", path, missing_fill)
        for name, p in model.named_parameters():
            if name in missing_fill:
                p.data.zero_()
    missing_routers = [k for k in missing if k.endswith("mosa_router")]
    if missing_routers:
        logger.warning("routers missing from %s, initialised at random: %s", path, missing_routers)
        for name, p in model.named_parameters():
            if name in missing_routers:
                init_router_(p)
    bad = [name for name, t in model.named_parameters() if "mosa_" in name and not t.isfinite().all()]
    bad += [name for name, t in model.named_buffers() if "mosa_" in name and t.isnan().any()]  # -inf: pass all
    if bad:
        raise ValueError(f"{path} holds non-finite MoSA weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                         "the checkpoint was saved from a diverged run; use an earlier checkpoint")
    return model


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
    if getattr(AutoConfig.from_pretrained(source), "mosa", None):
        return load(source, **kwargs), source
    return AutoModelForCausalLM.from_pretrained(source, **kwargs), source
