"""Head groups: the registry that turns a layer plan into the groups its forward runs, and what each kind
declares (read by MoSAConfig, convert_ and the costs)."""

import dataclasses

import pytest
import torch
from tiny_models import KEEP, ids_and_mask, masked_reference, plain_config, tiny_model

from mosa_retrofit import MoSAConfig, convert_
from mosa_retrofit.convert.attention import mosa_layers
from mosa_retrofit.convert.costs import GroupCost, attention_costs
from mosa_retrofit.convert.heads import (
    HEAD_GROUPS,
    DenseHeads,
    WindowedHeads,
    kinds,
    register_heads,
)


def test_the_config_takes_the_words_the_kinds_declare():
    assert set(kinds(keeps=True)) == {"dense", "local"}
    assert set(kinds(replaces=True)) == {"mosa", "mosa_keys", "local", "streaming", "pruned"}
    assert set(kinds(routed=True)) == {"mosa", "mosa_keys"} and set(kinds(fills=True)) == {"mosa", "pruned"}
    with pytest.raises(ValueError, match=r"sparse_heads must be one of \("):
        MoSAConfig(sparse_heads="dense")  # dense heads keep, they do not replace
    model = convert_(tiny_model("llama"), plain_config(dense_heads=1, kept_heads="local", sparse_heads="pruned"))
    kept, sparse = mosa_layers(model)[0].mosa_groups
    assert (kept.kind, kept.role, kept.heads) == ("local", "kept", (0,))
    assert (sparse.kind, sparse.role, sparse.heads) == ("pruned", "sparse", (1, 2, 3))


def test_the_published_declarations_are_the_classes_own():
    """kinds.py publishes what the built-in classes declare (the config reads it without importing them); a class
    registered under a built-in name that declares otherwise is refused, and the registry keeps the real one."""
    from mosa_retrofit.kinds import BUILT_IN, Declared

    assert {k: Declared.of(HEAD_GROUPS[k]) for k in BUILT_IN} == BUILT_IN
    real = HEAD_GROUPS["mosa"]
    with pytest.raises(TypeError, match="built-in kind 'mosa'"):
        @register_heads("mosa")
        class Impostor(DenseHeads):  # declares keeps=True, no router
            pass
    assert HEAD_GROUPS["mosa"] is real


def test_a_new_kept_kind_runs_as_soon_as_a_plan_names_it():
    calls = []

    @register_heads("probe")
    class ProbeHeads(DenseHeads):
        def forward(self, layer, call):
            calls.append(self.heads)
            return super().forward(layer, call)

    try:
        model = convert_(tiny_model("llama"), plain_config(dense_heads=2))
        ids, _ = ids_and_mask()
        with torch.no_grad():
            ref = model(ids).logits
            for m in mosa_layers(model).values():
                m.mosa_plan = dataclasses.replace(m.mosa_plan, config=dataclasses.replace(m.mosa_plan.config,
                                                                                          kept_heads="probe"))
            out = model(ids).logits
        assert calls == [(0, 1), (0, 1)] and torch.equal(out, ref)  # both layers, the same result
    finally:
        HEAD_GROUPS.pop("probe")


def test_a_new_sparse_kind_is_one_registered_class():
    """A kind written here (strided keys: every 4th token is kept beside the window and the sinks, no router)
    converts, runs and costs through the registry alone, and computes its reference (masked attention)."""

    @register_heads("strided")
    class StridedHeads(WindowedHeads):
        def selected(self, layer, x, valid, first):
            E, (B, T) = len(self.units), x.shape[:2]
            return (torch.arange(T, device=x.device) % 4 == 0).expand(E, B, T), None

        def cost(self, T, dims):
            return GroupCost(7, 7, 7)

    try:
        w, s, T = 3, 1, 20
        model = convert_(tiny_model("llama"), plain_config(dense_head_ids=KEEP, sparse_heads="strided", local_window=w,
                                                          sink_tokens=s))
        assert not any(hasattr(m, "mosa_router") for m in mosa_layers(model).values())  # it declares no router
        ids, _ = ids_and_mask(T=T)
        with torch.no_grad():
            out = model(ids).logits
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        causal = j <= i
        masks = {}
        for layer, m in mosa_layers(model).items():
            mask = causal.expand(ids.shape[0], 4, T, T).clone()
            for head in m.mosa_plan.mosa:
                mask[:, head] = causal & ((i - j < w) | (j < s) | (j % 4 == 0))
            masks[layer] = mask
        torch.testing.assert_close(out, masked_reference("llama", masks, ids), atol=1e-4, rtol=0)
        row = attention_costs(model, T)[0]
        assert row.local == 3 and row.flops == row.flops_original // 4 + 7  # the kept head's quarter + its cost
    finally:
        HEAD_GROUPS.pop("strided")


