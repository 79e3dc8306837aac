"""What trains in a stage: full-weight parameter groups, per-head gradient masks, and LoRA through peft.

``trainable`` (StageSpec):
  * ``routers``: the ``mosa_router`` (and ``mosa_fill``) of every converted layer;
  * ``mosa``: routers + the MoSA heads' own weights. A converted layer shares its q/k/v/o tensors between
    dense and MoSA heads, so those tensors train under a gradient mask: a query row / output column trains
    iff its head is a MoSA head, a key/value row iff *every* query head reading it is a MoSA head, shared
    things (output bias, q/k norms) stay frozen. Masked tensors get no weight decay, so their frozen slices
    stay bit-exact (AdamW moves nothing whose gradient is always zero);
  * ``attention``: routers + every parameter of the converted attention layers;
  * ``all``: everything.
With ``lora``, peft adds adapters to ``target_modules`` and only they and the routers train.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..convert.families import attention_layers, head_to_kv, mosa_layers
from ..convert.layer_state import layer_state


def head_masks(module: nn.Module) -> dict[str, Tensor]:
    """``{parameter name: 0/1 mask}`` of the MoSA heads' slices of a converted attention module.

    Finds the slices generically: every parameter is temporarily filled with its own element indices
    (float64, offset per parameter), the family's ``head_weights`` views are read, and the indices found
    in the MoSA heads' views are marked. Works for split, fused and transposed layouts alike. A module about
    to be sharded keeps its masks (its ``layer_state(...).head_masks``): sharded parameters cannot be filled this way.
    """
    if layer_state(module).head_masks is not None:
        return layer_state(module).head_masks
    fam, plan = module.mosa_family, module.mosa_plan
    params = {n: p for n, p in module.named_parameters() if n not in ("mosa_router", "mosa_fill")}
    saved, offsets, total = {}, {}, 0
    with torch.no_grad():
        for n, p in params.items():
            saved[n] = p.data
            offsets[n] = total
            p.data = torch.arange(total, total + p.numel(), dtype=torch.float64, device=p.device).view(p.shape)
            total += p.numel()
        try:
            W = fam.head_weights(module)
            mosa = list(plan.mosa)
            kv_of = head_to_kv(W.num_heads, W.num_kv_heads)
            kv_all_mosa = [g for g in range(W.num_kv_heads)
                           if all(h in mosa for h in range(W.num_heads) if kv_of[h] == g)]
            picked = [W.wq[mosa], W.wo[:, mosa]]
            if W.bq is not None:
                picked.append(W.bq[mosa])
            for t in (W.wk, W.wv, W.bk, W.bv):
                if t is not None and kv_all_mosa:
                    picked.append(t[kv_all_mosa])
            flat = torch.cat([t.reshape(-1) for t in picked]).long()
        finally:
            for n, p in params.items():
                p.data = saved[n]
    masks = {}
    for n, p in params.items():
        local = flat[(flat >= offsets[n]) & (flat < offsets[n] + p.numel())] - offsets[n]
        if local.numel():
            mask = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            mask[local] = 1
            masks[n] = mask.view(p.shape)
    return masks


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters (``lora``: LoRASpec)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise ValueError(f"lora.target_modules {missing} match no module of {type(model).__name__}")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), bias="none")
    return get_peft_model(model, cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base weights and return the model without them (peft's
    ``merge_and_unload``; for base weights sharded by FSDP, the update ``B A · scale`` is laid out as the
    shards are and added in place)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = [m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")
               and isinstance(m.get_base_layer().weight, DTensor)]
    if not sharded:
        return model.merge_and_unload()
    with torch.no_grad():
        for m in sharded:
            w = m.get_base_layer().weight
            for adapter in m.active_adapters:
                delta = m.get_delta_weight(adapter).to(w.dtype)  # (out, in), as the base weight is laid out
                w.add_(distribute_tensor(delta.to(w.device), w.device_mesh, w.placements))
    return model.unload()


def select_trainable(model: nn.Module, trainable: str, lora: bool = False, hooks: bool = True
                     ) -> tuple[list[nn.Parameter], list]:
    """Set ``requires_grad`` for a stage; returns (plain parameters, [(parameter, mask)]) that train.

    Masks are applied by gradient hooks (removed by ``remove_hooks``); with ``hooks=False`` the caller applies
    them to the gradients (FSDP writes a sharded parameter's gradient without running its hooks).
    """
    layers = mosa_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    routers = [getattr(m, n) for m in layers.values() for n in ("mosa_router", "mosa_fill")
               if hasattr(m, n)]  # the new parameters (a local baseline has none)
    plain: list[nn.Parameter] = []
    masked: list[tuple[nn.Parameter, Tensor]] = []
    if lora:
        plain = [p for n, p in model.named_parameters() if "lora_" in n] + routers
    elif trainable == "all":
        plain = list(model.parameters())
    elif trainable == "attention":
        seen = set()
        for m in layers.values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    plain.append(p)
    else:
        plain = routers
        if trainable == "mosa":
            for m in layers.values():
                named = dict(m.named_parameters())
                for n, mask in head_masks(m).items():
                    if bool(mask.all()):
                        plain.append(named[n])
                    else:
                        masked.append((named[n], mask))
    for p in plain:
        p.requires_grad_(True)
    for p, mask in masked:
        p.requires_grad_(True)
        if hooks:
            p._mosa_mask_hook = p.register_hook(lambda g, mask=mask: g * mask)
    return plain, masked


def control_trainable(model: nn.Module, trainable: str, lora: bool = False) -> list[nn.Parameter]:
    """What trains in the *original* model (the control run) where a converted run trains ``trainable``: routers
    exist only in a converted model (nothing), the MoSA heads' slices become the whole attention, LoRA adapters
    stay LoRA adapters. Sets ``requires_grad`` and returns the parameters that train."""
    for p in model.parameters():
        p.requires_grad_(False)
    if lora:
        params = [p for n, p in model.named_parameters() if "lora_" in n]
    elif trainable == "all":
        params = list(model.parameters())
    elif trainable in ("mosa", "attention"):
        params = list({id(p): p for _, m in attention_layers(model).values() for p in m.parameters()}.values())
    else:
        params = []
    for p in params:
        p.requires_grad_(True)
    return params


def remove_hooks(masked: list) -> None:
    for p, _ in masked:
        hook = p.__dict__.pop("_mosa_mask_hook", None)
        if hook is not None:
            hook.remove()
