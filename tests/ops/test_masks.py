"""ops/masks.py: the window rule and padding read from any mask transformers passes, against plain definitions."""

import torch

from mosa_retrofit.ops.masks import key_padding, key_visible


def test_key_visible_is_the_window_rule():
    dist = torch.arange(-3, 12)
    kept = dist % 3 == 0
    for window in (1, 4):
        for reach in (None, 9):
            got = key_visible(dist, window, kept, reach)
            for i, dd in enumerate(dist.tolist()):
                far_ok = bool(kept[i]) and dd >= window and (reach is None or dd < reach)
                assert bool(got[i]) == ((0 <= dd < window) or far_ok), (window, reach, dd)
        assert key_visible(dist, window).tolist() == [0 <= dd < window for dd in dist.tolist()]
    assert key_visible(dist, None).tolist() == [dd >= 0 for dd in dist.tolist()]


def test_key_padding_from_2d_bool_and_additive_masks():
    B, T = 2, 5
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :2] = 0
    want = attn.bool()
    assert torch.equal(key_padding(attn, T), want)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bool4d = (causal[None, None] & want[:, None, None, :]).clone()
    bool4d[1, 0, 0, 0] = True  # transformers keeps fully masked rows attendable; the diagonal decides
    bool4d[1, 0, 1, 1] = False
    assert key_padding(bool4d, T)[1].tolist() == [True, False, True, True, True]
    additive = torch.zeros(B, 1, T, T).masked_fill(~(causal[None, None] & want[:, None, None, :]), float("-inf"))
    assert torch.equal(key_padding(additive, T), want)
    assert key_padding(torch.ones(B, T), T) is None and key_padding(None, T) is None
    # queries after a cached prefix: the last T columns' diagonal
    prefix = torch.zeros(B, 1, 2, 7)
    prefix[0, 0, 1, 6] = float("-inf")
    assert key_padding(prefix, 2).tolist() == [[True, False], [True, True]]
