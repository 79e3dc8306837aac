"""Typed values of numeric flags: each flag declares its domain, checked where argparse parses it.

argparse turns the ``ArgumentTypeError`` a ``Number`` raises into one line naming the flag (``error: argument
--reps: expected an integer >= 1, got '0'``) and exit status 2, so no flag's value reaches the code that uses
it unchecked: not 0 where a count is meant, not NaN, not a fraction where an integer is meant, not a number past
what an index can hold. ``Number.admits`` says the same domain as a predicate (the flag sweep in the tests
reads it).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

INT_MAX = 2**31 - 1  # lengths, counts and indices travel as 32-bit integers (token ids, torch sizes, threads)


@dataclass(frozen=True)
class Number:
    """An integer (``kind=int``) or a finite real number in ``[lo, hi]`` (``lo_open``: ``(lo, hi]``);
    ``many``: a comma-separated list of them (at least one)."""

    kind: type = int
    lo: float | None = 1
    hi: float | None = None
    lo_open: bool = False
    many: bool = False

    @property
    def domain(self) -> str:
        what = "integer" if self.kind is int else "number"
        hi = self.hi  # an integer's implicit INT_MAX ceiling is not printed: 2**31 - 1 is not a value anyone means
        if self.lo is not None and hi is not None:
            bound = f"in {'(' if self.lo_open else '['}{self.lo:g}, {hi:g}]"
        elif self.lo is not None:
            bound = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            bound = f"<= {hi:g}" if hi is not None else ""
        text = f"{'an ' if what == 'integer' else 'a finite '}{what} {bound}".strip()
        return f"comma-separated {what}s {bound}".strip() if self.many else text

    def admits(self, value: float) -> bool:
        """Whether one value lies in the domain."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.kind is int and (not float(value).is_integer() or abs(value) > INT_MAX):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def one(self, text: str) -> int | float:
        text = text.strip()
        try:
            value = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.domain}, got {text!r}") from None
        if not self.admits(value):
            ceiling = f" (at most {INT_MAX})" if self.kind is int and abs(value) > INT_MAX else ""
            raise argparse.ArgumentTypeError(f"expected {self.domain}{ceiling}, got {text!r}")
        return value

    def __call__(self, text: str):
        if not self.many:
            return self.one(text)
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected {self.domain}, got {text!r}")
        return [self.one(p) for p in parts]

    def __repr__(self) -> str:  # argparse names the type in some messages
        return self.domain


COUNT = Number(int, 1)
"""An integer >= 1: sizes, steps, repetitions, lengths."""
NONNEGATIVE = Number(int, 0)
"""An integer >= 0."""
BLOCK = Number(int, 2)
"""Tokens per block (a block predicts at least one token from another)."""
COUNTS = Number(int, 1, many=True)
"""Comma-separated integers >= 1 (lengths, batch sizes)."""
THREADS = Number(int, 1, 1024)
"""torch CPU threads."""
SEED = Number(int, 0)
"""A random seed."""
SPARSITY = Number(float, 1)
"""One routed token in this many (a finite number >= 1)."""
SPARSITIES = Number(float, 1, many=True)
"""Comma-separated sparsities."""
FRACTIONS = Number(float, 0, 1, many=True)
"""Comma-separated numbers in [0, 1] (depths)."""
PROBABILITY = Number(float, 0, 1, lo_open=True)
"""A number in (0, 1] (nucleus sampling's top-p)."""
TEMPERATURE = Number(float, 0, 100, lo_open=True)
"""A sampling temperature in (0, 100]."""
LIMIT = Number(float, 0, lo_open=True)
"""Documents per task: a count, or a fraction of the task if < 1."""


def numeric_actions(parser: argparse.ArgumentParser):
    """(command path, action) for every flag of ``parser`` and its subcommands whose value is a number or a list
    of numbers, judged by its type (plain ``int`` / ``float`` included, so a flag that declares no domain shows)."""
    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))
            elif action.option_strings and (action.type in (int, float) or isinstance(action.type, Number)
                                            or getattr(action.type, "numeric", False)):
                yield path, action
    yield from walk(parser, ())
