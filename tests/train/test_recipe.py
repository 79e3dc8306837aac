"""Recipes: YAML <-> dataclasses, overrides, and rejection of bad recipes with the key's dotted path."""

from pathlib import Path

import pytest
import yaml

from mosa_retrofit.convert.config import MoSAConfig
from mosa_retrofit.train.recipe import Recipe, StageSpec

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
BASE = {"output_dir": "out/x", "stages": [{"name": "warm", "kind": "router_warmup", "steps": 3},
                                          {"name": "adapt", "kind": "adaptation", "steps": 5, "kd_weight": 0.5}]}


def test_every_shipped_recipe_loads_validates_and_round_trips(tmp_path):
    assert len(RECIPES) >= 3, "ship quickstart, full-scale and LoRA recipes"
    names = {p.name for p in RECIPES}
    assert "smollm2-quickstart.yaml" in names
    assert any(Recipe.from_yaml(p).stages and any(s.lora for s in Recipe.from_yaml(p).stages) for p in RECIPES)
    for path in RECIPES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "train recipes/" + path.name in first, f"{path.name} must open with its command"
        recipe = Recipe.from_yaml(path)
        assert recipe.stages, path.name
        out = tmp_path / path.name
        recipe.to_yaml(out)
        assert Recipe.from_yaml(out) == recipe
        assert yaml.safe_load(path.read_text()).keys() <= set(recipe.to_dict())


def test_nested_types_are_built():
    r = Recipe.from_dict({**BASE, "conversion": {"mosa": {"sparsity": 4, "dense_heads": 2}},
                          "optimizer": {"lr": "1e-3"}})  # YAML 1.1 reads 1e-3 as a string
    assert isinstance(r.conversion.mosa, MoSAConfig) and r.conversion.mosa.sparsity == 4
    assert isinstance(r.stages[1], StageSpec) and r.stages[1].kd_weight == 0.5
    assert r.optimizer.lr == 1e-3
    assert Recipe.from_dict({**BASE, "conversion": None}).conversion is None


def test_overrides_by_dotted_path_stage_name_and_index():
    r = Recipe.from_dict(BASE, ["stages.adapt.steps=11", "stages.0.lr=0.02", "conversion.mosa.sparsity=16",
                                "training.micro_batch_size=2", "stages.adapt.lora={r: 4}", "stages.adapt.kd_weight=0"])
    assert r.stages[1].steps == 11 and r.stages[0].lr == 0.02 and r.conversion.mosa.sparsity == 16
    assert r.training.micro_batch_size == 2 and r.stages[1].lora.r == 4


@pytest.mark.parametrize("data, overrides, words", [
    ({**BASE, "optimiser": {}}, [], ["recipe.optimiser", "valid keys"]),
    ({**BASE, "training": {"micro_batch": 2}}, [], ["recipe.training.micro_batch"]),
    (BASE, ["stages.adapt.stepz=3"], ["recipe.stages[1].stepz"]),
    (BASE, ["stages.adapt.steps=0"], ["recipe.stages[1].steps", "integer >= 1", "0"]),
    (BASE, ["stages.warm.kind=warmup"], ["recipe.stages[0].kind", "router_warmup", "'warmup'"]),
    (BASE, ["stages.warm.trainable=all"], ["recipe.stages[0].trainable", "router_warmup"]),
    (BASE, ["stages.adapt.trainable=mlp"], ["recipe.stages[1].trainable", "'mlp'"]),
    (BASE, ["stages.adapt.lr=-1"], ["recipe.stages[1].lr", "> 0"]),
    (BASE, ["stages.adapt.trainable=all", "stages.adapt.lora={r: 4}"], ["trainable", "lora"]),
    (BASE, ["stages.nope.steps=1"], ["no stage 'nope'", "warm", "adapt"]),
    (BASE, ["conversion.mosa.sparsity=0.5"], ["recipe.conversion.mosa", "sparsity", ">= 1"]),
    (BASE, ["conversion.mosa.colour=red"], ["recipe.conversion.mosa", "colour"]),
    (BASE, ["training.mixed_precision=fp8"], ["recipe.training.mixed_precision", "bf16"]),
    (BASE, ["data.block_size=many"], ["recipe.data.block_size", "integer"]),
    (BASE, ["training"], ["section.key=value"]),
    ({**BASE, "stages": [BASE["stages"][0], BASE["stages"][0]]}, [], ["uniquely", "warm"]),
    ({"stages": []}, [], ["recipe.output_dir is required"]),
    (BASE, ["evaluation.long_contexts=[4096, 10]"], ["long_contexts", "[4096, 10]", ">= 64"]),
    (BASE, ["evaluation.passkey_lengths=2048"], ["passkey_lengths", "list"]),
    (BASE, ["evaluation.passkey_variants=[single, many]"], ["passkey_variants", "'many'", "multi"]),
    (BASE, ["evaluation.passkey_trials=0"], ["passkey_trials", "0"]),
    (BASE, ["control=3"], ["recipe.control", "true or false"]),
    (BASE, ["conversion.mosa.sparse_heads=streaming"], ["router_warmup", "'streaming'", "mosa_keys"]),
    (BASE, ["control=true", "conversion=null"], ["control", "already converted"]),
])
def test_bad_recipes_are_rejected_naming_the_key(data, overrides, words):
    with pytest.raises(ValueError) as e:
        Recipe.from_dict(data, overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        Recipe.from_yaml(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        Recipe.from_yaml(bad)


def test_long_recipe_conversion_is_the_default_and_converts_alike_from_json(tmp_path):
    """recipes/smollm2-long.yaml (the long-context goal): its conversion.mosa block is the default conversion
    written out, and the same block as JSON given to `convert --config` builds the same config."""
    import json

    from mosa_retrofit.cli.convert import build_config
    from mosa_retrofit.cli.main import build_parser

    path = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-long.yaml"
    recipe = Recipe.from_yaml(path)
    assert recipe.conversion.mosa == MoSAConfig()
    block = tmp_path / "conversion.json"
    block.write_text(json.dumps(yaml.safe_load(path.read_text())["conversion"]["mosa"]))
    args = build_parser().parse_args(["convert", "smollm2-135m", str(tmp_path / "out"), "--config", str(block)])
    assert build_config(args) == recipe.conversion.mosa
