"""The command line: help, the attention benchmark's table, and clear errors."""

import re
import subprocess
import sys

import pytest

from mosa_retrofit.cli.main import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "mosa_retrofit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout


def test_bench_attention_prints_ratios_with_correct_flops(capsys):
    assert main(["bench", "attention", "--quick", "--seq-lens", "128", "--sparsities", "4,16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| 128 \|", line)]
    assert len(rows) == 4  # 2 sparsities x (mosa, hybrid)
    h, d, H, T = 256, 64, 4, 128
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        s, k, layer, flop = float(cells[1]), int(cells[2]), cells[3], float(cells[6])
        assert k == max(int(T // s), 2)
        dense = 8 * h * d * T + 2 * d * T * T
        mosa = 8 * h * d * k + 2 * d * k * k + 2 * h * T
        n_mosa = H if layer == "mosa" else H - 1
        assert flop == pytest.approx((n_mosa * mosa + (H - n_mosa) * dense) / (H * dense), abs=1e-4)
        assert float(cells[4]) > 0 and float(cells[5]) > 0


@pytest.mark.parametrize("argv, needle", [
    (["bench", "attention", "--sparsities", "0.5"], "sparsity must be >= 1"),
    (["bench", "attention", "--seq-lens", "0"], "integers >= 1"),
    (["bench", "attention", "--dtype", "int8"], "invalid choice"),
])
def test_unparseable_arguments_exit_2_with_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_inconsistent_arguments_exit_2_before_running(capsys):
    assert main(["bench", "attention", "--heads", "16", "--hybrid-dense-heads", "16"]) == 2
    assert "--hybrid-dense-heads must be in [0, --heads - 1 = 15], got 16" in capsys.readouterr().err
