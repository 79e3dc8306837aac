"""Save / load of converted models: round trip, dtype, convert-on-load, loud plain-transformers load."""

import json
import re

import pytest
import torch
from tiny_models import (
    FAMILIES,
    default_config,
    fake_retrieval,
    plain_config,
    tiny_config,
    tiny_model,
)

import mosa_retrofit
from mosa_retrofit import convert_
from mosa_retrofit.convert.config import CONFIG_VERSION
from mosa_retrofit.convert.surgery import mosa_layers


@pytest.mark.parametrize("family, cfg", [
    ("llama", plain_config(sparsity=4, dense_heads=2, router_granularity="kv_group", router_score="sigmoid")),
    ("gpt2", plain_config(sparsity=3, dense_head_ids={"0": [1, 3]}, kept_heads="local", local_window=4)),
    ("phi3", plain_config(sparsity=2, dense_heads=1, layers=[1])),
])
def test_round_trip_identical_logits(tmp_path, family, cfg):
    model = tiny_model(family)
    convert_(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mosa_router"):
                p.normal_()  # trained-looking routers must survive the round trip
    ids = torch.randint(0, 128, (2, 20))
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["mosa"]
    assert saved["sparsity"] == cfg.sparsity and "dense_head_ids" in saved
    loaded = mosa_retrofit.load(str(tmp_path))
    assert sorted(mosa_layers(loaded)) == sorted(mosa_layers(model))
    torch.testing.assert_close(loaded(ids).logits, ref, atol=0, rtol=0)
    bf16 = mosa_retrofit.load(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_import_patches_nothing_and_a_legacy_folder_loaded_dense_is_reported(tmp_path):
    """``import mosa_retrofit`` leaves transformers as it is. A folder of the first format (config.json of the base
    type with a 'mosa' block, no declaration: what mosa_retrofit 0.1 wrote) still loads with mosa_retrofit.load,
    and loaded as a plain model it is named by transformers' load report and by ``warn_if_dense_load``."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from mosa_retrofit.convert.hub import undeclared
    from mosa_retrofit.convert.serialization import warn_if_dense_load

    code = ("import transformers; before = transformers.PreTrainedModel.__dict__['from_pretrained']; "
            "import mosa_retrofit; assert transformers.PreTrainedModel.__dict__['from_pretrained'] is before")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    model = tiny_model("qwen2")
    convert_(model, plain_config(sparsity=4, dense_heads=1))
    model.save_pretrained(tmp_path)
    d = undeclared(json.loads((tmp_path / "config.json").read_text()))
    for key in ("auto_map", "mosa_base_model_type"):
        d.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "modeling_mosa.py").unlink()
    ids = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(mosa_retrofit.load(str(tmp_path))(ids).logits, model(ids).logits, atol=0, rtol=0)
    dense, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not mosa_layers(dense) and any(k.endswith("mosa_router") for k in info["unexpected_keys"])
    with pytest.warns(UserWarning, match="loaded as a plain dense model.*mosa_retrofit.load"):
        assert warn_if_dense_load(dense)
    assert not warn_if_dense_load(mosa_retrofit.load(str(tmp_path)))


def test_convert_on_load_and_errors(tmp_path):
    base = tiny_model("mistral")
    base.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 16))
    identity = plain_config(sparsity=1, dense_heads=1, include_first=False, router_score="straight_through")
    model = mosa_retrofit.load(str(tmp_path), config=identity)
    assert len(mosa_layers(model)) == 2 and model.config.mosa["base_model_name_or_path"] == str(tmp_path)
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not a converted MoSA checkpoint"):
        mosa_retrofit.load(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_identical_logits_with_untied_embeddings(tmp_path, family):
    """Every family, untied input/output embeddings and non-trivial weights everywhere (routers and fills
    included): the reloaded model is the saved one (GPT-NeoX renames lm_head <-> embed_out on save/load)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tiny_config(family, "eager" if family == "gemma2" else "sdpa")
    cfg.tie_word_embeddings = False
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    convert_(model, default_config(family, sparsity=2, dense_heads=1, local_window=4), calibration=calib,
             retrieval=fake_retrieval(model), progress=False)  # the default conversion
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    out_emb, in_emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert out_emb.data_ptr() != in_emb.data_ptr() and not torch.equal(out_emb, in_emb[: out_emb.shape[0]])
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = mosa_retrofit.load(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=0, rtol=0)
    assert loaded.config.mosa == model.config.mosa


def test_version_1_checkpoint_loads_with_its_saved_values(tmp_path):
    """A checkpoint written by config version 1, whose 'mosa' block leaves the then-defaults implicit, loads as
    it was converted (first heads, random routers, zero fill, expert choice, one router per head)."""
    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=2, dense_heads=1, router_score="straight_through"))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("head_choice", "router_init", "fill", "routing", "router_granularity"):
        del cfg["mosa"][key]
    cfg["mosa"]["version"] = 1
    path.write_text(json.dumps(cfg))
    loaded = mosa_retrofit.load(str(tmp_path))
    saved = loaded.config.mosa
    assert (saved["version"], saved["fill"], saved["routing"], saved["router_granularity"]) == (
        1, "zero", "expert_choice", "head")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=0, rtol=0)


def test_a_checkpoint_with_non_finite_routers_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=2, dense_heads=1))
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("mosa_router"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"non-finite MoSA weights.*{name}"):
        mosa_retrofit.load(str(tmp_path))


def test_converting_a_converted_checkpoint_is_refused(tmp_path, capsys):
    from mosa_retrofit.cli.main import main

    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=2, dense_heads=1))
    model.save_pretrained(tmp_path / "converted")
    assert main(["convert", str(tmp_path / "converted"), str(tmp_path / "again"), "--preset", "paper",
                 "--dense-heads", "1", "--no-check"]) == 2
    assert "already converted" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_a_damaged_or_edited_checkpoint_names_the_tensor_or_field(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")  # 4 heads of 16, 2 KV heads, hidden 64
    convert_(model, plain_config(sparsity=2, dense_head_ids={"0": [0], "1": [0]}))  # 3 MoSA heads per layer
    model.save_pretrained(tmp_path / "ok")

    def copy_with(name, tensors=None, mosa=None):
        import shutil

        shutil.copytree(tmp_path / "ok", tmp_path / name)
        if tensors is not None:
            saved = load_file(str(tmp_path / name / "model.safetensors"))
            tensors(saved)
            save_file(saved, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        if mosa is not None:
            cfg = json.loads((tmp_path / name / "config.json").read_text())
            cfg["mosa"] = mosa(cfg["mosa"])
            (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return str(tmp_path / name)

    key = "model.layers.1.self_attn.mosa_router"
    narrow = copy_with("narrow", tensors=lambda t: t.__setitem__(key, t[key][:, :-1].clone()))
    with pytest.raises(ValueError, match=rf"{key} has shape \(3, 63\) in the checkpoint, .* needs \(3, 64\)"):
        mosa_retrofit.load(narrow)
    # dense heads edited to a valid choice with another count: the routers no longer fit
    edited = copy_with("edited", mosa=lambda m: {**m, "dense_head_ids": {"0": [0], "1": [0, 1]}})
    with pytest.raises(ValueError, match=rf"{key} has shape \(3, 64\) .* needs \(2, 64\).*dense_head_ids"):
        mosa_retrofit.load(edited)
    for bad, needle in [(lambda m: "garbage", "a MoSAConfig must be a JSON object of fields, got str: 'garbage'"),
                        (lambda m: {**m, "version": "2"},
                         f"MoSAConfig.version must be an integer in 1..{CONFIG_VERSION}, got '2'"),
                        (lambda m: {**m, "dense_head_ids": {"0": [0, 9]}},
                         r"MoSAConfig.dense_head_ids\['0'\] = \[0, 9\]: need distinct heads in 0..3")]:
        with pytest.raises(ValueError, match=re.escape(needle) if "\\" not in needle else needle):
            mosa_retrofit.load(copy_with(f"bad{len(list(tmp_path.iterdir()))}", mosa=bad))


def test_a_checkpoint_missing_or_holding_extra_mosa_state_is_refused_not_filled_with_garbage(tmp_path):
    """Thresholds or routers absent from the safetensors, a 'mosa' block narrowed to fewer layers or switched to
    a kind without routers, an emptied or nulled block: each is one clear error naming what differs, never
    uninitialised thresholds, random routers or a silently dense model. allow_partial=True starts the missing
    tensors at defined values (the normal quantile of the sparsity, zero fill) and says so."""
    import logging
    import shutil
    from statistics import NormalDist

    from safetensors.torch import load_file, save_file

    from mosa_retrofit.convert.serialization import load_any

    model = tiny_model("llama")
    convert_(model, plain_config(sparsity=4, dense_heads=1, routing="causal"))
    model.save_pretrained(tmp_path / "ok")

    def copy_with(name, drop=None, mosa=...):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        if drop is not None:
            saved = load_file(str(tmp_path / name / "model.safetensors"))
            save_file({k: v for k, v in saved.items() if drop not in k}, str(tmp_path / name / "model.safetensors"),
                      metadata={"format": "pt"})
        if mosa is not ...:
            cfg = json.loads((tmp_path / name / "config.json").read_text())
            cfg["mosa"] = mosa(cfg["mosa"])
            (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return str(tmp_path / name)

    no_thresholds = copy_with("no-thresholds", drop="mosa_threshold")
    with pytest.raises(ValueError, match=r"lacks 2 MoSA tensor\(s\).*layers.0.self_attn.mosa_threshold.*allow_partial"):
        mosa_retrofit.load(no_thresholds)
    with pytest.raises(ValueError, match="mosa_router"):
        mosa_retrofit.load(copy_with("no-routers", drop="mosa_router"))
    with pytest.raises(ValueError, match=r"holds 2 MoSA tensor\(s\) its 'mosa' block does not use.*layers.1"):
        mosa_retrofit.load(copy_with("narrowed", mosa=lambda m: {**m, "layers": [0]}))
    with pytest.raises(ValueError, match="does not use"):
        mosa_retrofit.load(copy_with("pruned", mosa=lambda m: {**m, "sparse_heads": "pruned", "routing": "expert_choice"}))
    for name, block in [("emptied", lambda m: {}), ("nulled", lambda m: None)]:
        with pytest.raises(ValueError, match="would run every head dense"):
            load_any(copy_with(name, mosa=block))

    logger = logging.getLogger("mosa_retrofit")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        partial = mosa_retrofit.load(no_thresholds, allow_partial=True)
    finally:
        logger.removeHandler(handler)
    for name, t in partial.named_buffers():
        if name.endswith("mosa_threshold"):
            torch.testing.assert_close(t, torch.full_like(t, NormalDist().inv_cdf(1 - 1 / 4)))
    assert sum("mosa_threshold missing" in r.getMessage() for r in records) == 2
