"""Value checks shared by the frozen dataclasses of recipes and data specs: one line naming the value and what
would be valid."""

from __future__ import annotations

from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
"""The weight dtypes a model loads in (recipes' ``model.dtype``, ``convert --dtype``, ``bench --dtype``)."""


def require(ok: bool, name: str, value: Any, valid: str) -> None:
    """Raise ``ValueError("<name> must be <valid>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def positive_int(name: str, v: Any, minimum: int = 1) -> None:
    """``v`` is an int (not a bool) >= ``minimum``."""
    require(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, name, v, f"an integer >= {minimum}")


def positions_of(config: Any) -> int | None:
    """The positions a model (its transformers config) has, or None if it states none."""
    return getattr(config, "max_position_embeddings", None)


def within_positions(name: str, value: int, positions: int | None, model: str = "the model") -> None:
    """``value`` tokens fit ``model``'s ``positions`` (checked before any work, naming the option)."""
    if positions is not None and value > positions:
        raise ValueError(f"{name} = {value:,} reaches beyond the {positions:,} positions of {model}; give "
                         f"{name} <= {positions:,}")
