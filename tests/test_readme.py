"""Every python block of the README and of docs/ runs as written, on a tiny model (so the examples cannot rot).

The embedded model's name is replaced by a tiny Llama (8 heads) with a tokenizer, and ``out/`` paths by a temporary
folder; everything else runs unchanged (calibration on the embedded Wikipedia text included)."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [(path, i, code) for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]


def test_the_readme_has_a_python_example():
    assert any(path.name == "README.md" for path, _, _ in BLOCKS)


@pytest.mark.parametrize("path, index, code", BLOCKS, ids=[f"{p.relative_to(ROOT)}#{i}" for p, i, _ in BLOCKS])
def test_python_block_runs(path, index, code, tmp_path, monkeypatch):
    from train_fixtures import make_world

    # the default conversion's retrieval prompts fit; 8 heads: the paper's 4 dense heads leave some to convert
    model_dir, _ = make_world(tmp_path, positions=1024, heads=8)
    code = code.replace('mosa_retrofit.resolve_model("smollm2-135m")', repr(str(model_dir)))
    monkeypatch.chdir(tmp_path)  # "out/..." lands in the temporary folder
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, f"{path.name} python block {index}", "exec"), scope)
    if "pure" in scope:  # docs/mosa_layer.md: the padded row's first 100 tokens get zero output
        assert tuple(scope["y"].shape) == (2, 512, 128) and (scope["y"][1, :100] == 0).all()
