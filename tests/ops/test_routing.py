"""ops/routing.py: causal selection against a plain loop."""

import torch

from mosa_retrofit.ops.routing import select_tokens_causal


def test_select_tokens_causal_against_a_loop():
    torch.manual_seed(0)
    E, B, T = 3, 2, 11
    logits, tau = torch.randn(E, B, T), torch.tensor([0.0, 0.5, -0.3])
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    for include_first in (False, True):
        idx, live = select_tokens_causal(logits, tau, include_first, valid)
        for e in range(E):
            for b in range(B):
                real = [t for t in range(T) if valid[b, t]]
                want = [t for t in real if logits[e, b, t] > tau[e] or (include_first and t == real[0])]
                got = idx[e, b][live[e, b]].tolist() if live is not None else idx[e, b].tolist()
                assert got == want
                if live is not None:
                    assert live[e, b].tolist() == [True] * len(want) + [False] * (idx.shape[-1] - len(want))
