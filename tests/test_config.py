"""MoSAConfig: defaults, per-layer resolution, JSON round trip, validation messages."""

import pytest

from mosa_retrofit import MoSAConfig


def test_minimal_config_and_json_round_trip(tmp_path):
    cfg = MoSAConfig(sparsity=8, dense_heads=3)
    assert cfg.sparsity == 8 and cfg.dense_heads == 3 and cfg.version == 1
    full = MoSAConfig(sparsity=16, dense_heads=0.25, dense_heads_pattern={"0-2": 9, "re:1[0-9]": 0},
                      dense_head_ids={"5": [0, 3]}, layers=[0, 1, 5, 12], kept_heads="local", local_window=64,
                      router_granularity="kv_group", router_init="calibrated", head_choice="scored")
    path = tmp_path / "c.json"
    full.to_json(str(path))
    assert MoSAConfig.from_json(str(path)) == full
    assert MoSAConfig.from_json(full.to_json()) == full


def test_per_layer_resolution():
    cfg = MoSAConfig(dense_heads=0.25, dense_heads_pattern={"0-2": 9, "re:1[0-9]": 0}, dense_head_ids={"5": [0, 3]},
                     layers="re:[0-9]|1[0-5]")
    assert [cfg.dense_count(i, 9) for i in (0, 2, 3, 5, 12, 25)] == [9, 9, 2, 2, 0, 2]
    assert cfg.converts_layer(15) and not cfg.converts_layer(16)


@pytest.mark.parametrize("kwargs, name", [
    (dict(sparsity=0.5), "sparsity"), (dict(dense_heads=-1), "dense_heads"), (dict(dense_heads=2.5), "dense_heads"),
    (dict(router_score="softmax"), "router_score"), (dict(router_init="zeros"), "router_init"),
    (dict(router_granularity="layer"), "router_granularity"), (dict(kept_heads="none"), "kept_heads"),
    (dict(head_choice="random"), "head_choice"), (dict(layers="some"), "layers"), (dict(layers=[-1]), "layers"),
    (dict(local_window=0), "local_window"), (dict(dense_heads_pattern={"x": 1}), "dense_heads_pattern"),
    (dict(dense_head_ids={"0": [-1]}), "dense_head_ids"), (dict(version=99), "version"),
    (dict(include_first="yes"), "include_first"),
])
def test_bad_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"MoSAConfig.{name}"):
        MoSAConfig(**kwargs)


def test_unknown_keys_rejected():
    with pytest.raises(ValueError, match=r"unknown MoSAConfig keys \['spars'\]"):
        MoSAConfig.from_dict({"spars": 8})


def test_frozen():
    with pytest.raises(Exception):
        MoSAConfig().sparsity = 2
