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
import functools
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import atomic_folder
from ..text.assets import model_reference, resolve_model
from .adapter import ADAPTER_WEIGHTS, FORMAT, check_unchanged, fingerprint, is_adapter, is_mosa_tensor, write_adapter
from .card import write_card
from .config import MoSAConfig
from .hub import HUB_KWARGS, check_code, config_dict, declare, read_config
from .surgery import convert_, mosa_model_class, rebuild_

logger = logging.getLogger("mosa_retrofit")

DENSE_LOAD_WARNING = (
    "this checkpoint was converted to MoSA by mosa_retrofit (config.json has a 'mosa' block), but it is being "
    "loaded as a plain dense model: the MoSA routers are dropped and every head runs dense. "
    "Load it with mosa_retrofit.load(path) instead."
)


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
    routed_for = getattr(hf_config, "mosa_thresholds_for", None)
    if config is None and isinstance(saved, dict) and saved.get("routing") == "causal" and routed_for is not None \
            and saved.get("sparsity") != routed_for:
        raise ValueError(f"{path}: its 'mosa' block says sparsity {saved.get('sparsity')}, but its thresholds were "
                         f"set to route 1 token in {routed_for:g}: was the block edited? Set sparsity back to "
                         f"{routed_for:g}, or set new thresholds (mosa_retrofit.convert.thresholds.make_causal_)")
    if config is not None:
        hf_config.mosa = config.to_dict()
    want_info = kwargs.pop("output_loading_info", False)
    user_ignores = kwargs.pop("ignore_mismatched_sizes", False)
    model, info = model_class.from_pretrained(path, config=hf_config, output_loading_info=True,
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
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name in missing:  # the kind that owns the tensor starts it afresh
            owner, own = name.rsplit(".", 1)
            module = model.get_submodule(owner)
            done = next((d for g in module.mosa_groups if (d := g.restart(module, own, tensors[name]))), None)
            logger.warning("%s: %s missing, %s (allow_partial=True)", path, name, done or "left as built")
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
    publish = functools.partial(_publish, overwrite=overwrite)
    with atomic_folder(path, prefix=f".{path.name}.tmp-{os.getpid()}-", publish=publish) as tmp:
        if adapter_only:
            write_adapter(model, tmp)
            declare(tmp)
            write_card(tmp, model, adapter=True)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Put the finished folder ``tmp`` at ``path``: by one rename that fails if something appeared there meanwhile
    (kept aside as ``NAME.unsaved-PID``, said), or with ``overwrite`` over a converted model's folder only."""
    if not overwrite:
        try:
            os.rename(tmp, path)
        except OSError:
            keep = path.parent / f"{path.name}.unsaved-{os.getpid()}"
            os.rename(tmp, keep)
            raise FileExistsError(f"{path} appeared while this ran and is left alone; the converted model is in "
                                  f"{keep}") from None
        return
    if path.exists() and not _is_converted_folder(path):
        raise FileExistsError(f"{path} is no longer a converted model's folder and is left alone")
    old = path.parent / f".{path.name}.old-{os.getpid()}" if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def _is_converted_folder(path) -> bool:
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


def load_adapter(path, allow_partial: bool = False, **kwargs) -> nn.Module:
    """The converted model an adapter folder describes: its base read by reference (``kwargs`` such as
    ``device_map`` and ``attn_implementation`` pass to that load; ``dtype`` casts after the check), the
    fingerprint checked, the plan and the MoSA tensors applied."""
    from safetensors.torch import load_file

    d = config_dict(str(path), **kwargs)
    meta = d["mosa_adapter"]
    if int(meta.get("format", 0)) > FORMAT:
        raise ValueError(f"{path}: adapter format {meta.get('format')} is newer than this mosa_retrofit reads "
                         f"({FORMAT}); upgrade mosa_retrofit")
    base = d.get("mosa_base") or {}
    ref = base.get("name_or_path")
    if not ref:
        raise ValueError(f"{path}: the adapter names no base model (config.json's mosa_base.name_or_path)")
    try:
        source = resolve_model(ref)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: its base model {ref} is not found ({e}); put the base there, or load a "
                                "full save") from None
    want = kwargs.pop("dtype", None)
    for k in HUB_KWARGS:
        kwargs.pop(k, None)  # they address the adapter, not its base
    hub = {"revision": base["revision"]} if base.get("revision") and not Path(source).is_dir() else {}
    base_config = read_config(source, **hub)
    if getattr(base_config, "mosa", None):
        raise ValueError(f"{path}: its base {ref} is itself a converted model; an adapter applies to an original")
    dtype = getattr(torch, base["dtype"]) if base.get("dtype") else None
    model = causal_lm_class(base_config).from_pretrained(source, dtype=dtype, **hub, **kwargs)
    found = fingerprint(model)
    if found != base.get("fingerprint"):
        raise ValueError(f"{path} was converted from a different base: {ref} now has weights with fingerprint "
                         f"{found}, the adapter was made for {base.get('fingerprint')} ({base.get('dtype')}); "
                         "load the base it was made from, or a full save")
    rebuild_(model, MoSAConfig.from_dict(d["mosa"]))
    weights = Path(path) / meta.get("weights", ADAPTER_WEIGHTS) if Path(path).is_dir() else _hub_file(path, meta)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    info = {"missing_keys": [k for k in missing if is_mosa_tensor(k)], "unexpected_keys": list(unexpected)}
    check_mosa_state_(model, str(path), info, allow_partial)
    model.config.mosa_base = base
    if d.get("mosa_check") is not None:
        model.config.mosa_check = d["mosa_check"]
    if want is not None and want != "auto":
        model.to(getattr(torch, want) if isinstance(want, str) else want)
    return model.eval()


def _hub_file(repo: str, meta: dict) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, meta.get("weights", ADAPTER_WEIGHTS))


def remote_classes(base_model_type: str, code_version: int, written_by: str):
    """(config, causal-LM, base-model) classes for a folder's modeling_mosa.py: what ``trust_remote_code`` loads
    (hub.py). Their ``from_pretrained`` is ``load``; the folder's code is checked against this package first."""
    check_code(code_version, written_by)
    return _remote_classes(base_model_type)


@functools.lru_cache(maxsize=None)
def _remote_classes(base_model_type: str):
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if base_model_type not in CONFIG_MAPPING:
        raise ImportError(f"base model type {base_model_type!r} is not known to this transformers")
    base_config = CONFIG_MAPPING[base_model_type]
    # Only Auto* sees these classes: the config to find the model class (its own name, so that an Auto class the
    # folder does not map refuses it instead of building its base dense), the model classes to call load, which
    # reads the folder with the base's own config class.
    config_cls = type("MoSAConfig", (base_config,), {"model_type": "mosa_" + base_model_type, "__module__": __name__})

    def remote(base_cls):
        loader = mosa_model_class(base_cls)

        def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
            if model_args:
                raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments")
            for k in ("config", "trust_remote_code", "adapter_kwargs", "_from_auto"):
                kwargs.pop(k, None)  # the folder's config.json describes the structure; Auto* passes its copy
            if is_adapter(pretrained_model_name_or_path):  # the base read and checked, the adapter applied
                model = load_adapter(pretrained_model_name_or_path, **kwargs)
                return model if isinstance(model, loader) else model.base_model
            return load_saved(pretrained_model_name_or_path, model_class=loader, **kwargs)

        return type(loader.__name__, (loader,), {"config_class": config_cls, "__module__": loader.__module__,
                                                 "__qualname__": loader.__qualname__,
                                                 "from_pretrained": classmethod(from_pretrained)})

    return (config_cls, remote(AutoModelForCausalLM._model_mapping[base_config]),
            remote(AutoModel._model_mapping[base_config]))
