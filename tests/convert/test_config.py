"""MoSAConfig: defaults, per-layer resolution, JSON round trip, validation messages."""

import pytest

from mosa_retrofit import MoSAConfig


def test_minimal_config_and_json_round_trip(tmp_path):
    cfg = MoSAConfig(sparsity=8, dense_heads=3)
    assert cfg.sparsity == 8 and cfg.dense_heads == 3 and cfg.version == 4
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
    (dict(version="1"), "version"), (dict(version=0), "version"),
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


def test_defaults_keep_long_context():
    cfg = MoSAConfig()
    assert (cfg.head_choice, cfg.dense_scope, cfg.dense_heads, cfg.sparse_heads) == (
        "retrieval", "model", 0.25, "mosa_keys")
    assert (cfg.local_window, cfg.sink_tokens, cfg.sparsity) == (256, 4, 64)
    assert (cfg.router_init, cfg.routing, cfg.router_granularity, cfg.router_score, cfg.include_first) == (
        "calibrated", "causal", "kv_group", "straight_through", True)
    assert cfg.needs_calibration and cfg.uses_calibration and cfg.routed and not cfg.fills


def test_version_3_dicts_convert_sliding_window_layers_as_they_did():
    old = MoSAConfig.from_dict({"version": 3, "sparsity": 64})
    assert (old.keep_sliding, MoSAConfig().keep_sliding) == (0, 1024)
    assert old.converts_layer(0, reach=512) and not MoSAConfig().converts_layer(0, reach=512)
    assert MoSAConfig().converts_layer(0, reach=4096) and MoSAConfig().converts_layer(0, reach=None)


def test_version_2_dicts_keep_the_values_they_meant():
    old = MoSAConfig.from_dict({"version": 2, "sparsity": 8, "dense_heads": 3})
    assert (old.head_choice, old.dense_scope, old.sparse_heads, old.fill, old.routing) == (
        "scored", "layer", "mosa", "mean", "causal")
    assert old.version == 2


def test_paper_preset_is_the_papers_conversion():
    # arXiv 2505.00315: 4 dense heads kept first, random sigmoid routers scaling the selected rows, expert-choice
    # top-k, nothing written at skipped tokens, one router per head, first token always included (IsoFLOP runs)
    paper = MoSAConfig.paper()
    expected = dict(dense_heads=4, head_choice="first", router_init="random", router_score="sigmoid", fill="zero",
                    routing="expert_choice", router_granularity="head", include_first=True, kept_heads="dense",
                    sparse_heads="mosa")
    assert {k: getattr(paper, k) for k in expected} == expected
    assert not paper.needs_calibration and not paper.uses_calibration
    identity = MoSAConfig.paper(sparsity=1, dense_heads=1, router_score="straight_through")
    assert (identity.sparsity, identity.dense_heads, identity.router_score, identity.fill) == (
        1, 1, "straight_through", "zero")


def test_version_1_dicts_keep_the_values_they_meant():
    # a version-1 dict lacking keys meant the version-1 defaults: the paper-like conversion of that release
    old = MoSAConfig.from_dict({"version": 1, "sparsity": 4, "dense_heads": 2})
    assert (old.head_choice, old.router_init, old.fill, old.routing, old.router_granularity, old.version) == (
        "first", "random", "zero", "expert_choice", "head", 1)
    assert MoSAConfig.from_dict(old.to_dict()) == old  # and it round-trips as version 1
    new = MoSAConfig.from_dict({"sparsity": 4, "dense_heads": 2})  # no version: the current defaults
    assert new == MoSAConfig(sparsity=4, dense_heads=2)
    with pytest.raises(ValueError, match="MoSAConfig.version"):
        MoSAConfig.from_dict({"version": "1"})
    with pytest.raises(ValueError, match="JSON object"):
        MoSAConfig.from_dict("garbage")
