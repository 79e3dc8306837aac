"""FSDP2 (``training.distributed: fsdp``) with 2 CPU processes (torchrun, gloo) on a tiny model: the same weights
as 1 process at the same global batch, sharded checkpoints that resume bit-exactly after a SIGKILL, MoSA-slice
masks, bf16 autocast and gradient checkpointing under sharding, and a consolidated ``final/``."""

import json
import os
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

import mosa_retrofit
from mosa_retrofit.train.recipe import Recipe
from mosa_retrofit.train.trainer import train

PORT = iter(range(29610, 29700))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def fsdp_recipe(world, out, **over) -> dict:
    r = recipe_dict(*world, out, **over)
    r["training"]["distributed"] = "fsdp"
    return r


def torchrun(recipe: dict, cwd: Path, *extra: str, wait: bool = True):
    path = cwd / f"recipe-{Path(recipe['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(PORT)),
           "-m", "mosa_retrofit", "train", str(path), "training.micro_batch_size=2", "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


def weights(out):
    return load_file(str(Path(out) / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def two(world, tmp_path_factory):
    """The reference 2-process FSDP run: router warm-up (sharded: each router gathered, its gradient
    reduce-scattered), then adaptation (all weights + KD to a sharded teacher), checkpoints every 3 steps."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(fsdp_recipe(world, root / "two"), root)
    return root / "two"


@pytest.mark.slow  # (torchrun launches)
def test_two_fsdp_processes_match_one(world, two, tmp_path):
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2
    newest = sorted(two.glob("checkpoint-*"))[-2]  # mid-adaptation (global step 9): sharded model and optimizer
    assert (newest / "sharded" / ".metadata").is_file() and not (newest / "model.safetensors").exists()
    one = train(Recipe.from_dict(fsdp_recipe(world, tmp_path / "one")), progress=False)  # 1 process: not sharded
    a, b = weights(tmp_path / "one"), weights(two)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for x, y in zip(one["evals"], summary["evals"]):
        assert abs(x["ppl"] / y["ppl"] - 1) < 1e-5
    model = mosa_retrofit.load(str(two / "final"))  # final/ is an ordinary consolidated checkpoint
    assert {k: v for k, v in model.state_dict().items() if k in b}.keys() == b.keys()


@pytest.mark.slow  # (three torchrun launches: ~25 s)
def test_a_killed_fsdp_run_resumes_bit_exactly(world, tmp_path):
    over = {"stages": [{"name": "router_warmup", "kind": "router_warmup", "steps": 4, "lr": 0.01},
                       {"name": "adaptation", "kind": "adaptation", "steps": 20, "trainable": "all", "kd_weight": 0.5}]}
    torchrun(fsdp_recipe(world, tmp_path / "ref", **over), tmp_path)
    out = tmp_path / "run"
    proc = torchrun(fsdp_recipe(world, out, **over), tmp_path, wait=False)
    log = out / "metrics.jsonl"
    seen = 0
    while proc.poll() is None and seen < 11:  # past the checkpoint at global step 9, mid-stage
        if log.exists():
            steps = [json.loads(line)["global_step"] for line in log.read_text().splitlines() if line.strip()]
            seen = max(steps, default=0)
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()
    assert any((p / "sharded").is_dir() for p in out.glob("checkpoint-*"))
    torchrun(fsdp_recipe(world, out, **over), tmp_path, "--resume")
    a, b = weights(tmp_path / "ref"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # (torchrun launches)
def test_mosa_slices_bf16_autocast_and_checkpointing_under_fsdp(world, tmp_path):
    """trainable: mosa under sharding: the dense heads' rows of q/k/v/o stay bit-exact (masks laid out as the
    shards are), the MoSA rows learn; with bf16 autocast and gradient checkpointing."""
    from mosa_retrofit.convert.surgery import mosa_layers
    from mosa_retrofit.train.trainable import head_masks

    over = {"stages": [{"name": "slices", "kind": "adaptation", "steps": 8, "trainable": "mosa", "lr": 0.01}],
            "training": {"micro_batch_size": 4, "mixed_precision": "bf16", "gradient_checkpointing": True,
                         "distributed": "fsdp"}}
    torchrun(recipe_dict(*world, tmp_path / "slices", **over), tmp_path)
    summary = json.loads((tmp_path / "slices" / "summary.json").read_text())
    ppl = {e["name"]: e["ppl"] for e in summary["evals"]}
    assert ppl["after slices"] < ppl["after conversion"]
    model = mosa_retrofit.load(str(tmp_path / "slices" / "final"))
    original = load_file(str(world[0] / "model.safetensors"))
    for i, m in mosa_layers(model).items():
        for name, mask in head_masks(m).items():
            key = f"model.layers.{i}.self_attn.{name}"
            trained = dict(m.named_parameters())[name].detach()
            assert torch.equal(trained[~mask.bool()], original[key][~mask.bool()]), key  # frozen rows exact
            assert not torch.equal(trained[mask.bool()], original[key][mask.bool()]), key  # MoSA rows learned


@pytest.mark.slow  # (torchrun launches)
def test_lora_under_fsdp_matches_one_process_and_resumes(world, tmp_path):
    """A LoRA stage on the sharded model (adapters whole on every process, gradients averaged; merged into the
    sharded base weights at the stage's end), killed after its checkpoint at global step 3 and resumed: the
    same final weights as 1 process, within 1e-5."""
    over = {"stages": [{"name": "lora", "kind": "adaptation", "steps": 12, "trainable": "routers", "lr": 0.01,
                        "kd_weight": 0.5, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "gate_proj"]}}]}
    out = tmp_path / "two"
    proc = torchrun(fsdp_recipe(world, out, **over), tmp_path, wait=False)
    while proc.poll() is None and not (out / "checkpoint-0000003").is_dir():
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()
    torchrun(fsdp_recipe(world, out, **over), tmp_path, "--resume")
    train(Recipe.from_dict(fsdp_recipe(world, tmp_path / "one", **over)), progress=False)
    a, b = weights(tmp_path / "one"), weights(out)
    assert a.keys() == b.keys() and not any("lora" in k for k in a)  # merged
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    original = load_file(str(world[0] / "model.safetensors"))
    assert not torch.equal(b["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"])


def test_fsdp_recipe_errors():
    with pytest.raises(ValueError, match=r"\['d'\]: with training.distributed=fsdp, layer_distill stages come"):
        Recipe.from_dict(recipe_dict(Path("m"), Path("d.txt"), Path("o"), training={"distributed": "fsdp"},
                                     stages=[{"name": "a", "kind": "adaptation", "steps": 2},
                                             {"name": "d", "kind": "layer_distill", "steps": 2}]))
    with pytest.raises(ValueError, match="distributed must be one of"):
        Recipe.from_dict(recipe_dict(Path("m"), Path("d.txt"), Path("o"), training={"distributed": "zero3"}))




@pytest.mark.slow  # (torchrun launches)
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes_exactly(world, two, tmp_path):
    """The 2-process FSDP run's checkpoint at global step 9 (mid-adaptation) continues on 1 process (micro-batch 4)
    and on 4 processes (micro-batch 1): the same global batch, DCP reshards weights and Adam states, and both end
    within 1e-5 of the uninterrupted 2-process run; a split that changes the global batch is refused."""
    import shutil

    def from_step_9(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(two, out)
        for p in out.iterdir():
            if p.name in ("final", "summary.json", "summary.md") or (p.name.startswith("checkpoint-") and
                                                                       int(p.name.split("-")[1]) > 9):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        assert [p.name for p in out.glob("checkpoint-*")][-1].endswith("9")
        return out

    one = from_step_9("one")
    with pytest.raises(ValueError, match=r"global batch: 4 \(2 processes x micro-batch 2 x 1 accumulation\) -> 2"):
        train(Recipe.from_dict(fsdp_recipe(world, one), ["training.micro_batch_size=2"]), resume=True, progress=False)
    train(Recipe.from_dict(fsdp_recipe(world, one), ["training.micro_batch_size=4"]), resume=True, progress=False)
    reference = weights(two)
    for out in (one, from_step_9("four")):
        if out.name == "four":
            four = fsdp_recipe(world, out)
            path = tmp_path / "recipe-four.yaml"
            path.write_text(yaml.safe_dump(four))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                   str(next(PORT)), "-m", "mosa_retrofit", "train", str(path), "training.micro_batch_size=1",
                   "--quiet", "--resume"]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  timeout=300, cwd=tmp_path)
            assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if "Error" in l or "error:" in l)[:3000]
        got = weights(out)
        assert got.keys() == reference.keys()
        assert max((got[k] - reference[k]).abs().max().item() for k in got) < 1e-5, out.name
