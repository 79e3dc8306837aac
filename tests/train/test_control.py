"""The control run (the original model trained by the converted run's recipe) and the sparse recipe's costs."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from tiny_models import fake_retrieval
from train_fixtures import make_world, records, run, world  # noqa: F401  (world: the module fixture)

from mosa_retrofit import convert_
from mosa_retrofit.convert.costs import cost_ratios
from mosa_retrofit.train import stages
from mosa_retrofit.train.recipe import Recipe
from mosa_retrofit.train.trainer import summary_table

ROOT = Path(__file__).resolve().parents[2]


def spy_adaptation_batches(monkeypatch) -> tuple[dict[str, list], dict]:
    """Every adaptation batch the loss sees, recorded under ``current["run"]`` ("converted" or "control")."""
    seen: dict[str, list] = {"converted": [], "control": []}
    current = {}
    plain_loss = stages.AdaptationStage.loss

    def spy(self, net, ids, answers=None):
        seen[current["run"]].append(ids.clone())
        return plain_loss(self, net, ids, answers)

    monkeypatch.setattr(stages.AdaptationStage, "loss", spy)
    return seen, current


def test_control_trains_the_original_on_the_same_blocks_in_the_same_steps(world, tmp_path, monkeypatch):
    seen, current = spy_adaptation_batches(monkeypatch)
    current["run"] = "converted"
    converted = run(world, tmp_path / "run")
    current["run"] = "control"
    control = run(world, tmp_path / "run-control", control=True)

    assert len(seen["converted"]) == len(seen["control"]) == 6  # adaptation steps, after the warm-up's 4
    assert all(torch.equal(a, b) for a, b in zip(seen["converted"], seen["control"]))
    train_c = [r for r in records(tmp_path / "run-control") if r["stage"] == "adaptation"]
    train_s = [r for r in records(tmp_path / "run") if r["stage"] == "adaptation"]
    assert [r["global_step"] for r in train_c] == [r["global_step"] for r in train_s] == list(range(5, 11))
    assert [r["lr"] for r in train_c] == [r["lr"] for r in train_s]
    assert not [r for r in records(tmp_path / "run-control") if r["stage"] == "router_warmup"]  # nothing to train
    assert control["tokens"] == converted["tokens"] == converted["trained_tokens"]  # both read the same blocks
    assert control["trained_tokens"] == converted["tokens"] * 6 // 10  # the control trains on the adaptation's 6
    assert "(" + f"{converted['tokens'] * 4 // 10:,} more read and passed over)" in summary_table(control)

    # what trained is the original itself: its first LM loss is the original model's own loss on that batch
    original = tf.AutoModelForCausalLM.from_pretrained(world[0])
    with torch.no_grad():
        logits = original(input_ids=seen["control"][0]).logits[:, :-1]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seen["control"][0][:, 1:].reshape(-1))
    assert abs(train_c[0]["lm"] - lm.item()) < 1e-4
    final = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "run-control" / "final")
    assert getattr(final.config, "mosa", None) is None  # saved unconverted
    changed = [n for n, p in final.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert changed  # and trained ("trainable: all" in the fixture's adaptation)

    names = [e["name"] for e in control["evals"]]
    assert names == ["original model", "after router_warmup", "after adaptation"]
    assert control["evals"][1]["ppl"] == pytest.approx(control["evals"][0]["ppl"], rel=1e-6)  # nothing trained
    table = (tmp_path / "run-control" / "summary.md").read_text()
    assert "converted, after adaptation" in table  # the converted run's final row beside the control's
    assert "control: original, after adaptation" in summary_table(converted, control)


def test_control_of_a_routers_only_stage_passes_its_blocks_over(world, tmp_path):
    out = tmp_path / "c"
    summary = run(world, out, ["stages=[{name: w, kind: router_warmup, steps: 3, lr: 0.02}]"], control=True)
    assert summary["tokens"] == 3 * 4 * 32 and not records(out)
    assert summary["evals"][-1]["ppl"] == pytest.approx(summary["evals"][0]["ppl"], rel=1e-6)


def test_control_passes_over_layer_distillation_whatever_it_trains(world, tmp_path):
    """Layer distillation needs converted layers: the control reads its blocks without a step, then adapts."""
    out = tmp_path / "c"
    summary = run(world, out, ["stages=[{name: d, kind: layer_distill, steps: 2, trainable: mosa}, "
                               "{name: a, kind: adaptation, steps: 2, trainable: all}]"], control=True)
    assert [r["global_step"] for r in records(out)] == [3, 4] and {r["stage"] for r in records(out)} == {"a"}
    assert summary["tokens"] == 4 * 4 * 32


def _smollm2_shaped() -> tf.PreTrainedModel:
    """SmolLM2-135M's attention shape (30 layers, 9 query heads on 3 KV heads of 64, width 576), tiny elsewhere:
    attention costs depend on nothing else."""
    cfg = tf.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         num_hidden_layers=30, intermediate_size=32, vocab_size=64, max_position_embeddings=8192)
    return tf.AutoModelForCausalLM.from_config(cfg)


def test_the_sparse_recipe_converts_to_the_point_it_states():
    path = ROOT / "recipes" / "smollm2-sparse.yaml"
    recipe = Recipe.from_yaml(path)
    text = path.read_text()
    flops, kv = (float(v) for v in re.search(r"([0-9.]+)x the attention FLOPs and ([0-9.]+)x the KV bytes", text).groups())
    assert kv <= 0.15 and flops <= 0.35  # the recipe's promise
    model = _smollm2_shaped()
    config = copy.copy(recipe.conversion.mosa)
    # which groups stay dense (retrieval scores) and how routers start change no cost: plain stand-ins here
    import dataclasses

    config = dataclasses.replace(config, router_init="random")
    convert_(model, config, retrieval=fake_retrieval(model), progress=False)
    cost = cost_ratios(model, 8192)
    assert round(cost.flops, 3) == flops and round(cost.kv_bytes, 3) == kv
    # and independently of the cost tables: KV rows at 8,192 tokens counted from the plan
    from mosa_retrofit.convert.attention import mosa_layers

    m = recipe.conversion.mosa
    routed = m.sink_tokens + m.local_window + 8192 // m.sparsity
    rows = 0
    for layer in mosa_layers(model).values():
        plan = layer.mosa_plan
        dense_kv = len(plan.dense) // 3
        rows += dense_kv * 8192 + (3 - dense_kv) * routed
    assert abs(rows / (30 * 3 * 8192) - cost.kv_bytes) < 0.002


def test_needles_reach_the_loss_and_the_control_reads_the_same_ones(tmp_path, monkeypatch):
    """data.needles: every training block the loss sees holds the key and its question, the control's too."""
    (tmp_path / "world").mkdir()
    world = make_world(tmp_path / "world", positions=256)  # (a needle and its question: ~100 tiny-BPE tokens)
    seen, current = spy_adaptation_batches(monkeypatch)
    over = ["data.block_size=256", "data.needles=1", "data.validation_tokens=null", "training.micro_batch_size=2",
            "stages=[{name: a, kind: adaptation, steps: 2, trainable: all}]", "evaluation.before_conversion=false"]
    for name, control in (("converted", False), ("control", True)):
        current["run"] = name
        run(world, tmp_path / name, over, control=control)
    tok = tf.AutoTokenizer.from_pretrained(world[0])
    assert len(seen["converted"]) == 2 and all(torch.equal(a, b) for a, b in zip(seen["converted"], seen["control"]))
    rows = torch.cat(seen["converted"])
    assert rows.shape == (4, 256)
    for row in rows:
        text = tok.decode(row.tolist(), clean_up_tokenization_spaces=False)
        # the key once in the text, asked and answered at the end (this BPE has no "Q", "?" or ":" to show)
        assert text.count(" The access code for the ") == 1 and text.count("access code for the") == 3
        assert text.endswith(" is .") and "what is the access code for the" in text[-100:]
