"""The benchmarks that copy an earlier run's rows instead of measuring them again (long_context.py --earlier,
ruler.py --original-from) copy exactly the rows of the same grid and refuse any other grid."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEADER = "| model | KV bytes @32k | KV held @32k | held-out ppl | passkey @4096 | ppl, L=2048 |"
EARLIER = f"""# Long context

{HEADER}
|---|---|---|---|---|---|
| original | 1.000x | 207.0 MiB (1.000x) | 22.38 | 1.00 | 78.03 |
| default conversion (out/x) | 0.698x | 143.5 MiB (0.693x) | 22.44 | 0.50 | 78.49 |

Configurations (MoSAConfig fields; the rest are the defaults):

- default conversion (out/x): `{{"saved": "out/x"}}`
"""


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_long_context_copies_the_rows_of_the_same_grid_and_the_originals_held_bytes(tmp_path):
    path = tmp_path / "earlier.md"
    path.write_text(EARLIER)
    rows, configs, base = load("long_context").earlier_rows(path, HEADER)
    assert [r.split("|")[1].strip() for r in rows] == ["original", "default conversion (out/x)"]
    assert rows[1].endswith("| 0.50 | 78.49 |")
    assert configs == ['- default conversion (out/x): `{"saved": "out/x"}`']
    assert base == {"held": 207.0 * 2**20}


def test_long_context_refuses_an_earlier_run_of_another_grid(tmp_path):
    path = tmp_path / "earlier.md"
    path.write_text(EARLIER)
    with pytest.raises(SystemExit, match="did not measure this grid"):
        load("long_context").earlier_rows(path, HEADER.replace("@4096", "@8192"))
    with pytest.raises(SystemExit, match="no such file"):
        load("long_context").earlier_rows(tmp_path / "missing.md", HEADER)


def test_ruler_takes_the_originals_cells_of_the_same_trials(tmp_path):
    path = tmp_path / "ruler.md"
    path.write_text("2 prompts per task and length (...)\n\n| task | 4,096 | 8,192 | mean |\n|---|---|---|---|\n"
                    "| niah_number | 1.00 · 0.00 | 0.50 · 0.50 | 0.00x |\n| niah_word | 0.50 · 0.00 | 0.00 · 0.00 | - |\n")
    ruler = load("ruler")
    cells = ruler.earlier_original(path, ["niah_number", "niah_word"], [4096, 8192], 2)
    assert cells == {("niah_number", 4096): 1.0, ("niah_number", 8192): 0.5, ("niah_word", 4096): 0.5,
                     ("niah_word", 8192): 0.0}
    with pytest.raises(SystemExit, match="did not run 4 prompts"):
        ruler.earlier_original(path, ["niah_number"], [4096], 4)
    with pytest.raises(SystemExit, match="lacks the original's score"):
        ruler.earlier_original(path, ["niah_uuid"], [4096], 2)
