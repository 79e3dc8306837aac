"""What the subcommands share: flags generated from a config dataclass, the help formatter."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing

from .flags import Number


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it has one (flags that override a config say theirs in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return action.help
        return super()._get_help_string(action)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows its annotation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, choices: dict[str, tuple] = {},
                        parsers: dict[str, typing.Callable] = {}, skip: tuple[str, ...] = ()) -> list[str]:
    """One ``--field-name`` flag per field of ``cls`` (its type, choices, help from the field's docstring and
    its default in words); every flag defaults to None, "not given", so it can override a config file.
    Fields of other types than bool / int / float / str (and not in ``parsers``) are left to the config file.
    Returns the field names that got a flag."""
    docs, hints, names = field_docs(cls), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        optional = type(None) in typing.get_args(kind)
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})".strip().replace("%", "%%")  # argparse formats %
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is tuple and f.name not in parsers:
            item = typing.get_args(base)[0]
            parser.add_argument(flag, type=_comma_list(item), default=None, metavar="A,B,...",
                                help=help_text + (f" (any of {', '.join(choices[f.name])})" if f.name in choices else ""))
        elif f.name in parsers or base in (int, float, str):
            parse = parsers.get(f.name) or (_optional(base) if optional else base)
            if f.name in parsers or base in (int, float):
                parse = Checked(cls, f.name, parse, numeric=base in (int, float) or f.name in parsers)
            parser.add_argument(flag, type=parse, choices=choices.get(f.name), default=None, help=help_text,
                                metavar=None if f.name in choices else f.name.upper())
        else:
            continue
        names.append(f.name)
    return names


NULL = object()
"""What ``--field none`` parses to for an optional field (None itself means "flag not given")."""


def given_flags(args: argparse.Namespace, names: list[str]) -> dict:
    """The generated flags the user gave (value not None; ``none`` given for an optional field is None)."""
    return {n: (None if v is NULL else v) for n in names if (v := getattr(args, n, None)) is not None}


def _comma_list(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def _optional(kind: type):
    def parse(text: str):
        return NULL if text.lower() in ("none", "null") else _number(kind)(text)
    parse.__name__ = kind.__name__
    return parse


def _number(kind: type):
    return Number(kind, lo=None) if kind in (int, float) else kind


class Checked:
    """A generated flag's parser that also asks the dataclass whether the value is valid for its field alone
    (``cls(**{field: value})``), so a bad value is refused where it is parsed, in the field's own words, and
    named by argparse with its flag. Numbers are finite and integers fit 32 bits before the dataclass sees them."""

    def __init__(self, cls: type, field: str, parse: typing.Callable, numeric: bool):
        self.cls, self.field, self.numeric = cls, field, numeric
        self.parse, self.bounds = parse, _number(parse) if parse in (int, float) else None
        self.__name__ = getattr(parse, "__name__", field)

    def __call__(self, text: str):
        try:
            value = self.parse(text.strip())
        except ValueError as e:
            if self.bounds is None:
                raise argparse.ArgumentTypeError(str(e)) from None
            self.bounds(text)  # raises in the domain's words: "expected an integer, got '0.5'"
            raise
        if value is not NULL:
            try:  # the field's own words first ("MoSAConfig.sparsity must be a finite number >= 1, got inf")
                self.cls(**{self.field: value})
            except (ValueError, TypeError) as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            if self.bounds is not None:
                self.bounds(text)  # then finite, and an integer within 32 bits, whatever the field allows
        return value

    def admits(self, value) -> bool:
        try:
            self(str(value))
        except argparse.ArgumentTypeError:
            return False
        return True

    def __repr__(self) -> str:
        return f"{self.cls.__name__}.{self.field}"
