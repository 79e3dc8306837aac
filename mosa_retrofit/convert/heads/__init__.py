"""Head groups: what the heads of a converted attention layer run, one registered class per kind (base.py says
what a kind declares and answers). Importing the package registers the built-in kinds: ``dense`` and
``local`` (dense.py), ``mosa`` (the paper's heads, mosa.py), ``streaming`` and ``mosa_keys`` (windowed.py),
``pruned`` (pruned.py); routed kinds share ``routed.RoutedUnits``."""

from .base import (
           HEAD_GROUPS,
           Call,
           HeadGroup,
           head_groups,
           kinds,
           register_heads,
           split_units,
)
from .dense import DenseHeads, LocalHeads
from .mosa import MoSAHeads
from .pruned import PrunedHeads
from .windowed import MoSAKeysHeads, StreamingHeads, WindowedHeads

__all__ = ["HEAD_GROUPS", "Call", "DenseHeads", "HeadGroup", "LocalHeads", "MoSAHeads", "MoSAKeysHeads",
           "PrunedHeads", "StreamingHeads", "WindowedHeads", "head_groups", "kinds", "register_heads", "split_units"]
