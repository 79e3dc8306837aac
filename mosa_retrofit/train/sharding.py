"""FSDP2 sharding for training (``training.distributed: fsdp``), on CPU (gloo) and GPU (NCCL) alike.

``shard_(model)`` applies PyTorch's ``fully_shard`` to every decoder layer (the module holding an attention
layer) and then to the whole model, so each process keeps 1/N of every parameter, gradient and optimizer
state, and a layer's parameters are gathered only while it runs. accelerate's FSDP plugin does not engage on
CPU, so the project applies ``fully_shard`` itself: one code path for every device.

Checkpoints of a sharded model are ``torch.distributed.checkpoint`` folders (every process writes its shards;
``save_sharded`` / ``load_sharded``); ``full_state_dict`` gathers an ordinary state dict for ``final/``.
"""

from __future__ import annotations

import warnings

from pathlib import Path

import torch
from torch import Tensor, nn

from ..convert.families import attention_layers, family_of, mosa_layers
from ..convert.layer_state import layer_state


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that hold each attention layer (a transformer block), in order."""
    modules = dict(model.named_modules())
    names = [name for _, (name, _) in sorted(attention_layers(model, family_of(model)).items())]
    return [modules[name.rsplit(".", 1)[0]] for name in names]


def shard_(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place across the default process group: per decoder layer, then the rest (embeddings,
    final norm, output layer) as one group."""
    from torch.distributed.fsdp import fully_shard

    for layer in mosa_layers(model).values():
        layer_state(layer).sharded = True  # gathered weights live in reused buffers: no memo across calls
    for block in decoder_layers(model):
        fully_shard(block)
    fully_shard(model)
    return model


def is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def local_mask(param: Tensor, mask: Tensor) -> Tensor:
    """``mask`` (the parameter's full shape) laid out like ``param``: sharded as it is when it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(mask.to(param.device), param.device_mesh, param.placements)
    return mask


def clip_grad_norm_(params: list[Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over sharded (DTensor) and whole (e.g. LoRA adapters kept on every
    process, their gradients already averaged) parameters together; returns the total norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = [g.detach().float().pow(2).sum() for g in grads]  # (a DTensor's sum covers every shard)
    total = torch.stack([s.full_tensor() if is_dtensor(s) else s for s in squares]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return float(total)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on CPU (collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(folder: Path, model: nn.Module, optimizer=None) -> None:
    """Every process writes its shards of the model (and optimizer) into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer=None) -> None:
    """Read what ``save_sharded`` wrote into the model (and optimizer) as it is sharded now: by as many
    processes as wrote it, by another number (DCP reshards), or not at all (one process) (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process reading shards written by several: what it is meant to do
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


@torch.no_grad()
def idle_forwards(model: nn.Module, ids: Tensor, count: int) -> None:
    """Run ``count`` forwards whose results are dropped: under FSDP every process must run as many forwards as
    the others (each gathers parameters with them), also when its share of evaluation blocks is smaller."""
    for _ in range(count):
        model(input_ids=ids, use_cache=False)


def training_memory(model: nn.Module, processes: int, distributed: str, micro_batch: int, block: int,
                    teacher: bool = True) -> dict[str, float]:
    """GiB per process for adapting ``model`` (a converted model, may live on the meta device) with every weight
    trainable, fp32 weights and AdamW, bf16 autocast, gradient checkpointing, KD to an fp32 teacher:

      * weights 4 B, gradients 4 B, Adam moments 8 B per student parameter; 4 B per teacher parameter; FSDP
        divides all of them by the number of processes;
      * FSDP also holds the gathered parameters of the largest decoder layer, twice (the running one and the
        prefetched next), for student and teacher, and the gathered rest (embeddings, final norm, output layer);
      * logits: micro_batch x block x vocabulary in fp32, for the student (with its gradient) and the teacher;
      * checkpointed activations: one bf16 hidden state per layer and token, plus one layer recomputed in
        backward (about 34 hidden-size values per token in bf16, with the MLP's intermediate activations).
    """
    blocks = decoder_layers(model)
    numel = lambda ps: sum(int(p.numel()) for p in ps)
    total = numel(model.parameters())
    layer = max(numel(b.parameters()) for b in blocks)
    rest = total - numel(p for b in blocks for p in b.parameters())
    cfg = model.config.get_text_config()
    h, L, V = cfg.hidden_size, len(blocks), cfg.vocab_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    share = processes if distributed == "fsdp" else 1
    gib = 1024 ** 3
    out = {"student weights, gradients, Adam": 16 * total / share / gib,
           "teacher weights": (4 * total / share if teacher else 0) / gib}
    if distributed == "fsdp":
        out["gathered layers"] = (2 * 4 * layer * (2 if teacher else 1) + 4 * rest) / gib
    tokens = micro_batch * block
    out["logits"] = 4 * tokens * V * (3 if teacher else 2) / gib
    out["activations"] = 2 * tokens * (h * L + 34 * h + 3 * inter) / gib
    out["total"] = sum(out.values())
    return out
