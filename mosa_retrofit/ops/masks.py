"""Padding from whatever attention mask transformers passes."""

from __future__ import annotations

import torch
from torch import Tensor


def key_padding(mask, q_len: int) -> Tensor | None:
    """(B, T) bool, False for padded tokens, from whatever mask the model passes to attention; None if none.

    A token is real iff it may attend to itself (the diagonal of the 4D mask), which holds for causal and
    sliding-window masks alike; bool masks mean "may attend", float masks are additive (0 = attend).
    """
    if not isinstance(mask, Tensor):
        return None  # None, or a flex BlockMask: no padding information we can use
    if mask.dim() == 2:
        valid = mask[:, -q_len:].bool()
    else:
        off = mask.shape[-1] - q_len
        i = torch.arange(q_len, device=mask.device)
        diag = mask[:, 0, i, i + off]  # (B, T)
        valid = diag if diag.dtype == torch.bool else diag == 0
    return None if bool(valid.all()) else valid
