"""What the package needs from transformers' calling conventions, found by what is passed, never by version.

An attention module receives its KV cache under a name that changed across releases (``past_key_value``,
``past_key_values``, ``layer_past``, ``cache``); what does not change is that it is a ``transformers.Cache``.
"""

from __future__ import annotations

from transformers.cache_utils import Cache


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
