"""The words a ``MoSAConfig`` takes for its head kinds and router scores, published without importing a kernel.

Every head kind is one registered class (convert/heads): ``REGISTRY`` is that registry (heads/base.py's
``HEAD_GROUPS`` is this very dict), so a kind registered anywhere is at once a word the config accepts, with what
its class declares. The built-in kinds' declarations are also written here (``BUILT_IN``), so that a config is
checked before any kernel is imported; registering a built-in class checks that it declares what is written here.
This module imports nothing from the package: the config, which every layer reads, stays a leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

ROUTER_SCORES = ("sigmoid", "straight_through")  # how a selected row is scaled by its router score (ops/routing.py)


@dataclass(frozen=True)
class Declared:
    """What a head kind declares (its class attributes, heads/base.py ``HeadGroup``)."""
    keeps: bool = False  # may be MoSAConfig.kept_heads
    replaces: bool = False  # may be MoSAConfig.sparse_heads
    routed: bool = False  # owns routers (mosa_router; mosa_threshold under causal routing)
    fills: bool = False  # owns a fill (mosa_fill, with fill='mean') where it writes no output
    windowed: bool = False  # attends a recent window of config.local_window tokens
    softcap: bool = True  # runs layers with attention-logit soft-capping (Gemma2)
    far_router: bool = False  # calibrated routers fit the attention a token gets from beyond the window
    column: str = "dense"  # its column in the cost tables: dense | local | mosa | pruned

    @classmethod
    def of(cls, kind_class: type) -> Declared:
        """The declarations of a registered class."""
        return cls(**{f.name: getattr(kind_class, f.name) for f in fields(cls)})


BUILT_IN = {
    "dense": Declared(keeps=True),
    "local": Declared(keeps=True, replaces=True, windowed=True, softcap=False, column="local"),
    "mosa": Declared(replaces=True, routed=True, fills=True, column="mosa"),
    "pruned": Declared(replaces=True, fills=True, column="pruned"),
    "streaming": Declared(replaces=True, windowed=True, softcap=False, column="local"),
    "mosa_keys": Declared(replaces=True, routed=True, windowed=True, softcap=False, far_router=True, column="mosa"),
}

REGISTRY: dict[str, type] = {}  # kind -> its class (filled by heads.register_heads)


def declared(kind: str) -> Declared:
    """What ``kind`` declares: its registered class's attributes, else the built-in declaration."""
    return Declared.of(REGISTRY[kind]) if kind in REGISTRY else BUILT_IN[kind]


def kinds(**wanted) -> tuple[str, ...]:
    """The kinds (built-in, then registered) whose declarations match, e.g. ``kinds(keeps=True)``."""
    return tuple(k for k in dict.fromkeys([*BUILT_IN, *REGISTRY])
                 if all(getattr(declared(k), a) == v for a, v in wanted.items()))
