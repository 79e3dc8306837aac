"""Training checkpoints: written atomically, found, pruned.

A checkpoint is a folder ``checkpoint-<global step>`` with
  * ``model.safetensors``: the whole training model (student, with LoRA adapters when a LoRA stage is open),
  * ``optimizer.pt`` and ``scheduler.pt`` of the open stage,
  * or, for a model sharded with FSDP, ``sharded/``: a torch.distributed.checkpoint folder of model and
    optimizer shards written by every process (with ``scheduler.pt`` beside it),
  * ``rng-<rank>.pt``: Python, NumPy and torch RNG states of every process,
  * ``state.json``: stage, step within the stage, samples consumed, elapsed time, metrics so far,
  * ``manifest.json``, written last: the size and SHA-256 of every other file.
Every process writes into ``.tmp-checkpoint-<step>``; the main process then renames it (atomic on POSIX),
so a run killed at any point loses at most the steps since the last checkpoint. Stale temporary folders are
removed by the next save. A checkpoint damaged after it was written (a truncated or missing file, a full
disk, a copy gone wrong) fails its manifest: ``usable`` skips it for the newest intact one, and the run
resumed from there ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import replace_folder
from . import sharding

_NAME = re.compile(r"checkpoint-(\d+)$")
MANIFEST = "manifest.json"
logger = logging.getLogger("mosa_retrofit")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and SHA-256 of every file in ``folder`` (written last, flushed to disk)."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def problem(path: Path, legacy: bool = False) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is complete and intact:
    every file its manifest lists is present with its size and hash, and the state parses. ``legacy``: the
    run was written before manifests existed; then the files every resume reads must be present (a missing
    optimizer is caught when it is needed, by ``load_training``)."""
    manifest = path / MANIFEST
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, entry in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != entry["bytes"]:
                return f"{name} has {f.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}"
            if _sha256(f) != entry["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
    elif not legacy:
        return f"{MANIFEST} is missing (written last: the checkpoint is incomplete or was altered)"
    for name in ("state.json", "rng-0.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    if not (path / "model.safetensors").is_file() and not is_sharded(path):
        return "model.safetensors is missing"
    try:
        read_state(path)["step"]
    except (ValueError, KeyError, TypeError):
        return "state.json is unreadable"
    return None


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint ``path`` holds a sharded (FSDP) model."""
    return (path / "sharded" / ".metadata").is_file()


def usable(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest intact checkpoint under ``root`` or None if there is none, [(newer damaged checkpoint,
    why)]). Raises if checkpoints exist but none is intact."""
    found, damaged = checkpoints(root), []
    legacy = not any((p / MANIFEST).exists() for p in found)  # a run written before manifests existed
    for path in reversed(found):
        why = problem(path, legacy)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    if damaged:
        raise ValueError(f"no usable checkpoint in {root}: " + "; ".join(f"{p.name}: {w}" for p, w in damaged)
                         + "; start a new run in another output_dir")
    return None, []


def set_aside(damaged: list[tuple[Path, str]]) -> None:
    """Rename damaged checkpoints to ``damaged-checkpoint-<step>``: kept for a look, never resumed from, never
    counted by ``keep_last`` (so a damaged folder cannot push out an intact one)."""
    for path, why in damaged:
        target = path.with_name("damaged-" + path.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
        logger.warning("%s is damaged (%s): moved to %s, resuming from an earlier checkpoint", path, why,
                       target.name)


def save(accelerator, root: str | Path, step: int, model: nn.Module, optimizer, scheduler, state: dict,
         keep_last: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (collective: every process must call it)."""
    from safetensors.torch import save_model

    root = Path(root)
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    main = accelerator.is_main_process
    if main:
        for stale in [*root.glob(".tmp-checkpoint-*"), *root.glob(".old-checkpoint-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # (what a SIGKILL, which nothing can catch, left)
        tmp.mkdir(parents=True)
    try:
        accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        sharded = sharding.is_sharded(model)
        if sharded:
            sharding.save_sharded(tmp / "sharded", model, optimizer)
        if main:
            if not sharded:
                save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
            if optimizer is not None:
                if not sharded:
                    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        accelerator.wait_for_everyone()
        if main:
            write_manifest(tmp)
            replace_folder(tmp, final)  # (a stage end may re-save a step)
    except BaseException:  # Ctrl-C, SIGTERM (raised as KeyboardInterrupt) or an error: no hidden folder survives
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        for stale in checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def load_model(path: Path, model: nn.Module) -> None:
    from safetensors.torch import load_model as _load

    _load(model, str(path / "model.safetensors"), strict=True)


def load_training(path: Path, optimizer, scheduler, rank: int, model: nn.Module | None = None) -> None:
    """Optimizer, scheduler and this process's RNG states (and, from a sharded checkpoint, the sharded model's
    weights: ``model`` must be sharded as when it was saved)."""
    if is_sharded(path):
        sharding.load_sharded(path / "sharded", model, optimizer)
        if optimizer is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    elif optimizer is not None:
        if not (path / "optimizer.pt").exists():  # never restart the optimizer and the schedule silently
            raise ValueError(f"{path} has no optimizer.pt to continue its stage with; resume from an earlier "
                             "checkpoint (move this one away) or start a new run")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    written = len(list(path.glob("rng-*.pt")))
    if written == 0:
        raise ValueError(f"{path} holds no rng-*.pt: it was not written by this tool, or is incomplete")
    # at another number of processes, process r continues process (r mod written)'s random streams (dropout);
    # the data position and every weight and optimizer state are global, so the run continues exactly
    set_rng_state(torch.load(path / f"rng-{rank % written}.pt", weights_only=False))
