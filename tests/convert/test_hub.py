"""A converted folder is a Hugging Face model: stock loaders give the MoSA model (trust_remote_code) or refuse it,
never a silent dense one; the folder's code, its card, push_to_hub (hub.py, card.py)."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES, plain_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline

import mosa_retrofit
from mosa_retrofit import convert_
from mosa_retrofit.convert.attention import mosa_layers


def converted(family: str, **over):
    model = tiny_model(family)
    convert_(model, plain_config(**{"sparsity": 4, "dense_heads": 1, **over}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mosa_router"):
                p.normal_()  # trained-looking routers
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_auto_class_with_trust_remote_code_is_mosa_retrofit_load(tmp_path, family):
    model = converted(family)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 20))
    ours = mosa_retrofit.load(str(tmp_path))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert sorted(mosa_layers(stock)) == sorted(mosa_layers(model))
    with torch.no_grad():
        want, got = ours(ids).logits, stock(ids).logits
        dense = tiny_model(family)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, model(ids).logits, atol=1e-6, rtol=0)
    assert (got - dense).abs().max() > 1e-2  # the routed heads change the logits: not the dense original
    bare = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert mosa_layers(bare)
    with torch.no_grad():
        torch.testing.assert_close(bare(ids).last_hidden_state, ours.base_model(ids).last_hidden_state,
                                   atol=1e-6, rtol=0)


def test_no_stock_entry_point_loads_a_converted_folder_dense(tmp_path):
    model = converted("llama")
    model.save_pretrained(tmp_path)
    declared = json.loads((tmp_path / "config.json").read_text())
    assert declared["model_type"] == "mosa_llama" and declared["mosa_base_model_type"] == "llama"
    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained, AutoModel.from_pretrained,
                 lambda p: pipeline("text-generation", model=str(p))):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load(tmp_path)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):  # a head the folder does not map
        AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True)


def test_dtype_and_device_map_pass_through_the_stock_path(tmp_path):
    converted("qwen2").save_pretrained(tmp_path)
    m = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16,
                                             device_map={"": "cpu"})
    assert mosa_layers(m) and all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_a_saved_folder_saves_again_declared_and_loads_the_same(tmp_path):
    converted("gpt_neox").save_pretrained(tmp_path / "a")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    stock.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "mosa_gpt_neox"
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(mosa_retrofit.load(str(tmp_path / "b"))(ids).logits, stock(ids).logits,
                                   atol=0, rtol=0)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_folder_code_without_mosa_retrofit_says_what_to_install(tmp_path):
    converted("llama").save_pretrained(tmp_path)
    code = ("import sys; sys.modules['mosa_retrofit'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)")
    r = _run(code)
    assert r.returncode != 0
    assert "ImportError: this model was converted to MoSA by mosa_retrofit, which is not installed" in r.stderr
    assert "pip install 'mosa_retrofit>=0.2.0'" in r.stderr


@pytest.mark.parametrize("edit, message", [
    (("CODE_VERSION = 1", "CODE_VERSION = 7"), r"reads up to version 1: pip install -U 'mosa_retrofit>=9.0.0'"),
    (("CODE_VERSION = 1", "CODE_VERSION = 0"), r"older than the installed mosa_retrofit .* save it again"),
])
def test_folder_code_and_installed_package_out_of_step_are_refused(tmp_path, edit, message):
    converted("llama").save_pretrained(tmp_path)
    code = (tmp_path / "modeling_mosa.py").read_text()
    assert edit[0] in code
    code = code.replace(edit[0], edit[1]).replace('WRITTEN_BY = "0.2.0"', 'WRITTEN_BY = "9.0.0"')
    (tmp_path / "modeling_mosa.py").write_text(code)
    with pytest.raises(ImportError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


def test_model_card_front_matter_and_facts(tmp_path):
    model = converted("llama", dense_heads=2)
    model.config.mosa_check = {"protocol": "a check", "original": 10.0, "converted": 10.5}
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front
    assert "- mosa" in front and "base_model:" not in front  # a model built in memory has no hub base
    assert "dense heads: 4 of 8 query heads (2 of 4 KV groups whole)" in card  # heads 0, 1 (group 0) per layer
    assert "original 10.00, converted 10.50 (1.050x the original)" in card
    # positions 128: no length in the cost table exceeds them; the one row there is the model's own
    assert "| 4,096 |" not in card
    assert "trust_remote_code=True" in card and "mosa_retrofit.load(" in card
    own = tmp_path / "mine"
    own.mkdir()
    (own / "README.md").write_text("my notes")
    model.save_pretrained(own)
    assert (own / "README.md").read_text() == "my notes"  # the user's card is kept


def test_card_of_the_embedded_default_names_its_hub_base_and_license():
    from mosa_retrofit.convert.card import card_text

    model = converted("llama")
    model.config.mosa_base = {"name_or_path": "smollm2-135m", "revision": None, "dtype": "float32",
                              "fingerprint": "x"}
    text = card_text(model)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text and "license: apache-2.0" in text
    model.config.max_position_embeddings = 8192
    row = [line for line in card_text(model).splitlines() if line.startswith("| 8,192 |")][0]
    r = cost_ratios_at(model, 8192)
    assert row == f"| 8,192 | {r[0]:.3f}x | {r[1]:.3f}x |"


def cost_ratios_at(model, T):
    """FLOP and KV-byte ratios from the per-layer head counts, written out here (dense heads: full causal
    attention; the routed heads of this plain config: k = T/4 tokens each, one K/V row per head per token)."""
    cfg = model.config
    D, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = D // H
    k = T // 4
    dense_f, mosa_f = 8 * D * d * T + 2 * d * T * T, 8 * D * d * k + 2 * d * k * k + 2 * D * T
    layers = cfg.num_hidden_layers
    flops = layers * (1 * dense_f + (H - 1) * mosa_f) / (layers * H * dense_f)
    # the dense head reads its KV head (T rows); each routed head caches k rows of K and V
    kv = layers * (1 * T + (H - 1) * k) / (layers * KV * T)
    return flops, kv


def test_push_to_hub_uploads_exactly_the_saved_folder(tmp_path, monkeypatch):
    import os

    import transformers.utils.hub as hub

    model = converted("llama")
    model.save_pretrained(tmp_path / "saved")
    uploaded = {}

    class Api:
        def create_repo(self, repo_id, **kw):
            return type("Repo", (), {"repo_id": "me/" + repo_id})()

    def upload(self, working_dir, repo_id, **kw):
        uploaded["repo"] = repo_id
        uploaded["files"] = {f: open(os.path.join(working_dir, f), "rb").read() for f in os.listdir(working_dir)}

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(type(model), "_upload_modified_files", upload)
    model.push_to_hub("tiny-mosa")
    saved = {f.name: f.read_bytes() for f in (tmp_path / "saved").iterdir()}
    assert uploaded["repo"] == "me/tiny-mosa" and uploaded["files"] == saved
    assert {"README.md", "modeling_mosa.py", "config.json", "model.safetensors"} <= set(saved)
