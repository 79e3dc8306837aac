"""ops/window.py: the cached band of kept 'local' heads against a per-query loop."""

import math

import pytest
import torch

from mosa_retrofit.ops.window import banded_attention


def loop_reference(q, k, v, window, scale, key_valid, groups):
    """Query t (at position S - T + t) attends keys s with t' - window < s <= t', skipping padded new keys
    (never itself), one query and one head at a time."""
    B, n, T, d = q.shape
    S = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(n):
            for t in range(T):
                pos = S - T + t
                keys = [s for s in range(max(0, pos - window + 1), pos + 1)
                        if s == pos or s < S - T or key_valid is None or key_valid[b, s - (S - T)]]
                kk, vv = k[b, h // groups, keys], v[b, h // groups, keys]
                w = (q[b, h, t] @ kk.T * scale).softmax(-1)
                out[b, h, t] = w @ vv
    return out


@pytest.mark.parametrize("T, S, window, groups", [(5, 5, 3, 1), (1, 9, 4, 2), (3, 10, 6, 2), (4, 4, 10, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_band_after_a_cached_prefix_matches_a_loop(T, S, window, groups, padded):
    g = torch.Generator().manual_seed(T * 100 + S)
    B, n, d = 2, 4, 8
    q = torch.randn(B, n, T, d, generator=g)
    k, v = torch.randn(B, n // groups, S, d, generator=g), torch.randn(B, n // groups, S, d, generator=g)
    key_valid = None
    if padded:
        key_valid = torch.ones(B, T, dtype=torch.bool)
        key_valid[1, 0] = False
    scale = 1 / math.sqrt(d)
    got = banded_attention(q, k, v, window, scale, key_valid=key_valid, groups=groups)
    torch.testing.assert_close(got, loop_reference(q, k, v, window, scale, key_valid, groups), atol=1e-5, rtol=0)
