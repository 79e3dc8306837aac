"""Import weights saved by the official MoSA code (github.com/piotrpiekos/MoSA).

Official keys (E MoSA heads, n other heads, d = h_prim):
    PureMoSA:  r.0.weight (E, h)   QKV.W (E, h, 3d)   O.W (E, d, h)
    MoSA:      mosa_heads.<the above>   other_heads.W_QKV.weight (3·d·n, h)   other_heads.W_O.weight (h, d·n)
               and, for local hybrids, other_heads.local_attention.rel_pos.inv_freq (d/2)

Our parameters use the same tensor layouts, so the import is a checked renaming.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .modules import MoSA, PureMoSA

_PURE = {"r.0.weight": "router", "QKV.W": "w_qkv", "O.W": "w_o"}
_OTHER = {
    "W_QKV.weight": "qkv.weight",
    "W_O.weight": "out.weight",
    "local_attention.rel_pos.inv_freq": "local_attention.rel_pos.inv_freq",
}


def _key_map(module: nn.Module) -> dict[str, str]:
    if isinstance(module, PureMoSA):
        return dict(_PURE)
    if isinstance(module, MoSA):
        keys = {}
        if module.mosa_heads is not None:
            keys.update({f"mosa_heads.{k}": f"mosa_heads.{v}" for k, v in _PURE.items()})
        if module.other_heads is not None:
            ours = module.other_heads.state_dict()
            keys.update({f"other_heads.{k}": f"other_heads.{v}" for k, v in _OTHER.items() if v in ours})
        return keys
    raise TypeError(f"module must be a mosa_retrofit.PureMoSA or mosa_retrofit.MoSA, got {type(module).__name__}")


def load_reference_state_dict(module: PureMoSA | MoSA, state_dict: Mapping[str, Tensor]) -> PureMoSA | MoSA:
    """Load an official-layout ``state_dict`` into ``module`` (in place) and return it.

    Every expected key must be present with the expected shape, and no other key may be present;
    otherwise a ``ValueError`` names the offending keys and nothing is loaded.
    """
    mapping = _key_map(module)
    ours = module.state_dict()
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match this {type(module).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected} (expected exactly {sorted(mapping)})"
        )
    for ref_key, our_key in mapping.items():
        if tuple(state_dict[ref_key].shape) != tuple(ours[our_key].shape):
            raise ValueError(
                f"state_dict[{ref_key!r}] has shape {tuple(state_dict[ref_key].shape)}, "
                f"this module expects {tuple(ours[our_key].shape)}"
            )
    with torch.no_grad():
        for ref_key, our_key in mapping.items():
            ours[our_key].copy_(state_dict[ref_key])
    return module
