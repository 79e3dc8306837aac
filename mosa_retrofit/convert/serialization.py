"""Save and load converted models.

A converted model saves with ``save(model, dir)`` or its own ``model.save_pretrained(dir)``: standard
safetensors (the base weights under their own names plus ``*.mosa_router``, ``*.mosa_threshold`` and
``*.mosa_fill``) and the MoSA config inside ``config.json`` under ``"mosa"``, with the resolved dense heads of
every layer; the folder declares itself so that stock transformers loads it as itself or refuses it (hub.py).
``save(..., adapter_only=True)`` writes only the MoSA tensors over a fingerprinted base (adapter.py).
``load(dir)`` rebuilds the hybrid model through the stock ``from_pretrained`` (dtype, sharding, device_map keep
working) by re-applying the surgery in ``__init__``; ``load(base_dir, config=...)`` converts on load.

Folders of the first format (the base's model_type, no declaration) still load with ``load``; loaded with plain
transformers they run dense, which transformers' load report (the MoSA tensors listed as unexpected keys) and
``warn_if_dense_load`` name. Importing ``mosa_retrofit`` changes nothing in transformers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from torch import Tensor, nn

from ..text.assets import model_reference, resolve_model
from .attention import init_router_, init_threshold_
from .config import MoSAConfig
from .hub import mosa_model_class, read_config
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


def load(path: str, config: MoSAConfig | None = None, calibration: Tensor | None = None, allow_partial: bool = False,
         **kwargs) -> nn.Module:
    """Load a converted model (a folder or hub id, full or adapter-only), or convert a base model on load.

    Args:
        path: a folder written by ``save_pretrained`` / ``save`` of a converted model, an adapter folder
            (``save(..., adapter_only=True)``: its base is read and checked), or a base checkpoint with ``config``.
        config: convert on load with this config (the checkpoint's own ``mosa`` block is used if omitted).
        calibration: token ids (N, T) for ``router_init='calibrated'`` / ``head_choice='scored'`` on load.
        allow_partial: load a checkpoint that lacks MoSA tensors its block needs, or holds some it does not use
            (an edited or cut-short save): missing routers start at random, fills at zero, thresholds at the
            normal quantile of the sparsity, each named in a warning. Without it such a checkpoint is refused.
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``attn_implementation``, ...).
    """

    from .adapter import is_adapter, load_adapter

    if is_adapter(path):
        if config is not None:
            raise ValueError(f"{path} is an adapter folder: it carries its conversion; load it without config=")
        return load_adapter(path, allow_partial=allow_partial, **kwargs)
    hf_config = read_config(path, **kwargs)
    saved = getattr(hf_config, "mosa", None)
    if config is None and not saved:
        raise ValueError(f"{path} is not a converted MoSA checkpoint (no 'mosa' block in config.json); "
                         "pass config=MoSAConfig(...) to convert it on load")
    if config is not None and not saved:  # convert on load: base weights + new routers
        if config.base_model_name_or_path is None:
            config = dataclasses.replace(config, base_model_name_or_path=model_reference(str(path)))
        model = causal_lm_class(hf_config).from_pretrained(path, **kwargs)
        return convert_(model, config, calibration=calibration)
    return load_saved(path, config=config, allow_partial=allow_partial, hf_config=hf_config, **kwargs)


def causal_lm_class(hf_config) -> type:
    """The transformers causal-LM class of ``hf_config``'s family."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(hf_config) not in mapping:
        raise ValueError(f"{type(hf_config).__name__} has no causal-LM class in transformers")
    return mapping[type(hf_config)]


def load_saved(path: str, model_class: type | None = None, config: MoSAConfig | None = None,
               allow_partial: bool = False, hf_config=None, **kwargs):
    """A saved converted checkpoint, through the stock ``from_pretrained`` of ``model_class`` (default: the
    family's causal LM) with the structure its 'mosa' block describes, its MoSA state checked (``load``)."""
    hf_config = hf_config if hf_config is not None else read_config(path, **kwargs)
    saved = getattr(hf_config, "mosa", None)
    if not saved:
        raise ValueError(f"{path} is not a converted MoSA checkpoint (no 'mosa' block in config.json)")
    model_class = mosa_model_class(model_class or causal_lm_class(hf_config))
    check_stored_dtypes(path)
    if config is not None:
        hf_config.mosa = config.to_dict()
    want_info = kwargs.pop("output_loading_info", False)
    user_ignores = kwargs.pop("ignore_mismatched_sizes", False)
    model, info = model_class._stock_from_pretrained(path, config=hf_config, output_loading_info=True,
                                                     ignore_mismatched_sizes=True, **kwargs)
    wrong = [(name, tuple(saved), tuple(built)) for name, saved, built in sorted(info.get("mismatched_keys", ()))
             if "mosa_" in name or not user_ignores]
    if wrong:
        name, saved, built = wrong[0]
        raise ValueError(f"{path}: {name} has shape {saved} in the checkpoint, the structure in config.json's "
                         f"'mosa' block needs {built}{f' ({len(wrong) - 1} more tensors too)' if len(wrong) > 1 else ''}"
                         "; was the checkpoint or its 'mosa' block (dense_head_ids, ...) edited?")
    check_mosa_state_(model, path, info, allow_partial)
    return (model, info) if want_info else model


_FLOATS = ("F16", "BF16", "F32", "F64")


def check_stored_dtypes(path) -> None:
    """Every MoSA tensor a local checkpoint stores is floating point (an integer router would load truncated)."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: transformers reads the files
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if "mosa_" in key and (dtype := f.get_slice(key).get_dtype()) not in _FLOATS:
                    raise ValueError(f"{path}: {key} is stored as {dtype} in {file.name}; MoSA routers, thresholds "
                                     f"and fills are floating point ({', '.join(_FLOATS)}): the file was edited or "
                                     "written by another tool")


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


def save(model: nn.Module, path, adapter_only: bool = False, tokenizer=None, overwrite: bool = False) -> Path:
    """Write converted ``model`` (and ``tokenizer``) to the folder ``path``, atomically: into a temporary folder
    beside it, renamed into place, so ``path`` holds the old folder or the new one, never half of one.

    ``adapter_only``: only what the conversion added (routers, thresholds, fills, the plan) and the base's
    reference and fingerprint (adapter.py), refused when the base weights changed since conversion (trained
    slices, merged LoRA): such a model saves in full. ``overwrite``: replace a converted model's folder (anything
    else at ``path`` is never touched)."""
    from .adapter import check_unchanged, write_adapter
    from .card import write_card
    from .hub import declare

    if not getattr(model.config, "mosa", None):
        raise ValueError("save: the model is not converted (no config.mosa); convert_ it first, or use its own "
                         "save_pretrained")
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace a converted model's folder, or "
                                  "choose a new path")
        if not _is_converted_folder(path):
            raise FileExistsError(f"{path} exists and is not a converted model's folder (no config.json with a "
                                  "'mosa' block): it is left alone; choose a new path")
    if adapter_only:
        check_unchanged(model)  # before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        if adapter_only:
            write_adapter(model, tmp)
            declare(tmp)
            write_card(tmp, model, adapter=True)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not overwrite:
            try:  # one atomic step: it fails if something was put at path while this ran
                os.rename(tmp, path)
            except OSError:
                keep = path.parent / f"{path.name}.unsaved-{os.getpid()}"
                os.rename(tmp, keep)
                raise FileExistsError(f"{path} appeared while this ran and is left alone; the converted model is in "
                                      f"{keep}") from None
        else:
            if path.exists() and not _is_converted_folder(path):
                raise FileExistsError(f"{path} is no longer a converted model's folder and is left alone")
            old = path.parent / f".{path.name}.old-{os.getpid()}" if path.exists() else None
            if old is not None:
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_converted_folder(path) -> bool:
    from .hub import config_dict

    try:
        return path.is_dir() and bool(config_dict(str(path)).get("mosa"))
    except (OSError, ValueError):
        return False


def load_any(name_or_path: str, **kwargs) -> tuple[nn.Module, str]:
    """(model, resolved source) for a converted checkpoint (``load``) or an original one (plain transformers);
    ``name_or_path`` may also be 'smollm2-135m', the embedded default."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    hf_config = read_config(source)
    if getattr(hf_config, "mosa", None):
        return load(source, **kwargs), source
    if "mosa" in vars(hf_config):  # an emptied or nulled block
        raise ValueError(f"{name_or_path} has an empty 'mosa' block in its config.json ({vars(hf_config)['mosa']!r}), "
                         "so it would run every head dense: restore the 'mosa' block convert or train wrote")
    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    left = sorted(k for k in info.get("unexpected_keys", ()) if "mosa_" in k)
    if left:  # MoSA tensors without a block
        raise ValueError(f"{name_or_path} holds a converted model's tensors ({', '.join(left[:2])}) but no 'mosa' "
                         "block in its config.json, so it would run every head dense: restore the 'mosa' block "
                         "convert or train wrote")
    return model, source
