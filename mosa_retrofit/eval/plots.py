"""Pictures: which tokens each MoSA head of a layer selects on a sample text."""

from __future__ import annotations

import torch
from torch import nn

from ..atomic import savefig_atomic
from ..convert.families import mosa_layers
from ..convert.hub import load_tokenizer
from ..ops.routing import select_tokens
from ..text.assets import wikipedia_articles


def plot_selection(model: nn.Module, tokenizer_source: str, path: str, layer: int | None = None,
                   text: str | None = None, max_tokens: int = 64) -> int:
    """Draw a (MoSA units × tokens) grid of the selection of ``layer`` on ``text``; returns the layer drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = {i: m for i, m in mosa_layers(model).items() if hasattr(m, "mosa_router")}
    if not layers:
        raise ValueError("the model has no MoSA layers to plot; convert it first")
    layer = min(layers) if layer is None else layer
    if layer not in layers:
        raise ValueError(f"--layer {layer} is not a MoSA layer; MoSA layers: {sorted(layers)}")
    if text is None:
        try:
            text = wikipedia_articles()[-1]
        except FileNotFoundError:
            text = "The capital of France is Paris. It lies on the Seine, and its museums draw millions each year."
    tok = load_tokenizer(tokenizer_source)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
    attn = layers[layer]
    seen = {}

    def grab(module, args, kwargs) -> None:
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    x = seen["x"]  # (1, T, D)
    plan = attn.mosa_plan
    logits = (attn.mosa_router.detach() @ x[0].t()).unsqueeze(1)  # (E, 1, T)
    idx, _ = select_tokens(logits, plan.config.sparsity, plan.config.include_first)
    E, T = logits.shape[0], logits.shape[-1]
    grid = torch.zeros(E, T)
    grid.scatter_(1, idx[:, 0], 1.0)
    labels = [tok.decode([i]).replace("\n", "\\n") for i in ids[0].tolist()]
    fig, ax = plt.subplots(figsize=(max(8, T * 0.22), 1.2 + 0.45 * E))
    ax.imshow(grid.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1.2)
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    unit = "KV group" if plan.heads_per_unit > 1 else "MoSA head"
    ax.set_yticks(range(E), [f"{unit} {e}" for e in range(E)], fontsize=8)
    ax.set_title(f"Layer {layer}: tokens each {unit} selects (k = {idx.shape[-1]} of {T}, sparsity {plan.config.sparsity:g}, "
                 f"dense heads {list(plan.dense)})", fontsize=9)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=120)
    plt.close(fig)
    return layer


def plot_losses(metrics_jsonl, path) -> None:
    """Training loss per stage and validation LM loss (from metrics.jsonl) against the optimizer step.

    Adaptation stages are drawn with their LM part (comparable with validation); warm-up with its KL.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(metrics_jsonl) if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    stages = list(dict.fromkeys(r["stage"] for r in train))
    for stage in stages:
        pts = [(r["global_step"], r.get("lm", r["loss"])) for r in train if r["stage"] == stage]
        kind = "LM loss" if "lm" in train[[r["stage"] for r in train].index(stage)] else "warm-up KL"
        ax.plot(*zip(*pts), label=f"train {kind}: {stage}", linewidth=1.2)
    val = [r for r in records if r["split"] == "validation" and r["stage"] != "original model"]
    if val:
        ax.plot([r["global_step"] for r in val], [r["loss"] for r in val], "o--", color="black",
                label="validation LM loss", markersize=4)
    original = [r for r in records if r["split"] == "validation" and r["stage"] == "original model"]
    if original:
        ax.axhline(original[0]["loss"], color="green", linestyle=":", label="validation LM loss, original model")
    for stage in stages[1:]:
        first = min(r["global_step"] for r in train if r["stage"] == stage)
        ax.axvline(first - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("mosa-retrofit train")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=120)
    plt.close(fig)


def plot_long_context(grids: dict[str, dict], curves: dict[str, dict], path) -> None:
    """Passkey heat maps (length x depth, one per model) above perplexity against context (one line each)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(grids)
    fig = plt.figure(figsize=(max(3.2 * n, 9), 7.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 1.25))
    axes = top.subplots(1, n, squeeze=False)[0]
    for ax, (name, grid) in zip(axes, grids.items()):
        lengths = sorted({L for L, _ in grid})
        depths = sorted({d for _, d in grid})
        values = [[grid[(L, d)] for L in lengths] for d in depths]
        im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth of the key")
        ax.set_title(textwrap.fill(name, 32), fontsize=8)
    top.colorbar(im, ax=list(axes), label="passkey accuracy", shrink=0.8)
    ax = bottom.subplots()
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens of context before the scored tokens")
    ax.set_ylabel("perplexity of the same final tokens (log)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("perplexity against context", fontsize=9)
    savefig_atomic(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
