"""Head groups: the registry that turns a layer plan into the groups its forward runs."""

import dataclasses

import torch
from test_surgery import ids_and_mask
from tiny_models import plain_config, tiny_model

from mosa_retrofit import convert_
from mosa_retrofit.convert.attention import mosa_layers
from mosa_retrofit.convert.heads import HEAD_GROUPS, DenseHeads, register_heads


def test_every_config_kind_has_a_group():
    from mosa_retrofit.convert.config import KEPT_HEADS, SPARSE_HEADS

    assert set(KEPT_HEADS) | set(SPARSE_HEADS) <= set(HEAD_GROUPS)
    model = convert_(tiny_model("llama"), plain_config(dense_heads=1, kept_heads="local", sparse_heads="pruned"))
    kept, sparse = mosa_layers(model)[0].mosa_groups
    assert (kept.kind, kept.role, kept.heads) == ("local", "kept", (0,))
    assert (sparse.kind, sparse.role, sparse.heads) == ("pruned", "sparse", (1, 2, 3))


def test_a_new_kind_is_a_registration_not_a_branch():
    """A group registered under a new name runs in place of the kept heads as soon as a plan names it."""
    calls = []

    @register_heads("probe")
    class ProbeHeads(DenseHeads):
        def forward(self, layer, call, out):
            calls.append(self.heads)
            return super().forward(layer, call, out)

    try:
        model = convert_(tiny_model("llama"), plain_config(dense_heads=2))
        ids, _ = ids_and_mask()
        with torch.no_grad():
            ref = model(ids).logits
            for m in mosa_layers(model).values():
                m.mosa_plan = dataclasses.replace(m.mosa_plan, kept_heads="probe")
            out = model(ids).logits
        assert calls == [(0, 1), (0, 1)] and torch.equal(out, ref)  # both layers, the same result
    finally:
        HEAD_GROUPS.pop("probe")
