"""Every numeric flag of every command declares its domain and refuses what lies outside it where it is parsed:
exit 2, one error line naming the flag, before any model is loaded."""

import argparse
import math

import pytest

from cli.flags import INT_MAX, Number, numeric_actions
from cli.main import build_parser

# 0, negative, fractional, NaN, infinite, huge (past a float's integers and past 32 bits), not a number
SWEEP = ("0", "-4", "0.5", "nan", "inf", "1e30", str(2**40), "x")


PARSER = build_parser()  # parsing never changes a parser; one serves every case


def _flags():
    return list(numeric_actions(PARSER))


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text) if text != "x" else None


def _refuses(path, flag, text, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        PARSER.parse_args([*path, *_positional(path), flag, text])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def _positional(path):
    """Values for a subcommand's positional arguments (parsing stops at the bad flag; nothing runs)."""
    sub = PARSER
    for name in path:
        action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = action.choices[name]
    return ["X" for a in sub._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def test_every_numeric_flag_declares_a_domain():
    flags = _flags()
    assert len(flags) > 40  # every command's numbers, the generated convert flags among them
    bare = [(" ".join(p), a.option_strings[0]) for p, a in flags if a.type in (int, float)]
    assert not bare, f"numeric flags parsed as a bare int/float (no domain, NaN and 0 pass): {bare}"


@pytest.mark.parametrize("text", SWEEP)
def test_sweep_refuses_out_of_domain_values_naming_the_flag(text, capsys):
    checked = 0
    for path, action in _flags():
        flag = action.option_strings[-1]
        value = _value(text)
        if value is not None and action.type.admits(value):
            # inside the domain: the parser hands the number through unchanged
            args = build_parser().parse_args([*path, *_positional(path), flag, text])
            got = getattr(args, action.dest)
            assert got == value or (isinstance(got, list) and got == [value]), (path, flag, text, got)
            continue
        line = _refuses(path, flag, text, capsys)
        assert line.startswith(f"{PARSER.prog} ") and "error: argument" in line, line
        assert any(f in line for f in action.option_strings), (path, flag, text, line)
        if isinstance(action.type, Number):
            assert repr(text) in line, line
        checked += 1
    assert checked > 0


def test_the_domains_themselves():
    # written out independently of Number: what each kind of value must refuse
    for bad in (0, -4, 0.5, math.nan, math.inf, 2**40):
        assert not Number(int, 1).admits(bad)
    assert Number(int, 1).admits(1) and Number(int, 1).admits(INT_MAX) and not Number(int, 1).admits(INT_MAX + 1)
    assert Number(int, 0).admits(0) and not Number(int, 0).admits(-1)
    assert Number(float, 1).admits(1.5) and not Number(float, 1).admits(0.999) and not Number(float, 1).admits(math.nan)
    assert not Number(float, 0, 1, lo_open=True).admits(0) and Number(float, 0, 1, lo_open=True).admits(1)
    assert not Number(float, 0, 1, lo_open=True).admits(1.0001)
    assert Number(int, 1, many=True)("1,2, 3") == [1, 2, 3]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers >= 1"):
        Number(int, 1, many=True)("4,0")
    with pytest.raises(argparse.ArgumentTypeError):
        Number(int, 1, many=True)(",")


@pytest.mark.parametrize("argv, flag, words", [
    (["bench", "keys", "--sparsity", "0"], "--sparsity", ">= 1"),
    (["bench", "keys", "--window", "0"], "--window", ">= 1"),
    (["bench", "keys", "--reps", "0"], "--reps", ">= 1"),
    (["bench", "model", "X", "--threads", "5000"], "--threads", "[1, 1024]"),
    (["generate", "X", "--top-p", "0"], "--top-p", "(0, 1]"),
    (["generate", "X", "--temperature", "nan"], "--temperature", "(0, 100]"),
    (["eval", "X", "--block-size", "1"], "--block-size", ">= 2"),
    (["long", "X", "--depths", "0.5,1.5"], "--depths", "[0, 1]"),
    (["convert", "X", "Y", "--sparsity", "nan"], "--sparsity", "finite number >= 1"),
    (["convert", "X", "Y", "--local-window", "-4"], "--local-window", "integer >= 1"),
    (["convert", "X", "Y", "--sink-tokens", str(2**40)], "--sink-tokens", str(2**40)),
    (["convert", "X", "Y", "--dense-heads", "1.5"], "--dense-heads", "fraction in [0, 1)"),
    (["convert", "X", "Y", "--threshold-momentum", "2"], "--threshold-momentum", "[0, 1]"),
])
def test_one_line_in_the_flags_own_words(argv, flag, words, capsys):
    with pytest.raises(SystemExit) as e:
        PARSER.parse_args(argv)
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in line and words in line, line


def test_generated_optional_flag_still_takes_none():
    args = PARSER.parse_args(["convert", "X", "Y", "--threshold-length", "none"])
    from cli.common import NULL
    assert args.threshold_length is NULL
