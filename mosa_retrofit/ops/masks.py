"""Which keys a query sees: the window rule every windowed path calls (full forwards, their blocked kernels,
FlexAttention's mask, the cached step, the decode store), and padding from whatever mask transformers passes."""

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


def key_visible(dist: Tensor, window: int | None, kept: Tensor | bool = False, reach: int | None = None) -> Tensor:
    """Whether a query sees a key ``dist`` = (query position - key position) before it: in its window
    (0 <= dist < window; ``window`` None: every earlier key), or, for a ``kept`` key (a sink or a routed token),
    anywhere before the window (dist >= window), within the layer's own window ``reach`` if it has one."""
    if window is None:
        return dist >= 0
    near = (dist >= 0) & (dist < window)
    if kept is False:
        return near
    far = (dist >= window) & kept
    if reach is not None:
        far = far & (dist < reach)
    return near | far
