"""``mosa-retrofit train RECIPE [key=value ...]``: run a continued-pretraining recipe."""

from __future__ import annotations

import argparse

from .flags import COUNT


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="convert and adapt a model with a YAML recipe (router warm-up, adaptation)",
        description="Run RECIPE (a YAML file, see recipes/): load the original model, convert it, run the recipe's "
                    "stages with checkpoints, and save the adapted model to OUTPUT_DIR/final. Overrides use dotted "
                    "keys, e.g. stages.adaptation.steps=50 conversion.mosa.sparsity=4 training.micro_batch_size=2. "
                    "Several processes: torchrun --nproc_per_node N -m mosa_retrofit train RECIPE (CPU: gloo; GPUs: "
                    "NCCL), or accelerate launch --multi_gpu --num_processes N -m mosa_retrofit train RECIPE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE", help="a recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides with dotted keys")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in output_dir (exact: same data, optimizer, RNG)")
    p.add_argument("--check", action="store_true", help="only load and validate the recipe, print it and exit")
    p.add_argument("--control", action="store_true",
                   help="the honest control: train the original model (unconverted) by the same recipe, on the same "
                        "blocks in the same order, into OUTPUT_DIR-control; each run's summary then shows the other's "
                        "final row beside its own")
    p.add_argument("--prompt", help="afterwards, generate a continuation of PROMPT with the final model and report "
                                    "its attention FLOPs and KV cache against the original")
    p.add_argument("--max-new-tokens", type=COUNT, default=40, help="with --prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mosa_retrofit.train.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe, args.overrides)  # every value validated before any loading
    if args.control:
        import dataclasses

        from mosa_retrofit.train.recipe import CONTROL_SUFFIX

        recipe = dataclasses.replace(recipe, control=True, output_dir=recipe.output_dir + CONTROL_SUFFIX)
    if args.check:
        print(recipe.to_yaml(), end="")
        return 0
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from mosa_retrofit.train.trainer import train

    summary = train(recipe, resume=args.resume, progress=not args.quiet)
    if args.prompt is not None:
        _sample(summary["output_dir"], args.prompt, args.max_new_tokens)
    return 0


def _sample(output_dir: str, prompt: str, max_new_tokens: int) -> None:
    """Greedy continuation from OUTPUT_DIR/final (cached decode for causal routing) and its costs."""
    from pathlib import Path

    from mosa_retrofit.convert.attention import decode_refusal
    from mosa_retrofit.convert.costs import cost_ratios
    from mosa_retrofit.convert.serialization import load

    from . import generate

    final = str(Path(output_dir) / "final")
    model = load(final)
    routing = (getattr(model.config, "mosa", None) or {}).get("routing", "expert_choice")
    cached = decode_refusal(model) is None
    lines = [f"{'':>4}attention FLOPs / KV bytes / KV entries vs the original: "
             + ", ".join(f"{r.flops:.3f}x / {r.kv_bytes:.3f}x / {r.kv:.3f}x at T = {T}"
                         for T, r in ((T, cost_ratios(model, T)) for T in (2048, 8192)))]
    print("\n".join(lines) + f"\n\nsample from {final} ({routing} routing, greedy, "
          f"{'with' if cached else 'without'} a KV cache):")
    del model
    generate.run(argparse.Namespace(model=final, prompt=prompt, max_new_tokens=max_new_tokens, sample=False,
                                    temperature=1.0, top_p=1.0, num_beams=1, seed=0, no_cache=not cached))
