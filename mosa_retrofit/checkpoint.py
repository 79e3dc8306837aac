"""Training checkpoints: written atomically, found, pruned.

A checkpoint is a folder ``checkpoint-<global step>`` with
  * ``model.safetensors``: the whole training model (student, with LoRA adapters when a LoRA stage is open),
  * ``optimizer.pt`` and ``scheduler.pt`` of the open stage,
  * ``rng-<rank>.pt``: Python, NumPy and torch RNG states of every process,
  * ``state.json``: stage, step within the stage, samples consumed, elapsed time, metrics so far.
Every process writes into ``.tmp-checkpoint-<step>``; the main process then renames it (atomic on POSIX),
so a folder named ``checkpoint-*`` is always complete and a run killed at any point loses at most the steps
since the last one. Stale temporary folders are removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

_NAME = re.compile(r"checkpoint-(\d+)$")


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


def latest(root: str | Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def save(accelerator, root: str | Path, step: int, model: nn.Module, optimizer, scheduler, state: dict,
         keep_last: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (collective: every process must call it)."""
    from safetensors.torch import save_model

    root = Path(root)
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def load_model(path: Path, model: nn.Module) -> None:
    from safetensors.torch import load_model as _load

    _load(model, str(path / "model.safetensors"), strict=True)


def load_training(path: Path, optimizer, scheduler, rank: int) -> None:
    """Optimizer, scheduler and this process's RNG states."""
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{rank}.pt"
    if not rng.exists():
        raise ValueError(f"{path} was written by fewer processes (no {rng.name}); resume with the same "
                         "number of processes")
    set_rng_state(torch.load(rng, weights_only=False))
