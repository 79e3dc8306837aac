"""What travels to a converted attention layer from outside its own forward: ``layer.mosa_state``.

Training, sharding and threshold tracking hand a layer a few facts between calls. They live in one documented
object on the layer (created on first use, never saved, not a parameter) instead of private attributes that one
module sets and another reads:

* ``pool``: set by ``thresholds.RoutingStatePool`` for an optimizer step; the routed heads append their router
  logits to it and the pool moves every causal threshold once from the whole global batch (None: each training
  forward moves its threshold itself, heads/routed.py);
* ``threshold_next``: the causal thresholds a training forward computed, written when its backward reaches the
  layer (activation checkpointing recomputes that forward in between, with the threshold it ran with);
* ``sharded``: FSDP shards the layer (train/sharding.py): its gathered weights live in buffers FSDP reuses, so
  nothing gathered from them is memoised across calls (attention.py ``mosa_memo``);
* ``head_masks``: the MoSA heads' rows of q/k/v/o, found before sharding (``trainable: mosa``; sharded
  parameters cannot be probed, train/trainable.py ``head_masks``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class LayerState:
    pool: list[Tensor] | None = None  # router logits pooled this optimizer step, (n, E) each
    threshold_next: Tensor | None = None  # (E,) thresholds waiting for the backward
    sharded: bool = False
    head_masks: dict[str, Tensor] | None = None  # {parameter name: 0/1 mask}


def layer_state(layer: nn.Module) -> LayerState:
    """The layer's ``LayerState`` (made on first use; copies of the layer carry their own)."""
    state = layer.__dict__.get("mosa_state")
    if state is None:
        state = layer.__dict__["mosa_state"] = LayerState()
    return state
