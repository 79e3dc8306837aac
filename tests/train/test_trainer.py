"""End-to-end recipe runs on a tiny random-config model: learning, exact resume, 2 processes, LoRA, warm-up."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import recipe_dict, records, run, weights, world  # noqa: F401  (world: the module fixture)

import mosa_retrofit
from mosa_retrofit.text.data import as_blocks
from mosa_retrofit.train.trainer import lr_factor

ROOT = Path(__file__).resolve().parents[2]


def held_out_ppl(model_dir_or_model, world, block=128, tokens=256):
    """Perplexity of the last 6 paragraphs, computed here from scratch (no mosa_retrofit helpers). The defaults
    are what training measures: the evaluation protocol's 1024-token blocks, capped at the tiny model's 128
    positions, over the 256 held-out tokens the recipe reads."""
    from transformers import AutoTokenizer

    model_dir, data = world
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = data.read_text().strip().split("\n\n")[-6:]
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = as_blocks(torch.tensor(ids[:tokens]), block)
    model = model_dir_or_model
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_loss_decreases_and_the_final_model_loads(world, tmp_path):
    out = tmp_path / "run"
    summary = run(world, out, ["stages.adaptation.steps=12", "logging.plot=true", "checkpointing.every=100"])
    warm = [r["loss"] for r in records(out) if r["stage"] == "router_warmup"]
    lm = [r["lm"] for r in records(out) if r["stage"] == "adaptation"]
    assert len(warm) == 4 and len(lm) == 12
    assert sum(lm[-3:]) / 3 < lm[0] - 0.5  # the LM loss goes down
    ppl = {e["name"]: e["ppl"] for e in summary["evals"]}
    assert list(ppl) == ["original model", "after conversion", "after router_warmup", "after adaptation"]
    assert ppl["after adaptation"] < 0.7 * ppl["after conversion"]
    model = mosa_retrofit.load(str(out / "final"))
    assert model.config.mosa["sparsity"] == 4 and model.config.mosa["base_model_name_or_path"] == str(world[0])
    assert abs(held_out_ppl(model, world) / ppl["after adaptation"] - 1) < 1e-4  # what was measured is what was saved
    assert (out / "loss.png").stat().st_size > 10_000 and (out / "summary.md").read_text().count("|") > 10
    assert summary["tokens"] == (4 + 12) * 4 * 32


@pytest.mark.parametrize("crash_at, extra", [
    (("router_warmup", 2), []),
    (("adaptation", 4), []),
    (("adaptation", 1), ["stages.adaptation.trainable=mosa", "optimizer.weight_decay=0.1"]),
    (("adaptation", 4), ["stages.adaptation.trainable=routers", "stages.adaptation.lora={r: 4, target_modules: "
                         "[q_proj, v_proj, gate_proj]}", "stages.adaptation.lr=0.01"]),
])
def test_kill_and_resume_is_bitwise(world, tmp_path, crash_at, extra):
    ref = tmp_path / "ref"
    run(world, ref, extra)

    class Killed(Exception):
        pass

    def crash(stage, step):
        if (stage, step) == crash_at:
            raise Killed  # after the backward pass, before the optimizer step

    out = tmp_path / "crashed"
    with pytest.raises(Killed):
        run(world, out, extra, interrupt=crash)
    assert not (out / "final").exists()
    with pytest.raises(ValueError, match="--resume"):
        run(world, out, extra)  # never silently restarts over an existing run
    run(world, out, extra, resume=True)
    a, b = weights(ref / "final"), weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(ref) == [{**r, "elapsed": x["elapsed"], "tokens_per_s": x["tokens_per_s"]}
                            for r, x in zip(records(out), records(ref))]  # same losses, lr, grad norms, in order
    assert [e["ppl"] for e in json.loads((ref / "summary.json").read_text())["evals"]] == \
           [e["ppl"] for e in json.loads((out / "summary.json").read_text())["evals"]]


def test_crash_loses_only_steps_since_the_last_checkpoint(world, tmp_path):
    out = tmp_path / "run"

    def crash(stage, step):
        if (stage, step) == ("adaptation", 4):  # global step 9 in progress; checkpoints every 3 steps
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(world, out, interrupt=crash)
    names = sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".tmp")))
    assert names == ["checkpoint-0000004", "checkpoint-0000006"]  # end of warm-up, step 6; keep_last = 2
    state = json.loads((out / "checkpoint-0000006" / "state.json").read_text())
    assert (state["stage"], state["step"], state["samples"]) == (1, 2, 6 * 4)
    # a kill during a checkpoint write leaves only a temporary folder: never read, removed by the next save
    (out / ".tmp-checkpoint-0000009").mkdir()
    (out / ".tmp-checkpoint-0000009" / "model.safetensors").write_bytes(b"half-written")
    summary = run(world, out, resume=True)
    assert not list(out.glob(".tmp-*")) and summary["evals"][-1]["global_step"] == 10


def test_router_warmup_changes_only_routers(world, tmp_path):
    out = tmp_path / "run"
    run(world, out, ["stages=[{name: w, kind: router_warmup, steps: 20, lr: 0.02}]", "checkpointing.keep_last=50",
                     "checkpointing.every=100"])
    before, after = weights(out / "checkpoint-0000000"), weights(out / "checkpoint-0000020")
    routers = [k for k in before if "mosa_router" in k]
    assert len(routers) == 2 and all(not torch.equal(before[k], after[k]) for k in routers)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in routers)
    kl = [r["loss"] for r in records(out)]
    assert sum(kl[-5:]) / 5 < 0.8 * sum(kl[:5]) / 5  # the routers learn the dense attention mass


def test_lora_stage_saves_merged_and_reloads(world, tmp_path):
    out = tmp_path / "run"
    summary = run(world, out, ["stages.adaptation.trainable=routers", "stages.adaptation.lr=0.01",
                               "stages.adaptation.lora={r: 4, target_modules: [q_proj, o_proj, up_proj]}"])
    original = load_file(str(world[0] / "model.safetensors"))
    final = weights(out / "final")
    assert not any("lora" in k for k in final)  # merged: a plain converted checkpoint
    for k, v in original.items():
        if any(t in k for t in ("q_proj.weight", "o_proj.weight", "up_proj.weight")):
            assert not torch.equal(v, final[k]), k
        else:
            assert torch.equal(v, final[k]), k  # untouched by LoRA
    model = mosa_retrofit.load(str(out / "final"))
    after = summary["evals"][-1]["ppl"]
    assert abs(held_out_ppl(model, world) / after - 1) < 1e-4
    assert after < summary["evals"][1]["ppl"]


@pytest.mark.slow  # (a torchrun launch)
def test_two_processes_match_one(world, tmp_path):
    """torchrun, 2 CPU processes (gloo, DDP) at micro-batch 2 == 1 process at micro-batch 4 (same global batch)."""
    model_dir, data = world
    path = tmp_path / "recipe.yaml"
    yaml.safe_dump(recipe_dict(model_dir, data, tmp_path / "two"), path.open("w"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m",
           "mosa_retrofit", "train", str(path), "training.micro_batch_size=2", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    one = run(world, tmp_path / "one")
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for x, y in zip(one["evals"], two["evals"]):
        assert abs(x["ppl"] / y["ppl"] - 1) < 1e-5


def test_gradient_checkpointing_and_bf16_autocast(world, tmp_path):
    plain = tmp_path / "plain"
    run(world, plain)
    ckpt = tmp_path / "ckpt"
    run(world, ckpt, ["training.gradient_checkpointing=true"])
    a, b = weights(plain / "final"), weights(ckpt / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    bf16 = run(world, tmp_path / "bf16", ["training.mixed_precision=bf16"])
    assert bf16["evals"][-1]["ppl"] < bf16["evals"][1]["ppl"]


def test_lr_schedule():
    steps, warm, floor = 20, 0.25, 0.1
    got = [lr_factor(k, steps, warm, floor) for k in range(steps)]
    assert got[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # 5 linear warm-up steps
    for k in range(5, steps):
        expect = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (k - 5) / 15))
        assert abs(got[k] - expect) < 1e-12
    assert lr_factor(0, 10, 0.0, 0.0) == 1.0


def test_cli_train_check_overrides_and_errors(world, tmp_path):
    from mosa_retrofit.cli.main import main

    model_dir, data = world
    path = tmp_path / "r.yaml"
    yaml.safe_dump(recipe_dict(model_dir, data, tmp_path / "out"), path.open("w"))
    assert main(["train", str(path), "stages.adaptation.steps=2", "--check"]) == 0
    assert main(["train", str(path), "--check", "stages.adaptation.steps=2"]) == 0  # overrides after options too
    assert main(["train", str(path), "--check", "optimizer.lr=[1,"]) == 2  # a malformed override: one line
    assert main(["train", str(path), "stages.adaptation.stepz=2", "--check"]) == 2
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "out").exists()  # nothing ran


def test_cli_eval_reports_model_and_baseline(world, tmp_path, capsys):
    from mosa_retrofit.cli.main import main

    out = tmp_path / "run"
    run(world, out)
    model_dir, data = world
    assert main(["eval", str(out / "final"), "--data", str(data), "--validation-documents", "6", "--block-size", "32",
                 "--max-tokens", "256", "--baseline", "--cost-seq-len", "64"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith(f"| {out}") or line.startswith(f"| {model_dir}")]
    assert len(rows) == 2
    ppl_model, ppl_base = (float(r.split("|")[2]) for r in rows)
    from transformers import AutoModelForCausalLM

    assert abs(ppl_model - held_out_ppl(mosa_retrofit.load(str(out / "final")), world, block=32)) < 0.01
    assert abs(ppl_base - held_out_ppl(AutoModelForCausalLM.from_pretrained(model_dir), world, block=32)) < 0.01
    flops, kv_bytes, kv = (float(x) for x in rows[0].split("|")[4:7])
    # bytes: the dense head 0 reads KV head 0 (one row of T); each MoSA head caches k rows; the original 2 x T
    assert abs(kv_bytes - (64 + 3 * 16) / (2 * 64)) < 1e-3
    # 1 dense + 3 MoSA heads of d=16, D=64, T=64, k=16 against 4 dense heads, per layer
    dense = 8 * 64 * 16 * 64 + 2 * 16 * 64 * 64
    mosa = 8 * 64 * 16 * 16 + 2 * 16 * 16 * 16 + 2 * 64 * 64
    assert abs(flops - (dense + 3 * mosa) / (4 * dense)) < 1e-3 and abs(kv - (64 + 3 * 16) / (4 * 64)) < 1e-3
    with pytest.raises(SystemExit) as e:  # refused where it is parsed
        main(["eval", str(out / "final"), "--block-size", "0"])
    assert e.value.code == 2
    assert main(["eval", str(out / "final"), "--data", str(data), "--validation-documents", "6", "--block-size", "32",
                 "--max-tokens", "256", "--causal"]) == 0
    causal_row = [line for line in capsys.readouterr().out.splitlines() if "(causal routing)" in line]
    assert len(causal_row) == 1 and float(causal_row[0].split("|")[2]) > 1


def test_a_diverging_run_stops_and_saves_nothing_non_finite(world, tmp_path, monkeypatch):
    """A step whose gradients are not finite stops the run with a message naming the stage and step; no
    checkpoint holds non-finite weights and the last good one survives."""
    import pytest

    from mosa_retrofit.train.recipe import Recipe
    from mosa_retrofit.train.trainer import Trainer

    out = tmp_path / "nan"
    seen = {}
    real = Trainer._run_stage

    def run_stage(self, i, stage):
        seen["trainer"] = self
        return real(self, i, stage)

    def diverge(stage, step):  # runs after the backward pass: NaN gradients, as a diverging step gives
        if stage == "adaptation" and step == 2:
            for p in seen["trainer"].student.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "_run_stage", run_stage)
    with pytest.raises(ValueError, match=r"training diverged in stage adaptation at step 3: .* gradient norm nan"):
        run(world, out, interrupt=diverge, checkpointing={"every": 2, "keep_last": 3})
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints
    for ckpt_dir in checkpoints:
        assert all(torch.isfinite(t).all() for t in weights(ckpt_dir).values()), ckpt_dir
    assert not (out / "final").exists()
    with pytest.raises(ValueError, match="optimizer.lr must be a finite number > 0"):
        Recipe.from_dict(recipe_dict(*world, out), ["optimizer.lr=.inf"])


def test_a_run_that_ends_worse_than_its_conversion_warns(world, tmp_path, monkeypatch, caplog):
    from mosa_retrofit.train.trainer import Trainer

    scores = iter([10.0, 20.0, 25.0, 30.0, 35.0])  # original, after conversion, after each stage, ...
    monkeypatch.setattr(Trainer, "evaluate", lambda self, model: next(scores))
    with caplog.at_level("WARNING", logger="mosa_retrofit"):
        summary = run(world, tmp_path / "worse")
    assert "worse than right after conversion (20.00)" in summary["warning"] and "worse than right after" in caplog.text


def test_resume_refuses_a_recipe_that_changes_the_weights_and_a_fresh_run_keeps_out_of_user_folders(world, tmp_path):
    """A run stopped at a checkpoint, resumed with a changed block size, conversion or learning rate: refused,
    listing what changed (a resumed run must continue that run); logging, evaluation and checkpointing may
    change. A fresh run never writes into a folder of the user's files; --resume with nothing to resume says so."""

    class Stop(Exception):
        pass

    def stop(stage, step):
        if (stage, step) == ("adaptation", 1):
            raise Stop

    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(world, out, interrupt=stop)
    for change, needle in [(["data.block_size=16"], r"data.block_size: 32 -> 16"),
                           (["conversion.mosa.sparsity=2"], r"conversion.mosa.sparsity: 4 -> 2"),
                           (["stages.adaptation.lr=0.01"], r"stages\[1\].lr: None -> 0.01")]:
        with pytest.raises(ValueError, match=rf"--resume: the recipe differs .*{needle}"):
            run(world, out, change, resume=True)
    # allowed (ends the run): logging, checkpointing, and the attention kernel (every backend computes the same)
    run(world, out, ["logging.every=2", "checkpointing.keep_last=3", "conversion.mosa.attn_backend=math"],
        resume=True)
    assert (out / "final" / "model.safetensors").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my notes")
    with pytest.raises(ValueError, match=r"holds files this tool did not write \(summary.md\)"):
        run(world, mine)
    assert (mine / "summary.md").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["summary.md"]
    with pytest.raises(ValueError, match="nothing to resume"):
        run(world, tmp_path / "empty", resume=True)


def test_the_long_context_play_is_never_trained_on(world, tmp_path):  # noqa: F811
    """Training on the embedded plays (and Wikipedia) beside long-context checks: the play those checks score
    is left out of the training documents, and only that one (the held-out documents are the last N)."""
    from transformers import AutoTokenizer

    from mosa_retrofit.text.assets import shakespeare_plays, wikipedia_articles
    from mosa_retrofit.text.data import load_corpus
    from mosa_retrofit.train.recipe import Recipe
    from mosa_retrofit.train.trainer import Trainer

    model_dir, _ = world
    V = 6
    recipe = Recipe.from_dict(recipe_dict(model_dir, "unused", tmp_path / "run"),
                              ["data.source=shakespeare-offline,wikipedia-offline", "evaluation.long_contexts=[512]"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = Trainer(recipe, progress=False)
    trainer._long_setup(tok, None)
    plays, articles = shakespeare_plays(), wikipedia_articles()
    assert trainer.long_texts == plays[:1]  # the first play long enough: 512 + 256 tokens
    corpus = load_corpus(recipe.data, tok, progress=False, exclude=trainer.long_texts)
    train_docs = plays[1:] + articles[:-V]
    assert (corpus.train_documents, corpus.excluded_documents) == (len(train_docs), 1)
    expected = sum(len(ids) + 1 for ids in tok(train_docs, add_special_tokens=False)["input_ids"])  # (one batch)
    assert corpus.train.numel() == expected


def test_a_second_run_into_a_running_runs_output_dir_stops_in_one_line(world, tmp_path):  # noqa: F811
    """While a run holds output_dir (its writer lock), another run into it, fresh or --resume, stops before
    anything is read or written; the folder is as it was."""
    from mosa_retrofit.atomic import output_lock

    out = tmp_path / "run"
    with output_lock(out, "output_dir"):
        for resume in (False, True):
            with pytest.raises(ValueError, match=f"output_dir {out} is being written by another mosa-retrofit run"):
                run(world, out, resume=resume)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    run(world, out, ["stages.adaptation.steps=1", "stages.router_warmup.steps=1"])  # the lock gone: it runs
    assert (out / "final").is_dir()


@pytest.mark.parametrize("every", [0, 3])
def test_long_checks_fall_every_n_steps_and_at_every_stage_end(world, tmp_path, monkeypatch, every):  # noqa: F811
    """The learning curve's points: with ``long_every`` N the long checks run after conversion, every N steps of
    each stage and at each stage's end; with 0, after conversion and after the last stage only."""
    from mosa_retrofit.train.trainer import Trainer

    calls = []
    monkeypatch.setattr(Trainer, "long_evaluate", lambda self, model: calls.append(1) or {"long": {"64": len(calls)}})
    out = tmp_path / "run"
    run(world, out, [f"evaluation.long_every={every}", "evaluation.before_conversion=false"])
    got = [(r["stage"], r["step"]) for r in records(out, "validation") if "long" in r]
    # stages: router_warmup 4 steps, adaptation 6 steps (train_fixtures.recipe_dict)
    want = [("after conversion", 0)] + ([("router_warmup", 3), ("router_warmup", 4), ("adaptation", 3)] if every
                                        else []) + [("adaptation", 6)]
    assert got == want and len(calls) == len(want)
