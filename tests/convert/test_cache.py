"""convert/cache.py: the sparse KV state behind a stock cache layer, its bytes, what it refuses."""

import pytest
import torch
from tiny_models import (
    causal_model,
    decode_incrementally,
    ids,
    plain_config,
    tiny_model,
)

from mosa_retrofit import convert_
from mosa_retrofit.convert.cache import cache_bytes, layer_stores


def test_cache_bytes_and_unsupported_operations(tmp_path):
    model = causal_model("llama")
    x = ids(T=16)
    _, cache = decode_incrementally(model, x, prefill=8)
    dense, mosa, allocated = cache_bytes(cache)
    # 1 dense head per layer reads KV head 0 only: 2 layers x (K and V) x B=2 x 1 x 16 tokens x d=16 x 4 bytes
    assert dense == 2 * 2 * 2 * 1 * 16 * 16 * 4
    kept = sum(int(s.routed.count.sum()) for s in layer_stores(cache).values())
    assert mosa == kept * 2 * 16 * 4 and 0 < kept < 2 * 3 * 2 * 16
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="dynamic cache"):
        model.generate(ids(T=4), max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    expert = tiny_model("llama")
    convert_(expert, plain_config(sparsity=4, dense_heads=1))
    with pytest.raises(ValueError, match="routing='causal'"):
        expert.generate(ids(T=4), max_new_tokens=2, pad_token_id=0)


def test_the_sparse_state_is_a_project_store_behind_a_stock_cache_layer():
    """The stock cache layer of a converted layer is replaced by a subclass of the same class (no class swap of
    a live object) that counts every token; the sparse K/V lives in the LayerStore; beam reorders reach it."""
    from transformers.cache_utils import DynamicLayer

    from mosa_retrofit.convert.cache import LayerStore, RoutedStore

    model = causal_model("llama")
    x = ids(T=12)
    _, cache = decode_incrementally(model, x, prefill=8)
    stores = layer_stores(cache)
    assert sorted(stores) == [0, 1]
    for i, store in stores.items():
        layer = cache.layers[i]
        assert isinstance(layer, DynamicLayer) and type(layer) is not DynamicLayer and layer.mosa is store
        assert isinstance(store, LayerStore) and isinstance(store.routed, RoutedStore) and store.seen == 12
        assert layer.get_seq_length() == 12 and layer.keys.shape[-2] == 12  # the dense heads' stock storage
    before = {i: s.routed.k.clone() for i, s in stores.items()}
    counts = {i: s.routed.count.clone() for i, s in stores.items()}
    cache.reorder_cache(torch.tensor([1, 0]))  # swap the two rows, as beam search does
    for i, s in layer_stores(cache).items():
        assert torch.equal(s.routed.k, before[i].flip(1)) and torch.equal(s.routed.count, counts[i].flip(1))
