"""``mosa-retrofit generate`` and ``mosa-retrofit bench generate`` on a tiny causal-routing model."""

import json
import re

import pytest
import torch
from mosa_retrofit.cli.main import main
from tiny_models import plain_config
from train_fixtures import make_world
from transformers import AutoModelForCausalLM, AutoTokenizer

from mosa_retrofit import convert_


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base, _ = make_world(root)
    tok = AutoTokenizer.from_pretrained(base)
    out = {}
    for routing in ("causal", "expert_choice"):
        model = AutoModelForCausalLM.from_pretrained(base)
        calib = torch.randint(1, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
        convert_(model, plain_config(sparsity=4, dense_heads=1, routing=routing, base_model_name_or_path=str(base)),
                 calibration=calib)
        model.save_pretrained(root / routing)
        tok.save_pretrained(root / routing)
        out[routing] = root / routing
    model = AutoModelForCausalLM.from_pretrained(base)  # a kind that decodes whatever the routing field says
    convert_(model, plain_config(sparse_heads="streaming", local_window=4, dense_heads=1, routing="expert_choice",
                                 base_model_name_or_path=str(base)))
    model.save_pretrained(root / "streaming")
    tok.save_pretrained(root / "streaming")
    out["streaming"] = root / "streaming"
    out["base"] = base
    return out


def test_generate_streams_and_reports_kv_bytes(models, capsys):
    assert main(["generate", str(models["causal"]), "the cat sees", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    m = re.search(r"KV cache after (\d+) tokens: ([\d,.]+) KiB .* caches ([\d,.]+) KiB: ([\d.]+)x", text)
    assert m, text
    n, used, original, ratio = int(m.group(1)), *(float(g.replace(",", "")) for g in m.groups()[1:])
    # original: 2 layers x (K and V) x 2 KV heads x n tokens x 16 dims x 4 bytes
    assert abs(original * 1024 - 2 * 2 * 2 * n * 16 * 4) < 1
    assert abs(ratio - used / original) < 0.05 / original + 1e-3  # KiB printed to 0.1
    assert "the cat sees" in text


def test_generate_refuses_expert_choice_with_cache(models, capsys):
    assert main(["generate", str(models["expert_choice"]), "the cat", "--max-new-tokens", "3"]) == 2
    assert "routing='causal'" in capsys.readouterr().err
    assert main(["generate", str(models["expert_choice"]), "the cat", "--max-new-tokens", "3", "--no-cache"]) == 0


def test_bench_generate_prints_ratios(models, capsys, tmp_path):
    out = tmp_path / "gen.md"
    assert main(["bench", "generate", str(models["causal"]), "--contexts", "32,64", "--decode-context", "48",
                 "--decode-tokens", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == [32, 48, 64]
    for r in rows:
        kv = float(r.split("|")[4])
        assert 0 < kv < 1
    assert float(rows[1].split("|")[7]) > 0 and out.read_text().count("|") > 20
    assert main(["bench", "generate", str(models["expert_choice"])]) == 2


def test_train_with_prompt_adapts_then_samples(tmp_path, capsys):
    """The newcomer's main job in miniature: convert, calibrate, adapt, evaluate, then generate a sample."""
    import yaml
    from train_fixtures import recipe_dict

    model_dir, data = make_world(tmp_path)
    d = recipe_dict(model_dir, data, tmp_path / "run")
    d["conversion"] = {"mosa": {"sparsity": 4, "dense_heads": 1, "head_choice": "scored", "router_init": "calibrated",
                                "routing": "causal"}, "calibration_sequences": 4, "calibration_length": 32}
    d["stages"] = [{"name": "adaptation", "kind": "adaptation", "steps": 2, "trainable": "attention", "kd_weight": 1.0}]
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump(d))
    assert main(["train", str(recipe), "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "| after adaptation |" in text and "| original model |" in text
    assert re.search(r"attention FLOPs / KV bytes / KV entries vs the original: [\d.]+x / [\d.]+x / [\d.]+x at T = 2048", text)
    assert "causal routing, greedy" in text and "KV cache after" in text
    assert main(["train", str(recipe), "--check", "--max-new-tokens", "9"]) == 0  # --check only validates the recipe
    with pytest.raises(SystemExit) as e:  # a bad flag is refused where it is parsed, --check or not
        main(["train", str(recipe), "--check", "--max-new-tokens", "0"])
    assert e.value.code == 2 and "argument --max-new-tokens: expected an integer >= 1" in capsys.readouterr().err


def test_what_decodes_is_decided_by_the_head_kinds_not_the_routing_field(models, capsys):
    """Streaming heads have no router: stored with routing='expert_choice' they still decode with the cache, and
    the cached text equals the uncached one; bench generate takes them too."""
    assert main(["generate", str(models["streaming"]), "the cat sees", "--max-new-tokens", "5"]) == 0
    cached = capsys.readouterr().out
    assert main(["generate", str(models["streaming"]), "the cat sees", "--max-new-tokens", "5", "--no-cache"]) == 0
    uncached = capsys.readouterr().out
    assert cached.split("\n\nKV cache")[0] == uncached.split("\n\n")[0]
    assert "KV cache after" in cached
    assert main(["bench", "generate", str(models["streaming"]), "--contexts", "32", "--decode-context", "32",
                 "--decode-tokens", "2"]) == 0


def test_beam_search_kv_bytes_count_every_beam_on_both_sides(models, capsys):
    """With 3 beams the cache holds 3 rows and so would the original's: the ratio is the 1-beam ratio (it read
    3x before); a prompt inside the window says why the cache saves nothing yet."""
    ratios = {}
    for beams in (1, 3):
        assert main(["generate", str(models["streaming"]), "the cat sees", "--max-new-tokens", "4", "--num-beams",
                     str(beams)]) == 0
        text = capsys.readouterr().out
        ratios[beams] = float(re.search(r"KiB: ([\d.]+)x", text).group(1))
    assert abs(ratios[3] - ratios[1]) < 1e-3
    assert main(["generate", str(models["streaming"]), "the", "--max-new-tokens", "1"]) == 0
    assert "lie within the 4-token window" in capsys.readouterr().out


def test_generate_refuses_to_run_past_the_positions(models, capsys):
    """The prompt's tokens + --max-new-tokens are checked against the model's positions before generating
    (a learned-position model would index past its table, a rotary one decode where it never trained)."""
    positions = json.loads((models["causal"] / "config.json").read_text())["max_position_embeddings"]
    assert main(["generate", str(models["causal"]), "the cat sees", "--max-new-tokens", str(positions)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and "--max-new-tokens" in err[0] and f"{positions:,} positions" in err[0], err
