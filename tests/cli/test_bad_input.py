"""Every bad input a user may give, and what they see: one line naming the argument or file, exit status 2,
nothing of theirs touched. The table in docs/bad_input.md is this test's output (rewrite it with
MOSA_RETROFIT_WRITE_DOCS=1), so the documentation cannot drift from what the tool does."""

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mosa_retrofit.cli.main import main
from safetensors.torch import load_file, save_file
from tiny_models import plain_config
from train_fixtures import make_world, recipe_dict

import mosa_retrofit
from mosa_retrofit import convert_

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad_input.md"
FAST = ["--preset", "paper", "--dense-heads", "1", "--no-check"]


def _edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


ROUTER = "model.layers.0.self_attn.mosa_router"

# (what the user did, argv, how to prepare the files in the work folder)
CASES = [
    ("Data loss", "`convert --overwrite` into the working directory",
     ["convert", "models/tiny-llama", ".", *FAST, "--overwrite"], None),
    ("Data loss", "`convert --overwrite` into the folder that holds the input model",
     ["convert", "models/tiny-llama", "models", *FAST, "--overwrite"], None),
    ("Data loss", "`convert --overwrite` onto the input model itself",
     ["convert", "models/tiny-llama", "models/tiny-llama", *FAST, "--overwrite"], None),
    ("Data loss", "`convert --overwrite` into a folder with the user's own files",
     ["convert", "models/tiny-llama", "thesis", *FAST, "--overwrite"],
     lambda w: (w / "thesis").mkdir() or (w / "thesis" / "thesis.tex").write_text("mine")),
    ("Data loss", "a recipe with a non-finite learning rate", ["train", "recipe.yaml", "optimizer.lr=.inf"], None),
    ("Silent wrong result", "converting an already converted checkpoint",
     ["convert", "converted", "again", *FAST], None),
    ("Silent wrong result", "`--sparsity inf`", ["convert", "models/tiny-llama", "out", "--sparsity", "inf"], None),
    ("Silent wrong result", "`--sparsity 1e12` (less than one token per sequence)",
     ["convert", "models/tiny-llama", "out", *FAST, "--sparsity", "1e12"], None),
    ("Silent wrong result", "`--dense-heads` = every head",
     ["convert", "models/tiny-llama", "out", *FAST[:2], "--dense-heads", "4", "--no-check"], None),
    ("Silent wrong result", "`--layers` naming no layer of the model",
     ["convert", "models/tiny-llama", "out", *FAST, "--layers", "7"], None),
    ("Silent wrong result", "a checkpoint whose router has the wrong shape", ["eval", "narrow", "--data", "corpus.txt"],
     lambda w: _edit_tensors(w / "narrow", lambda t: t.__setitem__(ROUTER, t[ROUTER][:, :-1].clone()))),
    ("Silent wrong result", "a checkpoint whose `dense_head_ids` were edited", ["eval", "edited", "--data", "corpus.txt"],
     lambda w: _edit_config(w / "edited", lambda c: c["mosa"].__setitem__("dense_head_ids", {"0": [0, 1], "1": [0]}))),
    ("Silent wrong result", "a router stored as int32", ["eval", "introuter", "--data", "corpus.txt"],
     lambda w: _edit_tensors(w / "introuter", lambda t: t.__setitem__(ROUTER, t[ROUTER].to(torch.int32)))),
    ("Silent wrong result", "a checkpoint with a NaN router", ["eval", "nan", "--data", "corpus.txt"],
     lambda w: _edit_tensors(w / "nan", lambda t: t[ROUTER].__setitem__((0, 0), float("nan")))),
    ("Data loss", "a run that diverges (`optimizer.lr=1e30`)", ["train", "recipe.yaml", "optimizer.lr=1e30",
                                                                "output_dir=diverged", "--quiet"], None),
    ("Silent wrong result", "`--resume` when every checkpoint is damaged",
     ["train", "recipe.yaml", "--resume", "output_dir=damaged"],
     lambda w: (w / "damaged" / "checkpoint-0000003").mkdir(parents=True)),
    ("One clear line", "an empty prompt in `generate`", ["generate", "models/tiny-llama", " "], None),
    ("One clear line", "an empty data file in `train`", ["train", "recipe.yaml", "data.source=empty.txt", "output_dir=empty"],
     lambda w: (w / "empty.txt").write_text("")),
    ("One clear line", "a whitespace-only data file in `eval`", ["eval", "models/tiny-llama", "--data", "blank.txt"],
     lambda w: (w / "blank.txt").write_text(" \n\n \n")),
    ("One clear line", "`eval --max-tokens` below one block",
     ["eval", "models/tiny-llama", "--data", "corpus.txt", "--max-tokens", "10", "--block-size", "64"], None),
    ("One clear line", "a data file of only newlines in `eval`", ["eval", "models/tiny-llama", "--data", "newlines.txt"],
     lambda w: (w / "newlines.txt").write_text("\n\n\n\n")),
    ("One clear line", "malformed JSON in `--config`", ["convert", "models/tiny-llama", "out", "--config", "bad.json"],
     lambda w: (w / "bad.json").write_text('{\n  "sparsity": 8,\n  "dense_heads": 0.25,,\n}\n')),
    ("One clear line", '`"version": "1"` in a `--config` file',
     ["convert", "models/tiny-llama", "out", "--config", "v.json"],
     lambda w: (w / "v.json").write_text(json.dumps({"version": "1", "sparsity": 8}))),
    ("One clear line", "`--calib-sequences 0`", ["convert", "models/tiny-llama", "out", "--calib-sequences", "0"],
     None),
    ("One clear line", "a model name that is no folder, with the hub unreachable",
     ["convert", "SmolLM2-135M", "out"], None),
    ("One clear line", "a folder that does not exist", ["inspect", "./models/tiny-lama"], None),
    ("One clear line", '`"mosa": "garbage"` in a checkpoint\'s config.json', ["eval", "garbage"],
     lambda w: _edit_config(w / "garbage", lambda c: c.__setitem__("mosa", "garbage"))),
    ("One clear line", "a non-integer `version` in a checkpoint's mosa block", ["eval", "version"],
     lambda w: _edit_config(w / "version", lambda c: c["mosa"].__setitem__("version", "two"))),
    ("One clear line", "a malformed YAML override", ["train", "recipe.yaml", "optimizer.lr=[1,"], None),
    ("One clear line", "an override naming no recipe field", ["train", "recipe.yaml", "optimiser.lr=1e-4"], None),
    ("One clear line", "an override after `--check`", ["train", "recipe.yaml", "--check", "stages.adaptation.steps=-1"],
     None),
    # state: folders, checkpoints and mosa blocks that load or resume with missing or changed pieces
    ("Data loss", "`train` into a folder with the user's own files", ["train", "recipe.yaml", "output_dir=notes"],
     lambda w: (w / "notes").mkdir(exist_ok=True) or (w / "notes" / "summary.md").write_text("my notes")),
    ("Data loss", "`train` into the working directory", ["train", "recipe.yaml", "output_dir=."], None),
    ("Data loss", "`convert --overwrite` onto a symlink to a converted folder",
     ["convert", "models/tiny-llama", "link", *FAST, "--overwrite"],
     lambda w: (w / "link").is_symlink() or (w / "link").symlink_to(w / "converted")),
    ("Silent wrong result", "routers missing from the safetensors", ["eval", "norouter", "--data", "corpus.txt"],
     lambda w: _edit_tensors(w / "norouter", lambda t: t.pop(ROUTER))),
    ("Silent wrong result", "the `layers` of a checkpoint's mosa block narrowed", ["eval", "narrowed", "--data", "corpus.txt"],
     lambda w: _edit_config(w / "narrowed", lambda c: c["mosa"].__setitem__("layers", [1]))),
    ("Silent wrong result", "`sparse_heads` of a checkpoint's mosa block set to `pruned`",
     ["eval", "pruned", "--data", "corpus.txt"],
     lambda w: _edit_config(w / "pruned", lambda c: c["mosa"].__setitem__("sparse_heads", "pruned"))),
    ("Silent wrong result", "`\"mosa\": {}` in a checkpoint's config.json", ["eval", "emptied", "--data", "corpus.txt"],
     lambda w: _edit_config(w / "emptied", lambda c: c.__setitem__("mosa", {}))),
    ("Silent wrong result", "`--resume` on a folder with nothing to resume",
     ["train", "recipe.yaml", "--resume", "output_dir=fresh"], None),
    ("Silent wrong result", "`eval --block-size` beyond the model's positions",
     ["eval", "models/tiny-llama", "--data", "corpus.txt", "--block-size", "1024"], None),
    ("Silent wrong result", "`train` with `data.block_size` beyond the model's positions",
     ["train", "recipe.yaml", "data.block_size=256", "output_dir=long"], None),
    ("Silent wrong result", "`long --prefill` beyond the model's positions",
     ["long", "models/tiny-llama", "--prefill", "100000"], None),
    ("Silent wrong result", "`bench generate --decode-context` beyond the model's positions",
     ["bench", "generate", "converted", "--decode-context", "100000"], None),
    ("Silent wrong result", "`--calib-length` beyond the model's positions",
     ["convert", "models/tiny-llama", "out", "--local-window", "32", "--calib-length", "5000"], None),
    ("Silent wrong result", "`--calib-length 1` (no token to route)",
     ["convert", "models/tiny-llama", "out", "--local-window", "32", "--calib-length", "1"], None),
    ("Silent wrong result", "a window that covers every position",
     ["convert", "models/tiny-llama", "out", "--sparse-heads", "streaming", "--local-window", "100000"], None),
    ("Silent wrong result", "`eval --split` with a local data file",
     ["eval", "converted", "--data", "corpus.txt", "--split", "x"], None),
    ("Silent wrong result", "`inspect --layer` without `--plot`", ["inspect", "converted", "--layer", "1"], None),
    ("One clear line", "a truncated model.safetensors", ["eval", "truncated", "--data", "corpus.txt"],
     lambda w: (w / "truncated" / "model.safetensors").write_bytes(
         (w / "truncated" / "model.safetensors").read_bytes()[:200])),
    ("One clear line", "`long --prefill -1`", ["long", "models/tiny-llama", "--prefill", "-1"], None),
    ("One clear line", "`inspect --plot` with an empty `--text`",
     ["inspect", "converted", "--plot", "x.png", "--text", ""], None),
    ("One clear line", "`bench attention --device cuda` on a machine without CUDA",
     ["bench", "attention", "--device", "cuda", "--quick"], None) if not torch.cuda.is_available() else None,
    ("One clear line", "`convert --device cuda` on a machine without CUDA",
     ["convert", "models/tiny-llama", "out", "--device", "cuda"], None) if not torch.cuda.is_available() else None,
    ("Silent wrong result", "`bench model --baseline` naming a converted model",
     ["bench", "model", "converted", "--baseline", "converted", "--contexts", "32", "--train-length", "0"], None),
    ("Silent wrong result", "an edited `sparsity` in a causal checkpoint's mosa block",
     ["eval", "resparse", "--data", "corpus.txt"],
     lambda w: _edit_config(w / "resparse", lambda c: c["mosa"].__setitem__("sparsity", 8))),
    ("Silent wrong result", "`eval --causal` on a model that already routes causally",
     ["eval", "causal", "--data", "corpus.txt", "--causal"], None),
    ("One clear line", "`--threads 0`", ["bench", "keys", "--threads", "0"], None),
    ("One clear line", "`bench keys --sparsity 0`", ["bench", "keys", "--sparsity", "0"], None),
    ("One clear line", "`bench keys --sparsity nan`", ["bench", "keys", "--sparsity", "nan"], None),
    ("One clear line", "`bench keys --window 0`", ["bench", "keys", "--window", "0"], None),
    ("One clear line", "`bench keys --reps 0`", ["bench", "keys", "--reps", "0"], None),
    ("One clear line", "`convert --device mps` on a machine without it",
     ["convert", "models/tiny-llama", "out", "--device", "mps"], None)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()) else None,
    ("One clear line", "`convert --device-map cuda` on a machine without CUDA",
     ["convert", "models/tiny-llama", "out", "--device-map", "cuda"], None) if not torch.cuda.is_available() else None,
    ("One clear line", "`eval --baseline` of an unconverted model", ["eval", "models/tiny-llama", "--baseline"], None),
    ("One clear line", "OUT under a file", ["convert", "models/tiny-llama", "corpus.txt/out", *FAST], None),
    ("One clear line", "`long --out` naming a file", ["long", "converted", "--out", "corpus.txt"], None),
    ("One clear line", "`bench --output` naming a folder", ["bench", "keys", "--output", "models"], None),
    ("One clear line", "a recipe that is a folder", ["train", "models"], None),
    ("One clear line", "a folder as `--config`", ["convert", "models/tiny-llama", "out", "--config", "models"], None),
    ("One clear line", "a folder as training data", ["train", "recipe.yaml", "data.source=models", "output_dir=d"],
     None),
    ("Silent wrong result", "a recipe key given twice (`lr:` twice under `optimizer:`)",
     ["train", "twice.yaml", "output_dir=twice"],
     lambda w: (w / "twice.yaml").write_text((w / "recipe.yaml").read_text().replace("optimizer:\n",
                                                                                     "optimizer:\n  lr: 9.0\n"))),
    ("Silent wrong result", "a recipe section given twice", ["train", "again.yaml", "output_dir=again"],
     lambda w: (w / "again.yaml").write_text((w / "recipe.yaml").read_text() + "optimizer:\n  lr: 9.0\n")),
    ("Silent wrong result", "an adapter whose base folder is gone", ["eval", "adapter-nobase", "--data", "corpus.txt"],
     lambda w: shutil.rmtree(w / "models" / "gone", ignore_errors=True)),
    ("Silent wrong result", "an adapter whose base folder now holds other weights",
     ["eval", "adapter-otherbase", "--data", "corpus.txt"], lambda w: _retrain(w / "models" / "changed")),
    ("One clear line", "a data file that is not UTF-8", ["eval", "models/tiny-llama", "--data", "latin1.txt"],
     lambda w: (w / "latin1.txt").write_bytes("caf\xe9 au lait\n\nun autre paragraphe\n".encode("latin-1"))),
]
CASES = [c for c in CASES if c is not None]


def _retrain(folder: Path) -> None:
    """The base folder's weights changed after the adapter was made (a fine-tune saved over it)."""
    _edit_tensors(folder, lambda t: t["model.norm.weight"].add_(1e-3))


# Stock transformers on a converted folder: (case, Python the user runs, how to prepare the folder)
STOCK = [
    ("a converted folder loaded without `trust_remote_code`",
     "AutoModelForCausalLM.from_pretrained('converted')", None),
    ("folder code written by a newer mosa_retrofit than the installed one",
     "AutoModelForCausalLM.from_pretrained('newer', trust_remote_code=True)",
     lambda w: _edit_code(w / "newer", "CODE_VERSION = 1", "CODE_VERSION = 2", "9.0.0")),
    ("folder code older than the installed mosa_retrofit still reads",
     "AutoModelForCausalLM.from_pretrained('older', trust_remote_code=True)",
     lambda w: _edit_code(w / "older", "CODE_VERSION = 1", "CODE_VERSION = 0", "0.0.1")),
    ("mosa_retrofit not installed", "AutoModelForCausalLM.from_pretrained('converted', trust_remote_code=True)",
     "uninstalled"),
]


def _edit_code(folder: Path, old: str, new: str, version: str) -> None:
    path = folder / "modeling_mosa.py"
    path.write_text(path.read_text().replace(old, new).replace('WRITTEN_BY = "0.2.0"', f'WRITTEN_BY = "{version}"'))


def _stock_line(work: Path, code: str, prepare) -> str:
    """The last line of what the user sees (the exception) when ``code`` runs in ``work``."""
    import subprocess
    import sys

    head = "import sys; sys.modules['mosa_retrofit'] = None\n" if prepare == "uninstalled" else ""
    r = subprocess.run([sys.executable, "-c", f"{head}from transformers import AutoModelForCausalLM\n{code}"],
                       cwd=work, capture_output=True, text=True)
    assert r.returncode != 0, code
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    error = next(i for i in range(len(lines) - 1, -1, -1) if lines[i].split(":")[0].endswith("Error"))
    return " ".join(line.strip() for line in lines[error:])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work folder: models/tiny-llama (with tokenizer), corpus.txt, recipe.yaml, a converted checkpoint and
    copies of it to damage."""
    root = tmp_path_factory.mktemp("work")
    (root / "models").mkdir()
    model_dir, data = make_world(root / "models")
    shutil.move(data, root / "corpus.txt")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    convert_(model, plain_config(sparsity=2, dense_head_ids={"0": [0], "1": [0]}))
    model.save_pretrained(root / "converted")
    causal = AutoModelForCausalLM.from_pretrained(model_dir)
    convert_(causal, plain_config(sparsity=2, dense_head_ids={"0": [0], "1": [0]}, routing="causal"),
             calibration=torch.randint(0, 100, (2, 32)))
    causal.save_pretrained(root / "causal")
    shutil.copytree(root / "causal", root / "resparse")
    for name in ("narrow", "edited", "nan", "garbage", "version", "norouter", "narrowed", "pruned", "emptied",
                 "truncated", "introuter"):
        shutil.copytree(root / "converted", root / name)
    for name in ("newer", "older"):
        shutil.copytree(root / "converted", root / name)
    for base, adapter in (("gone", "adapter-nobase"), ("changed", "adapter-otherbase")):
        shutil.copytree(model_dir, root / "models" / base)
        model = AutoModelForCausalLM.from_pretrained(root / "models" / base)
        convert_(model, plain_config(sparsity=2, dense_head_ids={"0": [0], "1": [0]}))
        mosa_retrofit.save(model, root / adapter, adapter_only=True)
    recipe = recipe_dict(Path("models/tiny-llama"), Path("corpus.txt"), Path("run"))
    (root / "recipe.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(recipe, default=str))))
    return root


def _see(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err.strip()


def test_every_bad_input_gets_one_clear_line(work, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.chdir(work)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    rows = []
    for kind, case, argv, prepare in CASES:
        if prepare is not None:
            prepare(work)
        owned = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
        code, err = _see(argv, capsys)
        for path, data in owned.items():  # nothing the user owns was changed or removed
            assert path.exists() and path.read_bytes() == data, (case, path)
        lines = [line for line in err.splitlines() if line.startswith("mosa-retrofit")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (case, code, err)
        message = lines[0].replace(str(work) + os.sep, "").replace(str(work), ".")
        assert len(message) < 400, (case, message)
        rows.append((kind, case, "mosa-retrofit " + shlex.join(argv), message))
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary folders left
    stock = []
    for case, code, prepare in STOCK:
        if callable(prepare):
            prepare(work)
        message = _stock_line(work, code, prepare).replace(str(work) + os.sep, "").replace(str(work), ".")
        assert len(message) < 600, (case, message)
        stock.append((case, code, message))

    table = ["# Bad input: what the user sees", "",
             "Every case exits with status 2, prints the one line below and leaves the user's files as they were.",
             "Generated by `tests/cli/test_bad_input.py` (on a tiny model in a work folder holding `models/tiny-llama`,",
             "`corpus.txt`, `recipe.yaml` and converted checkpoints; the hub unreachable); rewrite with",
             "`MOSA_RETROFIT_WRITE_DOCS=1 pytest tests/cli/test_bad_input.py`.", ""]
    for kind in dict.fromkeys(k for k, *_ in rows):
        table += [f"## {kind}", "", "| case | command | what the user sees |", "|---|---|---|"]
        table += [f"| {case} | `{cmd}` | {msg.replace('|', '/')} |" for k, case, cmd, msg in rows if k == kind]
        table.append("")
    table += ["## Stock transformers on a converted folder", "",
              "What `python -c \"from transformers import AutoModelForCausalLM; ...\"` raises in the work folder "
              "(the exception's last line).", "", "| case | Python | what the user sees |", "|---|---|---|"]
    table += [f"| {case} | `{code}` | {msg.replace('|', '/')} |" for case, code, msg in stock]
    table.append("")
    text = "\n".join(table)
    if os.environ.get("MOSA_RETROFIT_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/bad_input.md differs: rewrite it with MOSA_RETROFIT_WRITE_DOCS=1"
