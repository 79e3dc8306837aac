"""What the package needs from transformers' calling conventions, found by what is passed, never by version.

An attention module receives its KV cache under a name that changed across releases (``past_key_value``,
``past_key_values``, ``layer_past``, ``cache``); what does not change is that it is a ``transformers.Cache``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers.cache_utils import Cache


class StopForward(Exception):
    """Raised by a hook to end a model's forward pass once what it needs has been computed; the caller
    catches it (``except StopForward``)."""


def find_cache(arguments: dict):
    """The ``Cache`` among an attention call's bound arguments (one level of ``**kwargs`` included), or None."""
    for value in arguments.values():
        if isinstance(value, Cache):
            return value
        if isinstance(value, dict):
            found = next((v for v in value.values() if isinstance(v, Cache)), None)
            if found is not None:
                return found
    return None


def without_cache(kwargs: dict) -> dict:
    """``kwargs`` of an attention call with every ``Cache`` replaced by None (a re-run must not touch it)."""
    return {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (older releases), read off its signature."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict:
    """``{name: cache}`` to pass a KV cache to ``model(...)`` under the name this transformers uses."""
    return {cache_kwarg(model): cache}


def output_cache(output):
    """The KV cache a model output carries (``cache`` or, on older releases, ``past_key_values``), or None."""
    for name in ("cache", "past_key_values"):
        if output.get(name) is not None:
            return output.get(name)
    return None


def keep_logits(model, keep: int) -> dict:
    """``{"logits_to_keep": keep}`` where ``model.forward`` takes it (the vocabulary projection then runs on the
    last ``keep`` rows only: Gemma 3's 262k vocabulary makes the full logits of a 32k prompt 34 GB in fp32)."""
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def prefill(model, ids: Tensor, chunk: int | None = None) -> tuple[Cache, Tensor]:
    """(the model's KV cache after reading ``ids`` (B, L), the logits (B, V) of its last position), ``chunk``
    tokens per forward (all at once if None), as ``generate(prefill_chunk_size=chunk)`` reads a prompt; logits are
    computed for the last position only. No gradients."""
    cache = None
    with torch.no_grad():
        for part in ids.split(chunk or ids.shape[1], dim=1):  # (B, chunk) each
            out = model(input_ids=part, use_cache=True, **keep_logits(model, 1),
                        **({} if cache is None else with_cache(model, cache)))
            cache = output_cache(out)
    return cache, out.logits[:, -1]  # (B, V)


def enable_activation_checkpointing(model, checkpoint_kwargs: dict | None = None) -> None:
    """Activation (gradient) checkpointing, through ``activation_checkpointing_enable`` where transformers has
    it (``gradient_checkpointing_enable`` is deprecated there) and the older name elsewhere."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
