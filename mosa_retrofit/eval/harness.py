"""lm-evaluation-harness on converted (and plain) models, through its standard Hugging Face wrapper.

A converted checkpoint loads as an ordinary transformers model, so lm-eval's ``HFLM`` runs it as is: this module
only loads the model with ``load_any`` (converted or plain checkpoints, or the embedded 'smollm2-135m') and its
tokenizer, and hands both to ``HFLM`` / ``lm_eval.simple_evaluate``. Needs the ``[eval]`` extra (``lm-eval``).

Example:
    >>> from mosa_retrofit.eval.harness import evaluate_tasks
    >>> results = evaluate_tasks("out/smollm2-mosa", ["my_task"], include_path="my_tasks/")
    >>> results["results"]["my_task"]["word_perplexity,none"]
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..convert.hub import load_tokenizer
from ..convert.serialization import load_any

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM

logger = logging.getLogger("mosa_retrofit")

_INSTALL = 'lm-evaluation-harness is not installed; install it with: pip install "mosa-retrofit[eval]"'


def require_lm_eval() -> ModuleType:
    """The ``lm_eval`` package (with its HF wrapper and task manager imported), or a one-line ImportError."""
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return lm_eval


def harness_model(name_or_path: str, batch_size: int = 1, **load_kwargs: Any) -> HFLM:
    """An ``lm_eval.models.huggingface.HFLM`` around the model at ``name_or_path`` (converted or plain) and its
    tokenizer; ``load_kwargs`` go to ``mosa_retrofit.convert.serialization.load_any`` (``dtype``, ``device_map``, ...).

    Expert-choice routed models run with ``batch_size=1``: HFLM right-pads a batch without an attention mask,
    and expert-choice routing (top-k over the whole sequence) would see the padding; causal routing does not.
    """
    lm_eval = require_lm_eval()
    model, source = load_any(str(name_or_path), **load_kwargs)
    if batch_size != 1 and (getattr(model.config, "mosa", None) or {}).get("routing") == "expert_choice":
        logger.warning("%s routes by expert choice (top-k over the whole sequence, padding included): "
                       "evaluating with batch_size=1 instead of %s", name_or_path, batch_size)
        batch_size = 1
    tokenizer = load_tokenizer(source)
    return lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _task_manager(lm_eval: ModuleType, tasks: list[str], include_path: str | None):
    """lm-eval's task manager with ``include_path``; when every task is a plain task of that folder, without
    indexing lm-eval's ~15,000 bundled task YAMLs (seconds on each run). Groups and tags get the full index: they
    may name bundled tasks."""
    if include_path is not None:
        local = lm_eval.tasks.TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    return lm_eval.tasks.TaskManager(include_path=str(include_path) if include_path is not None else None)


def evaluate_tasks(name_or_path: str, tasks: list[str], include_path: str | None = None,
                   limit: int | float | None = None, batch_size: int = 1, num_fewshot: int | None = None,
                   log_samples: bool = False, **load_kwargs: Any) -> dict:
    """Run lm-eval ``tasks`` on the model at ``name_or_path``; returns ``lm_eval.simple_evaluate``'s dict
    (``["results"][task]["<metric>,<filter>"]``; ``["samples"]`` with ``log_samples``).

    Args:
        tasks: lm-eval task (or group) names: its bundled tasks (their datasets come from the hub) or tasks
            defined by YAML files under ``include_path``.
        include_path: a folder of task YAMLs, added to lm-eval's own tasks.
        limit: documents per task (a fraction if < 1), for quick checks.
        num_fewshot: override the tasks' few-shot count.
        log_samples: keep the per-document requests and responses under ``["samples"]``.
    """
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    lm_eval = require_lm_eval()
    manager = _task_manager(lm_eval, tasks, include_path)
    missing = [t for t in tasks if t not in manager.all_tasks and not Path(t).exists()]  # a YAML path works too
    if missing:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(missing)}"
                         + ("" if include_path else "; local task YAMLs need include_path"))
    lm = harness_model(name_or_path, batch_size=batch_size, **load_kwargs)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=log_samples)
