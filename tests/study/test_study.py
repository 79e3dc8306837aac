"""The retrofit study end to end on a tiny model: points, independent perplexity and costs, resume, report."""

import json
import math

import pytest
import torch
from train_fixtures import corpus_text, make_world

from mosa_retrofit.study import Point, StudySpec
from mosa_retrofit.study.measure import run_study


def tiny_spec(model_dir, data, ood, **over):
    kw = dict(model=str(model_dir), dense_heads=(1,), sparsity=(2,), data=str(data), ood_data=str(ood),
              validation_documents=10, ood_documents=10, eval_length=32, eval_tokens=64, ood_tokens=64,
              calibration_sequences=2, calibration_length=32, cost_lengths=(64, 256), time_length=32, time_repeats=1,
              adapt=("mosa:1:2:causal:calibrated:mean",), adapt_distill_steps=2, adapt_steps=1, adapt_lr=1e-3,
              adapt_batch=1)
    kw.update(over)
    return StudySpec(**kw)


def reference_ppl(model_dir, text, documents, tokens, block):
    """exp(mean next-token loss) over blocks of the last ``documents`` blank-line-separated documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = [d.strip() for d in text.split("\n\n") if d.strip()][-documents:]
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]][:tokens]
    blocks = torch.tensor(ids).view(-1, block)
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(loss.item())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    model_dir, data = make_world(root)
    ood = root / "ood.txt"
    ood.write_text(corpus_text(documents=30, seed=1))
    return root, model_dir, data, ood


def test_study_end_to_end_and_resume(world):
    root, model_dir, data, ood = world
    spec = tiny_spec(model_dir, data, ood)
    out = root / "out"
    said = []
    rows = run_study(spec, out, progress=False, command="mosa-retrofit study --test", say=said.append)
    keys = [r["key"] for r in rows]
    # original + 2 routings x 2 inits + local + pruned + the adapted point
    assert keys == ["original", "mosa:1:2:expert_choice:random:mean", "mosa:1:2:expert_choice:calibrated:mean",
                    "mosa:1:2:causal:random:mean", "mosa:1:2:causal:calibrated:mean", "local:1:2", "pruned:1:2:mean",
                    "mosa:1:2:causal:calibrated:mean@2+1"]
    by = {r["key"]: r for r in rows}

    # perplexity of the original against a plain reference on both texts
    assert by["original"]["ppl_val"] == pytest.approx(reference_ppl(model_dir, data.read_text(), 10, 64, 32), rel=1e-5)
    assert by["original"]["ppl_ood"] == pytest.approx(reference_ppl(model_dir, ood.read_text(), 10, 64, 32), rel=1e-5)

    # costs against hand formulas: 4 heads of d=16, D=64; 1 dense + 3 MoSA heads at k = T/2 (router 2·D·T)
    D, d, H = 64, 16, 4
    dense = lambda T: 8 * D * d * T + 2 * d * T * T
    for T in (64, 256):
        k = T // 2
        mosa = 8 * D * d * k + 2 * d * k * k + 2 * D * T
        assert by["mosa:1:2:causal:random:mean"][f"flops_{T}"] == pytest.approx((dense(T) + 3 * mosa) / (H * dense(T)))
        assert by["mosa:1:2:causal:random:mean"][f"kv_{T}"] == pytest.approx((T + 3 * k) / (H * T))
        assert by["pruned:1:2:mean"][f"flops_{T}"] == pytest.approx(1 / H)
    # the local baseline's window gives the MoSA head's query-key pairs at the evaluation length (T=32, k=16)
    pairs = lambda w: sum(min(t + 1, w) for t in range(32))
    best = min(range(1, 33), key=lambda w: (abs(pairs(w) - 16 * 17 // 2), w))
    assert by["local:1:2"]["window"] == best
    assert by["mosa:1:2:causal:calibrated:mean@2+1"]["adapt_tokens"] == (2 + 1) * 32
    assert all(r["time_ratio"] > 0 for r in rows)

    table = (out / "study.md").read_text()
    assert "mosa-retrofit study --test" in table and "Machine:" in table
    assert sum(line.startswith("| `") for line in table.splitlines()) == len(rows) + 0  # one row per point
    assert (out / "study.png").stat().st_size > 10_000

    # interrupted run: the last point lost and a half-written line; the rerun measures only that point
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][: len(lines[-2]) // 2] + "\n")
    said.clear()
    again = run_study(spec, out, progress=False, say=said.append)
    assert "6 already measured" in said[0] and [r["key"] for r in again] == keys
    assert len(said) == 3  # the header and the two re-measured points
    assert again[-1]["ppl_val"] == pytest.approx(by[keys[-1]]["ppl_val"], rel=1e-6)  # adaptation reused, not redone


@pytest.mark.parametrize("key, parsed", [
    ("mosa:3:8:causal:calibrated:mean", Point("mosa", 3, 8.0, "causal", "calibrated", "mean")),
    ("local:1:4", Point("local", 1, 4.0)),
    ("pruned:6:2.5:zero", Point("pruned", 6, 2.5, fill="zero")),
])
def test_point_keys_round_trip(key, parsed):
    assert Point.parse(key) == parsed and parsed.key == key


def test_every_method_keeps_the_same_heads_and_the_adapted_run_used_them(world):
    """At one dense count all methods keep the heads of highest mean-fill energy, computed here from the
    calibration statistics; the adapted point's saved model has the same split."""
    import mosa_retrofit
    from mosa_retrofit.convert.surgery import mosa_layers
    from mosa_retrofit.study.measure import open_workbench

    root, model_dir, data, ood = world
    bench = open_workbench(tiny_spec(model_dir, data, ood), progress=False)
    stats = bench.calibration_stats()
    want = {i: [int(s.head_scores("mean").argmax())] for i, s in stats.items()}
    for key in ("mosa:1:2:causal:random:zero", "local:1:2", "pruned:1:2:zero", "mosa:1:2:expert_choice:calibrated:mean"):
        layers = mosa_layers(bench.convert(Point.parse(key)))
        assert {i: list(m.mosa_plan.dense) for i, m in layers.items()} == want, key
    adapted = mosa_retrofit.load(str(root / "out" / "adapt" / "mosa_1_2_causal_calibrated_mean_2+1" / "final"))
    assert {i: list(m.mosa_plan.dense) for i, m in mosa_layers(adapted).items()} == want


@pytest.mark.parametrize("over, message", [
    (dict(routing=("topk",)), r"StudySpec.routing must be a subset"),
    (dict(adapt=("mosa:1:2:causal:calibrated",)), r"bad study point 'mosa:1:2:causal:calibrated'"),
    (dict(adapt_steps=0, adapt_distill_steps=0), r"adapt_steps must be > 0"),
    (dict(fill=("average",)), r"StudySpec.fill must be a subset"),
    (dict(sparsity=(0.5,)), r"StudySpec.sparsity must be numbers >= 1"),
    (dict(eval_tokens=16), r"eval_tokens must be >= eval_length"),
])
def test_bad_specs_name_the_field(world, over, message):
    root, model_dir, data, ood = world
    with pytest.raises(ValueError, match=message):
        tiny_spec(model_dir, data, ood, **over)


def test_cli_help_and_bad_list(capsys):
    from mosa_retrofit.cli.main import main

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "results.jsonl" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["study", "--dense-heads", "one,two"])
    assert "comma-separated list of int" in capsys.readouterr().err


def test_results_file_is_plain_json_lines(world):
    root, *_ = world
    rows = [json.loads(line) for line in (root / "out" / "results.jsonl").read_text().splitlines()]
    assert {"key", "ppl_val", "ppl_ood", "flops_256", "kv_256", "time_ratio"} <= set(rows[0])


def test_study_flags_are_generated_from_the_spec():
    from mosa_retrofit.cli.main import build_parser
    from mosa_retrofit.cli.study import spec_from_args

    args = build_parser().parse_args(["study", "--sparsity", "4,8", "--ood-data", "none", "--baselines", "",
                                      "--adapt", "mosa:3:4:causal:calibrated:mean", "local:1:2", "--adapt-steps", "5",
                                      "--goal-kv", "0.35"])
    assert spec_from_args(args) == StudySpec(sparsity=(4.0, 8.0), ood_data=None, baselines=(), adapt_steps=5,
                                             adapt=("mosa:3:4:causal:calibrated:mean", "local:1:2"), goal_kv=0.35)
    assert spec_from_args(build_parser().parse_args(["study"])) == StudySpec()
