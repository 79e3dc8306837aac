"""Checkpoints survive faults: kills at any moment (mid-step, mid-checkpoint, SIGKILL from outside) and damaged
checkpoints (truncated, missing or altered files) resume to the same final weights, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import make_world, recipe_dict

from mosa_retrofit.train import checkpoint as ckpt
from mosa_retrofit.train.recipe import Recipe
from mosa_retrofit.train.trainer import train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(world, out)
    return load_file(str(out / "final" / "model.safetensors"))


def run(world, out, resume=False, interrupt=None):
    # checkpoints at global steps 0, 3, 4 (end of warm-up), 6, 9, 10; keep_last = 2
    recipe = Recipe.from_dict(recipe_dict(*world, out))
    return train(recipe, resume=resume, progress=False, interrupt=interrupt)


def same_final(out, reference):
    final = load_file(str(Path(out) / "final" / "model.safetensors"))
    return final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


class Killed(BaseException):  # not an Exception: nothing in the trainer may catch it
    pass


def truncate(name):
    def damage(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return damage


def remove(name):
    return lambda folder: (folder / name).unlink()


def flip_a_byte(name):
    def damage(folder):
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0x01  # same size, different content
        (folder / name).write_bytes(bytes(data))
    return damage


DAMAGES = {"truncated model.safetensors": truncate("model.safetensors"),
           "truncated optimizer.pt": truncate("optimizer.pt"),
           "missing optimizer.pt": remove("optimizer.pt"),
           "one byte of model.safetensors changed": flip_a_byte("model.safetensors"),
           "missing manifest and optimizer.pt": lambda f: (remove("manifest.json")(f), remove("optimizer.pt")(f)),
           "unreadable state.json": lambda f: (f / "state.json").write_text("{")}


def kill_at_step_9(world, out):
    def kill(stage, step):
        if (stage, step) == ("adaptation", 4):  # global step 9 in progress: checkpoints 4 and 6 on disk
            raise Killed

    with pytest.raises(Killed):
        run(world, out, interrupt=kill)


def test_manifest_names_what_is_wrong(world, tmp_path):
    out = tmp_path / "run"
    kill_at_step_9(world, out)
    newest = ckpt.checkpoints(out)[-1]  # mid-stage: with the optimizer
    assert ckpt.problem(newest) is None
    listed = json.loads((newest / "manifest.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in newest.iterdir() if p.name != "manifest.json")
    expect = {"truncated model.safetensors": "model.safetensors has", "truncated optimizer.pt": "optimizer.pt has",
              "missing optimizer.pt": "optimizer.pt is missing",
              "one byte of model.safetensors changed": "model.safetensors does not match its SHA-256",
              "missing manifest and optimizer.pt": "manifest.json is missing",
              "unreadable state.json": "state.json"}
    for i, (name, damage) in enumerate(DAMAGES.items()):
        copy = tmp_path / f"copy{i}" / newest.name
        copy.parent.mkdir()
        os.system(f"cp -r '{newest}' '{copy}'")
        damage(copy)
        assert expect[name] in (ckpt.problem(copy) or ""), name
    for path in ckpt.checkpoints(out):  # a run written before manifests existed: complete, so usable
        (path / "manifest.json").unlink()
    assert ckpt.problem(newest, legacy=True) is None and ckpt.usable(out) == (newest, [])
    (newest / "model.safetensors").unlink()
    assert ckpt.usable(out)[1] == [(newest, "model.safetensors is missing")]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_and_ends_identical(world, tmp_path, reference, damage, caplog):
    out = tmp_path / "run"
    kill_at_step_9(world, out)
    DAMAGES[damage](out / "checkpoint-0000006")
    with caplog.at_level("WARNING", logger="mosa_retrofit"):
        run(world, out, resume=True)
    assert "checkpoint-0000006 is damaged" in caplog.text
    assert (out / "damaged-checkpoint-0000006").is_dir()  # kept for a look, never counted by keep_last
    assert same_final(out, reference)


def test_no_intact_checkpoint_is_one_clear_error(world, tmp_path):
    out = tmp_path / "run"
    kill_at_step_9(world, out)
    truncate("model.safetensors")(out / "checkpoint-0000004")
    remove("optimizer.pt")(out / "checkpoint-0000006")
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*checkpoint-0000006: optimizer.pt is missing.*"
                                         r"checkpoint-0000004: model.safetensors has"):
        run(world, out, resume=True)
    assert (out / "checkpoint-0000006").is_dir() and (out / "checkpoint-0000004").is_dir()  # nothing moved


def test_a_missing_optimizer_never_restarts_the_schedule_silently(world, tmp_path):
    out = tmp_path / "run"
    kill_at_step_9(world, out)
    for path in ckpt.checkpoints(out):  # a run from before manifests: the gap shows when the optimizer is needed
        (path / "manifest.json").unlink()
    (out / "checkpoint-0000006" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="checkpoint-0000006 has no optimizer.pt to continue its stage with"):
        run(world, out, resume=True)


def test_kills_at_random_moments_and_damage_resume_bit_identical(world, tmp_path, reference, monkeypatch):
    """Seeded random kill moments: during training steps and during checkpoint writes (between any two files),
    with the newest checkpoint damaged after some kills; every resume continues; the end is bit-identical."""
    rng = random.Random(7)
    out = tmp_path / "run"
    writes = {"n": 0, "kill_at": None}
    real_save, real_manifest = torch.save, ckpt.write_manifest

    def counted(fn):
        def wrapped(*args, **kwargs):
            writes["n"] += 1
            if writes["n"] == writes["kill_at"]:
                raise Killed
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ckpt.torch, "save", counted(real_save))  # rng, optimizer, scheduler files
    monkeypatch.setattr(ckpt, "write_manifest", counted(real_manifest))  # the last write before the rename
    steps = [("router_warmup", s) for s in range(4)] + [("adaptation", s) for s in range(6)]
    damages = [d for name, d in DAMAGES.items() if "optimizer" not in name]  # stage ends have no optimizer
    kills = 0
    for attempt in range(12):
        writes["n"], writes["kill_at"], moment = 0, None, None
        if attempt < 6:
            if rng.random() < 0.5:
                moment = rng.choice(steps)
            else:
                writes["kill_at"] = rng.randint(1, 12)

        def interrupt(stage, step, moment=moment):
            if (stage, step) == moment:
                raise Killed

        try:  # resume=True with no checkpoint yet (killed during the first write) starts afresh
            run(world, out, resume=attempt > 0, interrupt=interrupt)
            break
        except Killed:
            kills += 1
            hidden = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
            assert not hidden, hidden  # an interrupted checkpoint write removes its temporary folder
            found = ckpt.checkpoints(out)
            if len(found) > 1 and rng.random() < 0.5:  # damage the newest while an older one is left
                rng.choice(damages)(found[-1])
    assert kills >= 3
    assert same_final(out, reference)


@pytest.mark.slow  # (CLI processes killed at random times: ~20 s)
def test_sigkill_from_outside_at_random_times(world, tmp_path, reference):
    """The real thing: ``kill -9`` on the CLI process at random wall-clock times, then ``--resume``."""
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(*world, out)))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    argv = [sys.executable, "-m", "mosa_retrofit", "train", str(recipe), "--quiet"]
    rng, kills = random.Random(3), 0
    for attempt in range(6):
        log = out / "metrics.jsonl"
        stamp = log.stat().st_mtime_ns if log.exists() else None
        proc = subprocess.Popen(argv + ["--resume"] * (attempt > 0), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if attempt < 3:  # once the run writes its log (imports and conversion done), at a random moment
            while proc.poll() is None and (log.stat().st_mtime_ns if log.exists() else None) == stamp:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))  # the tiny run trains for about 1.5 s on 2 cores
            proc.send_signal(signal.SIGKILL)
        err = proc.communicate(timeout=300)[1].decode()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
        kills += 1
    print(f"{kills} kills; checkpoints left by them: {[p.name for p in ckpt.checkpoints(out)]}")
    assert kills >= 2 and (out / "final").is_dir()
    assert same_final(out, reference)


@pytest.mark.parametrize("at", ["torch.save", "write_manifest"])
def test_an_interrupted_checkpoint_write_leaves_no_hidden_folder(world, tmp_path, monkeypatch, at):
    """Ctrl-C (KeyboardInterrupt) while a checkpoint is being written: its temporary folder is removed, the
    message's promise that nothing half-written was left holds, and --resume continues from what is on disk."""
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = ckpt.torch if at == "torch.save" else ckpt
    monkeypatch.setattr(target, at.split(".")[-1], interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(world, out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".mosa_retrofit-run"] == []
    assert ckpt.checkpoints(out) == []


def test_an_interrupted_final_save_leaves_nothing_hidden_and_resumes(world, tmp_path, monkeypatch, reference):
    """Ctrl-C while final/ is written: no temporary folder, no half final/; --resume writes the same final."""
    from transformers import PreTrainedTokenizerBase

    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)  # final/ only saves a tokenizer
    with pytest.raises(KeyboardInterrupt):
        run(world, out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".mosa_retrofit-run"] == []
    assert not (out / "final").exists()
    monkeypatch.undo()
    run(world, out, resume=True)
    assert same_final(out, reference)
