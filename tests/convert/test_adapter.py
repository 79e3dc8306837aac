"""Adapter-only saves (adapter.py): only the MoSA tensors and the base's fingerprint; load reads and checks the
base; a tampered, missing or changed base is refused."""

import hashlib
import json

import pytest
import torch
from tiny_models import plain_config, tiny_model
from transformers import AutoModelForCausalLM

import mosa_retrofit
from mosa_retrofit import convert_
from mosa_retrofit.convert.attention import mosa_layers


def base_folder(tmp_path, family="llama"):
    path = tmp_path / "base"
    tiny_model(family).save_pretrained(path)
    return path


def converted_from(path, **over):
    model = AutoModelForCausalLM.from_pretrained(path)
    convert_(model, plain_config(**{"sparsity": 4, "dense_heads": 1, "routing": "causal", **over}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mosa_router"):
                p.normal_()
    return model


def digest(model) -> str:
    """The fingerprint written out independently: BLAKE2b-128 over name|dtype|shape| and bytes, sorted names."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if name.rsplit(".", 1)[-1].startswith("mosa_"):
            continue
        h.update(f"{name}|{str(t.dtype)[6:]}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "gemma3_text"])
def test_adapter_save_load_equals_the_full_save(tmp_path, family):
    base = base_folder(tmp_path, family)
    original = AutoModelForCausalLM.from_pretrained(base)
    model = converted_from(base)
    recorded = model.config.mosa_base
    assert recorded["name_or_path"] == str(base.resolve()) and recorded["dtype"] == "float32"
    assert recorded["fingerprint"] == digest(original) == digest(model)  # conversion leaves base tensors alone
    mosa_retrofit.save(model, tmp_path / "full")
    mosa_retrofit.save(model, tmp_path / "adapter", adapter_only=True)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full = mosa_retrofit.load(str(tmp_path / "full"))(ids).logits
        adapter = mosa_retrofit.load(str(tmp_path / "adapter"))
        torch.testing.assert_close(adapter(ids).logits, full, atol=0, rtol=0)
        torch.testing.assert_close(full, model(ids).logits, atol=0, rtol=0)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True)
        torch.testing.assert_close(stock(ids).logits, full, atol=0, rtol=0)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {"config.json", "mosa_adapter.safetensors", "modeling_mosa.py", "README.md"}
    size = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert size < sum(p.stat().st_size for p in (tmp_path / "full").iterdir()) / 3
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "mosa_adapter.safetensors"))
    assert saved and all(k.rsplit(".", 1)[-1] in ("mosa_router", "mosa_threshold", "mosa_fill") for k in saved)
    assert mosa_layers(adapter) and "adapter" in (tmp_path / "adapter" / "README.md").read_text()


def test_a_different_base_is_refused_naming_both(tmp_path):
    base = base_folder(tmp_path)
    model = converted_from(base)
    mosa_retrofit.save(model, tmp_path / "adapter", adapter_only=True)
    other = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    other.save_pretrained(base)  # the base folder now holds other weights
    with pytest.raises(ValueError, match=rf"different base: {base.resolve()} now has weights with fingerprint "
                                         rf"{digest(other)}, the adapter was made for {digest(model)}"):
        mosa_retrofit.load(str(tmp_path / "adapter"))


def test_a_missing_base_is_named(tmp_path):
    import shutil

    base = base_folder(tmp_path)
    mosa_retrofit.save(converted_from(base), tmp_path / "adapter", adapter_only=True)
    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match=rf"its base model {base.resolve()} is not found"):
        mosa_retrofit.load(str(tmp_path / "adapter"))


def test_changed_base_weights_save_in_full_never_as_an_adapter(tmp_path):
    model = converted_from(base_folder(tmp_path))
    with torch.no_grad():  # what trainable: mosa does to the MoSA heads' slices of q_proj
        model.model.layers[1].self_attn.q_proj.weight[-1] += 0.01
    with pytest.raises(ValueError, match="base weights differ.*save it in full"):
        mosa_retrofit.save(model, tmp_path / "adapter", adapter_only=True)
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.glob(".adapter*"))
    mosa_retrofit.save(model, tmp_path / "full")  # the full save keeps the change
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(mosa_retrofit.load(str(tmp_path / "full"))(ids).logits, model(ids).logits,
                                   atol=0, rtol=0)
    model = converted_from(tmp_path / "base")
    with pytest.raises(ValueError, match="weights are bfloat16, its base was fingerprinted in float32"):
        mosa_retrofit.save(model.to(torch.bfloat16), tmp_path / "adapter", adapter_only=True)


def test_adapter_dtype_casts_after_the_check(tmp_path):
    base = base_folder(tmp_path)
    mosa_retrofit.save(converted_from(base), tmp_path / "adapter", adapter_only=True)
    m = mosa_retrofit.load(str(tmp_path / "adapter"), dtype=torch.bfloat16)
    assert mosa_layers(m) and all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_save_never_replaces_what_is_not_a_converted_folder(tmp_path):
    model = converted_from(base_folder(tmp_path))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        mosa_retrofit.save(model, mine)
    with pytest.raises(FileExistsError, match="not a converted model's folder.*left alone"):
        mosa_retrofit.save(model, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    mosa_retrofit.save(model, tmp_path / "out")
    mosa_retrofit.save(model, tmp_path / "out", adapter_only=True, overwrite=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mosa_adapter"]["tensors"] > 0
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_folder_that_appears_at_the_target_while_saving_is_left_alone(tmp_path, monkeypatch):
    """The target is absent when save starts; the user creates it (with a file) before the rename: their folder
    is kept, the model is kept under a named path, and save says both."""
    model = converted_from(base_folder(tmp_path))
    target = tmp_path / "out"
    write = model.save_pretrained

    def save_and_race(folder, *a, **kw):  # the other process, between save's check and its rename
        write(folder, *a, **kw)
        target.mkdir()
        (target / "mine.txt").write_text("mine")

    monkeypatch.setattr(model, "save_pretrained", save_and_race)
    with pytest.raises(FileExistsError, match=r"appeared while this ran and is left alone; the converted model is "
                                              r"in .*out\.unsaved-\d+"):
        mosa_retrofit.save(model, target)
    assert (target / "mine.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    kept = next(tmp_path.glob("out.unsaved-*"))
    assert mosa_layers(mosa_retrofit.load(str(kept))) and not list(tmp_path.glob(".out*"))
