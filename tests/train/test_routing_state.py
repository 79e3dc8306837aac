"""Routing state from the global batch (convert/thresholds.RoutingStatePool in the trainer): the causal-routing
thresholds a run saves are the same for 1 process x micro-batch 4, 1 x 2 with 2 accumulation steps, DDP 2 x 2 and
FSDP 2 x 2, as every weight is, for both head forms (key selection and the paper's MoSA heads); and they move."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from train_fixtures import make_world, recipe_dict

from mosa_retrofit.train.recipe import Recipe
from mosa_retrofit.train.trainer import train

PORT = iter(range(29710, 29790))
FORMS = {"keys": {"sparse_heads": "mosa_keys", "local_window": 6, "sink_tokens": 1},
         "paper": {"sparse_heads": "mosa"}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def recipe(world, out: Path, form: str, momentum: float = 0.5) -> dict:
    warmup = [{"name": "router_warmup", "kind": "router_warmup", "steps": 2, "lr": 0.01}] if form == "paper" else []
    r = recipe_dict(*world, out, stages=[
        *warmup, {"name": "adaptation", "kind": "adaptation", "steps": 5, "trainable": "all", "kd_weight": 0.5}])
    r["conversion"]["mosa"].update(routing="causal", threshold_momentum=momentum, **FORMS[form])
    return r


def saved(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def one_process(world, out: Path, form: str, *overrides: str, momentum: float = 0.5) -> dict:
    train(Recipe.from_dict(recipe(world, out, form, momentum), list(overrides)), progress=False)
    return saved(out)


def two_processes(world, out: Path, form: str, distributed: str) -> dict:
    r = recipe(world, out, form)
    r["training"]["distributed"] = distributed
    path = out.parent / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(r))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(PORT)),
           "-m", "mosa_retrofit", "train", str(path), "training.micro_batch_size=2", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return saved(out)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
    assert (a[worst].float() - b[worst].float()).abs().max().item() < 1e-5, worst


@pytest.mark.slow  # (4 trainings each, 2 of them launched processes)
@pytest.mark.parametrize("form", ["keys", "paper"])
def test_every_split_of_the_global_batch_saves_the_same_model(world, tmp_path, form):
    reference = one_process(world, tmp_path / "one", form)
    thresholds = [k for k in reference if k.endswith("mosa_threshold")]
    assert thresholds
    still = one_process(world, tmp_path / "still", form, momentum=0.0)  # thresholds as converted
    assert max((reference[k] - still[k]).abs().max().item() for k in thresholds) > 1e-2  # they move
    assert_same(reference, one_process(world, tmp_path / "accumulated", form, "training.micro_batch_size=2",
                                       "training.gradient_accumulation_steps=2"))
    assert_same(reference, two_processes(world, tmp_path / "ddp", form, "ddp"))
    assert_same(reference, two_processes(world, tmp_path / "fsdp", form, "fsdp"))


def test_activation_checkpointing_recomputes_with_the_threshold_the_forward_used(world, tmp_path):
    assert_same(one_process(world, tmp_path / "plain", "keys"),
                one_process(world, tmp_path / "checkpointed", "keys", "training.gradient_checkpointing=true"))
