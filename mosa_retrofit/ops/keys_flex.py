"""Key-selection attention through FlexAttention (``torch.nn.attention.flex_attention``, compiled), CPU and CUDA.

Keys are laid out as [the unit's far keys, padded to a block | the sequence], so the far keys of a unit are a few
dense blocks at the front instead of scattered columns; the ``BlockMask`` is built from block indices (no dense
mask is ever evaluated): per query block, the far blocks whose first key some query of the block can see, the
band's blocks, and among those the blocks every query sees whole (no mask_mod call there). K/V stay one head per
unit (``enable_gqa``).

The compiled kernel is built once per process; where it cannot compile (no compiler, an unsupported device) the
call warns once and returns None, and the dispatcher falls back.

Shape legend as in keys.py; Mp far slots padded to BK, NQ / NK query / key blocks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import FarKeys
from .masks import key_visible

BQ = BK = 128  # FlexAttention's block sizes
_COMPILED: dict[str, object] = {}
_FAILED: set[str] = set()


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention as _fa  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled(device_type: str):
    """flex_attention compiled for a device type: static shapes on CPU (its C++ lowering failed on symbolic
    lengths here: one compilation per shape), torch's automatic dynamic shapes elsewhere (a second length
    recompiles once with symbolic sizes)."""
    if device_type not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED[device_type] = torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)
    return _COMPILED[device_type]


def flex_key_selection(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, far: FarKeys | None,
                       key_valid: Tensor | None, reach: int | None) -> Tensor | None:
    """See keys.key_selection_attention. (B, T, H, d), or None where FlexAttention cannot run here."""
    dev = q.device.type
    if dev in _FAILED or not flex_available():
        return None
    try:
        kk, vv, block_mask = flex_inputs(q, k, v, window, far, key_valid, reach)
        out = _compiled(dev)(q, kk, vv, block_mask=block_mask, scale=scale, enable_gqa=True)  # (B, H, T, d)
    except Exception as e:  # compilation or lowering failed: warn once, let the dispatcher fall back
        _FAILED.add(dev)
        warnings.warn(f"attn_backend 'flex' could not run on {dev} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "falling back to the 'flash' / 'math' key-selection kernels", stacklevel=3)
        return None
    return out.transpose(1, 2)


def _far_first(k: Tensor, v: Tensor, far: FarKeys | None):
    """Keys and values (B, E, Mp + T, d) with the far keys first, padded to whole key blocks (Mp of them), and
    the far keys' positions (B, E, Mp); a padded or invalid far key sits at a position no query reaches."""
    M = far.k.shape[2] if far is not None else 0
    Mp = -(-M // BK) * BK
    if not M:
        return k, v, None, 0
    pad = Mp - M
    kk = torch.cat((F.pad(far.k, (0, 0, 0, pad)), k), dim=2)
    vv = torch.cat((F.pad(far.v, (0, 0, 0, pad)), v), dim=2)
    big = torch.iinfo(torch.long).max // 4
    fpos = F.pad(far.pos, (0, pad), value=big)
    fval = far.valid if far.valid is not None else torch.ones_like(far.pos, dtype=torch.bool)
    fval = F.pad(fval, (0, pad), value=False)
    return kk, vv, torch.where(fval, fpos, big), Mp


def flex_inputs(q: Tensor, k: Tensor, v: Tensor, window: int, far: FarKeys | None, key_valid: Tensor | None,
                reach: int | None):
    """(keys (B, E, Mp + T, d), values, BlockMask) of the [far | sequence] layout."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, T, d = q.shape
    E = k.shape[1]
    G = H // E
    dev = q.device
    kk, vv, fpos, Mp = _far_first(k, v, far)
    kvalid, w = key_valid, window

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - Mp  # position of a band key
        band = (j >= 0) & key_visible(q_idx - j, w)
        if kvalid is not None:
            band = band & (kvalid[b, j.clamp(0, T - 1)] | (j == q_idx))
        if fpos is None:
            return band
        dist = q_idx - fpos[b, h // G, kv_idx.clamp(0, Mp - 1)]  # a far key's distance
        return band | ((kv_idx < Mp) & (dist >= w) & key_visible(dist, w, True, reach))

    NQ, NK = -(-T // BQ), -(-(Mp + T) // BK)
    qs = torch.arange(NQ, device=dev) * BQ  # first query of each block
    qe = (qs + BQ).clamp(max=T) - 1  # last query
    kb = torch.arange(NK, device=dev)
    ks, ke = kb * BK - Mp, kb * BK - Mp + BK - 1  # positions of a key block's first and last key
    # band: key blocks overlapping [qs - w + 1, qe]; whole if every query of the block sees every key of it
    band_any = (kb[None] * BK >= Mp) & (ke[None] >= (qs[:, None] - w + 1)) & (ks[None] <= qe[:, None])  # (NQ, NK)
    band_full = band_any & (ks[None] >= qe[:, None] - w + 1) & (ke[None] <= qs[:, None]) & (ke[None] < T)
    if kvalid is not None:  # padding: no block is whole, every one consults its mask
        band_full = torch.zeros_like(band_full)
    partial = band_any & ~band_full  # (NQ, NK)
    partial = partial[None, None].expand(B, E, NQ, NK)
    if Mp:
        first = fpos.view(B, E, -1, BK).amin(-1)  # (B, E, NF) each far block's nearest-to-start key
        far_any = first[:, :, None, :] <= (qe - w)[None, None, :, None]  # (B, E, NQ, NF)
        if reach is not None:
            last = fpos.clamp(max=T).view(B, E, -1, BK).amax(-1)
            far_any = far_any & (last[:, :, None, :] > (qs - reach)[None, None, :, None])
        partial = torch.cat((far_any, partial[..., Mp // BK:]), dim=-1)
    full = band_full[None, None].expand(B, E, NQ, NK)

    def indices(m: Tensor) -> tuple[Tensor, Tensor]:
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # marked blocks first
        rep = lambda t: t.repeat_interleave(G, dim=1).contiguous()
        return rep(num), rep(idx)

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(BQ, BK),
                                          mask_mod=mask_mod, seq_lengths=(T, Mp + T))
    return kk, vv, block_mask
