"""The command line: help, the attention benchmark's table, and clear errors."""

import re
import subprocess
import sys

import pytest
from mosa_retrofit.cli.main import main


def test_help_lists_commands(capsys):
    out = subprocess.run([sys.executable, "-m", "mosa_retrofit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("convert", "train", "eval", "generate", "bench"))
    for command in ("train", "eval"):  # (the same parser in this process: one interpreter start is enough)
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        help_text = capsys.readouterr().out
        assert exit_.value.code == 0 and ("RECIPE" in help_text if command == "train" else "--baseline" in help_text)


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
    (["bench", "attention", "--sparsities", "0.5"], "argument --sparsities: expected comma-separated numbers >= 1"),
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


def test_convert_and_inspect_a_local_checkpoint(tmp_path, capsys):
    from tiny_models import plain_config, tiny_model

    import mosa_retrofit
    from mosa_retrofit.convert.surgery import mosa_layers

    base = tmp_path / "base"
    tiny_model("qwen3").save_pretrained(base)  # no tokenizer: no calibration, no check
    cfg = tmp_path / "cfg.json"
    plain_config(sparsity=4, dense_heads=2, local_window=7).to_json(str(cfg))
    out = tmp_path / "out"
    assert main(["convert", str(base), str(out), "--config", str(cfg), "--sparsity", "2", "--kept-heads", "local",
                 "--no-check"]) == 0
    model = mosa_retrofit.load(str(out))
    plan = mosa_layers(model)[0].mosa_plan
    assert plan.config.sparsity == 2 and plan.config.kept_heads == "local" and plan.config.local_window == 7 and plan.dense == (0, 1)
    capsys.readouterr()
    assert main(["inspect", str(out), "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    # layer row: 2 local + 2 MoSA heads of d=16, D=64 at T=64, k=32, window 7
    D, d, T, k, w = 64, 16, 64, 32, 7
    pairs = sum(min(t + 1, w) for t in range(T))  # query t sees keys max(0, t-w+1)..t
    flops = (2 * (8 * D * d * T + 4 * d * pairs) + 2 * (8 * D * d * k + 2 * d * k * k + 2 * D * T)) / (
        4 * (8 * D * d * T + 2 * d * T * T))
    kv = (2 * w + 2 * k) / (4 * T)  # entries: per query head
    # bytes: the 2 local heads share KV head 0 (one cached row of w tokens), each MoSA head caches its own k rows;
    # the original caches 2 KV heads of T tokens
    kv_bytes = (w + 2 * k) / (2 * T)
    assert f"| 0 | 0 | 2 | 2 | 32 | {flops:.3f} | {kv:.3f} | {kv_bytes:.3f} |" in text
    assert main(["convert", str(base), str(out), "--sparsity", "2"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_convert_adapter_only_writes_kilobytes_that_load_as_the_full_save(tmp_path, capsys):
    import torch
    from tiny_models import tiny_model
    from transformers import AutoModelForCausalLM

    import mosa_retrofit

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    fast = ["--preset", "paper", "--dense-heads", "1", "--sparsity", "4", "--no-check"]
    torch.manual_seed(0)  # the paper preset's routers start at random: the same draw for both
    assert main(["convert", str(base), str(tmp_path / "full"), *fast]) == 0
    torch.manual_seed(0)
    assert main(["convert", str(base), str(tmp_path / "adapter"), *fast, "--adapter-only"]) == 0
    out = capsys.readouterr().out
    assert f"saved an adapter of {base} to {tmp_path / 'adapter'}" in out and "trust_remote_code=True" in out
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        full = mosa_retrofit.load(str(tmp_path / "full"))(ids).logits
        torch.testing.assert_close(mosa_retrofit.load(str(tmp_path / "adapter"))(ids).logits, full, atol=0, rtol=0)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "full", trust_remote_code=True)
        torch.testing.assert_close(stock(ids).logits, full, atol=0, rtol=0)


@pytest.mark.parametrize("argv, needle", [
    (["convert", "./no/such/model", "x", "--sparsity", "2"], "./no/such/model: no such folder; give a model folder"),
    (["convert", "m", "x", "--sparsity", "0.5"], "MoSAConfig.sparsity must be a finite number >= 1"),
    (["convert", "m", "x", "--sparsity", "inf"], "MoSAConfig.sparsity must be a finite number >= 1, got inf"),
    (["convert", "m", "x", "--config", "/no/such.json"], "--config /no/such.json does not exist"),
    (["convert", "m", "x", "--dense-heads", "2.5"], "integer >= 0 or a fraction"),
    (["inspect", "/no/such/dir"], "/no/such/dir: no such folder"),
    (["eval", "some-org/no-such-model"], "some-org/no-such-model: no such folder, and the hub is not reachable"),
])
def test_convert_and_inspect_errors(argv, needle, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2 and needle in capsys.readouterr().err


def test_convert_with_calibrated_fill_from_a_text_file(tmp_path, capsys):
    """Paper-form heads with --fill mean --head-choice scored --router-init calibrated on a checkpoint with a
    tokenizer and --calib-text."""
    from train_fixtures import make_world

    import mosa_retrofit
    from mosa_retrofit.convert.surgery import mosa_layers

    model_dir, data = make_world(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(model_dir), str(out), "--sparsity", "4", "--dense-heads", "1", "--head-choice",
                 "scored", "--router-init", "calibrated", "--fill", "mean", "--sparse-heads", "mosa",
                 "--calib-text", str(data), "--calib-sequences", "2", "--calib-length", "32"]) == 0
    printed = capsys.readouterr().out
    # the check ran in blocks of the model's 128 positions, and says so (on the console and in the card)
    assert re.search(r"check \(held-out perplexity: .* in blocks of 128\): original", printed)
    assert "in blocks of 128: original" in (out / "README.md").read_text()
    model = mosa_retrofit.load(str(out))
    layers = mosa_layers(model)
    assert model.config.mosa["fill"] == "mean" and all(m.mosa_fill.abs().sum() > 0 for m in layers.values())
    with pytest.raises(SystemExit) as e:
        main(["convert", str(model_dir), str(tmp_path / "x"), "--fill", "average"])
    assert e.value.code == 2 and "invalid choice: 'average'" in capsys.readouterr().err


def test_convert_flags_are_generated_from_mosaconfig(capsys):
    """Every MoSAConfig field a flag can hold has one (help from the field's docstring, its default in words);
    given flags override the preset, absent ones leave it alone."""
    import dataclasses

    from mosa_retrofit.cli.common import field_docs
    from mosa_retrofit.cli.convert import CONFIG_SKIP, build_config
    from mosa_retrofit.cli.main import build_parser

    from mosa_retrofit import MoSAConfig

    parser = build_parser()
    argv = ["convert", "m", "out", "--sparsity", "4", "--no-include-first", "--threshold-length", "none",
            "--routing", "expert_choice", "--dense-heads", "0.5", "--layers", "0,2"]
    assert build_config(parser.parse_args(argv)) == MoSAConfig(
        sparsity=4, include_first=False, threshold_length=None, routing="expert_choice", dense_heads=0.5,
        layers=[0, 2])
    assert build_config(parser.parse_args(["convert", "m", "out", "--preset", "paper", "--sparsity", "2"])) == \
        MoSAConfig.paper(sparsity=2)
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(MoSAConfig)
    for f in dataclasses.fields(MoSAConfig):
        if f.name not in CONFIG_SKIP:
            assert "--" + f.name.replace("_", "-") in text
            assert " ".join(docs[f.name].split()[:4]) in text  # the docstring is the help


def test_overwrite_replaces_only_a_converted_checkpoint(tmp_path, monkeypatch, capsys):
    """--overwrite never deletes what the user owns: the working directory, the input model or a folder holding
    it, a folder with other files; it replaces a folder convert wrote, and a failed run leaves no temporary folder."""
    from tiny_models import tiny_model

    models = tmp_path / "models"
    base = models / "base"
    tiny_model("llama").save_pretrained(base)
    (models / "notes.txt").write_text("mine")
    fast = ["--preset", "paper", "--dense-heads", "1", "--no-check", "--overwrite"]
    monkeypatch.chdir(models)
    for out in (".", str(base), str(models)):
        assert main(["convert", str(base), out, *fast]) == 2
        assert "--overwrite refuses" in capsys.readouterr().err
    assert (models / "notes.txt").read_text() == "mine" and (base / "config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"mosa": {"sparsity": 8}}')
    (other / "thesis.tex").write_text("mine")
    assert main(["convert", str(base), str(other), *fast]) == 2 and (other / "thesis.tex").exists()
    assert "also holds ['thesis.tex']" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["convert", str(base), str(out), *fast[:-1]]) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["convert", str(base), str(out), *fast, "--sparsity", "2"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns >= first and '"sparsity": 2' in (out / "config.json").read_text()
    assert main(["convert", str(base), str(tmp_path / "bad"), *fast, "--layers", "7"]) == 2  # fails in convert_
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_a_name_the_hub_does_not_know_is_one_line(monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo, name: False)  # the hub answered: no such repo
    assert main(["generate", "some-org/typo", "hello"]) == 2
    assert "some-org/typo: no such folder, and no model of that name on the hub" in capsys.readouterr().err


def test_malformed_config_json_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text('{\n  "sparsity": 8,\n  "dense_heads": \n}\n')
    assert main(["convert", "m", "x", "--config", str(bad)]) == 2
    assert f"--config {bad}: not valid JSON (line 4" in capsys.readouterr().err
    bad.write_text('{"version": "1"}')
    assert main(["convert", "m", "x", "--config", str(bad)]) == 2
    from mosa_retrofit.convert.config import CONFIG_VERSION

    assert f"MoSAConfig.version must be an integer in 1..{CONFIG_VERSION}, got '1'" in capsys.readouterr().err


def test_empty_prompt_and_empty_data_get_one_line(tmp_path, capsys):
    from train_fixtures import make_world

    model_dir, _ = make_world(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    assert main(["generate", str(model_dir), "  ", "--max-new-tokens", "2"]) == 2
    assert "PROMPT is empty" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(empty)]) == 2
    assert f"data.source {str(empty)!r} holds no text" in capsys.readouterr().err


def test_an_interrupted_convert_leaves_nothing_half_written_and_the_next_run_sweeps_what_a_kill_left(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same interrupt) while OUT is written: exit 130, a line
    that says what to do, no temporary folder; a folder a killed run left (its process gone) is removed by the
    next convert into the same OUT. The base model is stored as an absolute path, whatever the working folder."""
    import json
    import os
    import signal

    import transformers
    from tiny_models import tiny_model

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    argv = ["convert", "base", "out", "--preset", "paper", "--dense-heads", "1", "--no-check"]

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` or a scheduler's stop sends

    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "save_pretrained", interrupted)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; nothing half-written was left" in err and "run the command again" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back

    dead = 2 ** 22 + 12345  # above any pid the kernel hands out here
    (tmp_path / f".out.tmp-{dead}-abc123").mkdir()
    (tmp_path / f".out.tmp-{dead}-abc123" / "model.safetensors").write_bytes(b"half")
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["mosa"]["base_model_name_or_path"]
    assert saved == str(base.resolve())


def test_convert_in_bfloat16_equals_the_fp32_conversion_within_bf16_error(tmp_path, capsys):
    """`convert --dtype bfloat16`: the same dense heads, routers and thresholds within bf16's error (statistics
    accumulate in fp32/fp64 either way), weights saved in bf16, and the check's perplexity within 2 %."""
    import json

    import torch
    from safetensors.torch import load_file
    from train_fixtures import make_world

    base, data = make_world(tmp_path, positions=1024)  # room for the retrieval prompts
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["convert", str(base), str(tmp_path / dtype), "--dtype", dtype, "--calibration-data", str(data),
                     "--calib-sequences", "4", "--calib-length", "256"]) == 0
        m = re.search(r"original ([\d.]+), converted ([\d.]+)", capsys.readouterr().out)
        ppl[dtype] = float(m.group(1)), float(m.group(2))
    fp32, bf16 = (json.loads((tmp_path / d / "config.json").read_text())["mosa"] for d in ("float32", "bfloat16"))
    assert fp32["dense_head_ids"] == bf16["dense_head_ids"]
    a, b = load_file(str(tmp_path / "float32" / "model.safetensors")), load_file(str(tmp_path / "bfloat16" / "model.safetensors"))
    assert b["model.embed_tokens.weight"].dtype == torch.bfloat16 and a.keys() == b.keys()
    for k in (k for k in a if k.endswith("mosa_router")):
        assert ((a[k] - b[k].float()).norm() / a[k].norm()).item() < 5e-2, k
    for k in (k for k in a if k.endswith("mosa_threshold")):
        assert (a[k] - b[k].float()).abs().max().item() < 0.1, k
    for i in (0, 1):
        assert abs(ppl["bfloat16"][i] / ppl["float32"][i] - 1) < 0.02, ppl


def test_eval_of_one_held_out_document_needs_no_training_document(tmp_path, capsys):
    from train_fixtures import make_world

    model_dir, data = make_world(tmp_path)
    one = tmp_path / "onedoc.txt"
    one.write_text(data.read_text().split("\n\n")[0] * 20)  # one paragraph: one document, repeated past a block
    assert main(["eval", str(model_dir), "--data", str(one), "--validation-documents", "1", "--block-size", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out.lower()


def test_two_converts_into_one_out_one_wins_and_the_other_says_so(tmp_path, capsys):
    """While a convert holds OUT (here: this test, holding its lock as a running convert does), a second convert
    into OUT, --overwrite or not, stops in one line and touches nothing; once the lock is gone it runs. A real
    two-process race: both started together, exactly one reports success, OUT holds one whole model."""
    import os

    from tiny_models import tiny_model

    from mosa_retrofit.atomic import output_lock

    base, out = tmp_path / "base", tmp_path / "out"
    tiny_model("llama").save_pretrained(base)
    fast = ["--preset", "paper", "--dense-heads", "1", "--sparsity", "4", "--no-check"]
    assert main(["convert", str(base), str(out), *fast]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    with output_lock(out):
        assert main(["convert", str(base), str(out), *fast, "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"OUT {out} is being written by another mosa-retrofit run (pid {os.getpid()})" \
            in err[0], err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # the lock file is gone with its holder

    race = tmp_path / "race"
    argv = [sys.executable, "-m", "mosa_retrofit", "convert", str(base), str(race), *fast]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "being written by another" in loser or f"{race} exists" in loser or "appeared while this ran" in loser
    assert (race / "model.safetensors").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]



def test_convert_plans_the_check_once_and_the_conversion_once(tmp_path, monkeypatch):
    """A CLI convert checks the config's structure once (before loading text or measuring) and plans the
    conversion once: convert_ is told the check ran (a save that reloads nothing plans nothing more)."""
    from tiny_models import tiny_model

    from mosa_retrofit.convert import surgery

    tiny_model("llama").save_pretrained(tmp_path / "base")
    calls = []
    plan = surgery.plan_layers

    def counted(model, config, evidence=None, *args, **kwargs):
        calls.append("check" if evidence is None else "plan")
        return plan(model, config, evidence, *args, **kwargs)

    monkeypatch.setattr(surgery, "plan_layers", counted)
    assert main(["convert", str(tmp_path / "base"), str(tmp_path / "out"), "--preset", "paper", "--dense-heads", "1",
                 "--sparsity", "4", "--no-check"]) == 0
    assert calls == ["check", "plan"]
