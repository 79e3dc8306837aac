"""Adapter-only checkpoints (PEFT-style): only what a conversion added, and a fingerprint of the base it applies to.

A conversion keeps every base weight as it is and adds a little (routers, causal thresholds, fills): 0.3 MB on
SmolLM2-135M beside its 538 MB of weights. ``convert_`` records the base it converted (``config.mosa_base``:
its reference, hub revision, dtype and a fingerprint of its weights); ``save(model, path, adapter_only=True)``
writes the declared config.json (hub.py) with an ``mosa_adapter`` entry, the MoSA tensors in
``mosa_adapter.safetensors`` and the folder's code and card. ``load(path)`` reads the base by its reference,
refuses a base whose fingerprint differs, re-applies the plan and the tensors: the same model a full save gives.

The fingerprint is a BLAKE2b digest of every base tensor's name, dtype, shape and bytes (the state dict without
the MoSA tensors), taken in the dtype the base was converted in; a model whose base weights changed since (trained
slices, merged LoRA, another dtype) has a different one and saves in full instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .hub import config_dict, declared

ADAPTER_WEIGHTS = "mosa_adapter.safetensors"
FORMAT = 1


def is_mosa_tensor(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("mosa_")


def fingerprint(model: nn.Module) -> str | None:
    """BLAKE2b (128-bit, hex) of the model's base tensors (None when some live on the meta device)."""
    h = hashlib.blake2b(digest_size=16)
    state = model.state_dict()
    for name in sorted(state):
        if is_mosa_tensor(name):
            continue
        t = state[name]
        if t.is_meta:
            return None
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())  # (the tensor's own buffer, not a copy)
    return h.hexdigest()


def weights_dtype(model: nn.Module) -> str | None:
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return str(next(iter(floats))).removeprefix("torch.") if len(floats) == 1 else None


def record_base_(model: nn.Module, reference: str | None) -> None:
    """Note in ``model.config.mosa_base`` which base ``model`` is (before or after conversion: the base tensors are
    the same): its reference, hub revision, dtype and fingerprint."""
    model.config.mosa_base = {"name_or_path": reference, "revision": getattr(model.config, "_commit_hash", None),
                              "dtype": weights_dtype(model), "fingerprint": fingerprint(model)}


def base_mismatch(model: nn.Module, baseline: nn.Module) -> str | None:
    """Why ``baseline`` is not the original ``model`` was converted from (None if it is, or cannot be told):
    a converted baseline, another architecture, or (same dtype) weights whose fingerprint differs."""
    if getattr(baseline.config, "mosa", None):
        return "it is itself a converted model"
    if type(baseline.config).__name__ != type(model.config).__name__:
        return f"it is a {type(baseline.config).__name__} model, the converted one a {type(model.config).__name__}"
    shapes = {k: tuple(v.shape) for k, v in baseline.state_dict().items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not is_mosa_tensor(k)}
    if shapes != own:
        return "its weights have other names or shapes"
    base = getattr(model.config, "mosa_base", None) or {}
    if base.get("fingerprint") and base.get("dtype") == weights_dtype(baseline) \
            and fingerprint(baseline) != base["fingerprint"]:
        return (f"its weights differ from the base the model was converted from ({base.get('name_or_path')}, "
                f"fingerprint {base['fingerprint']})")
    return None


def is_adapter(path) -> bool:
    """Whether ``path`` (a folder or hub id) is an adapter-only save."""
    try:
        return bool(config_dict(str(path)).get("mosa_adapter"))
    except (OSError, ValueError):
        return False


def check_unchanged(model: nn.Module) -> dict:
    """The recorded base of ``model``, refused (naming why, before anything is written) unless the model's base
    tensors are still exactly that base's."""
    base = getattr(model.config, "mosa_base", None)
    if not base or not base.get("fingerprint"):
        raise ValueError("adapter_only: this model carries no fingerprint of its base (converted by an older "
                         "mosa_retrofit, or sharded on the meta device); save it in full (adapter_only=False)")
    now = weights_dtype(model)
    if now != base.get("dtype"):
        raise ValueError(f"adapter_only: the model's weights are {now}, its base was fingerprinted in "
                         f"{base.get('dtype')}; save the adapter before casting, or save in full")
    if fingerprint(model) != base["fingerprint"]:
        raise ValueError(f"adapter_only: the model's base weights differ from the base it was converted from "
                         f"({base.get('name_or_path')}): training changed them (trainable slices, merged LoRA); "
                         "an adapter would drop that change, so save it in full (adapter_only=False)")
    return base


def write_adapter(model: nn.Module, folder: Path) -> None:
    """Into ``folder`` (a fresh temporary folder): the declared config.json marked as an adapter and the MoSA
    tensors, of a model ``check_unchanged`` passed (``serialization.save`` checks before it writes anything)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if is_mosa_tensor(k)}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt", "mosa_adapter": str(FORMAT)})
    d = declared(model.config.to_dict())
    d["mosa_adapter"] = {"format": FORMAT, "weights": ADAPTER_WEIGHTS, "tensors": len(tensors)}
    (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
