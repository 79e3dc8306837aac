"""``mosa-retrofit train RECIPE [key=value ...]``: run a continued-pretraining recipe."""

from __future__ import annotations

import argparse


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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mosa_retrofit.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe, args.overrides)  # every value validated before any loading
    if args.check:
        print(recipe.to_yaml(), end="")
        return 0
    from mosa_retrofit.train import train

    train(recipe, resume=args.resume, progress=not args.quiet)
    return 0
