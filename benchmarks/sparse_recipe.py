"""The sparse recipe and its control, measured in one run: what continued pretraining buys at a conversion twice
as sparse as the default, separated from what training on the text alone would buy.

    python benchmarks/sparse_recipe.py [--recipe recipes/smollm2-sparse.yaml] [--curve-every 20] [--no-control]
                                       [--from-runs]
    python benchmarks/sparse_recipe.py --compare OUT_A OUT_B ...   # objectives, each a finished run's folder
    python benchmarks/sparse_recipe.py --compare OUT_C --append   # one more row under the table's runs

Runs ``mosa-retrofit train RECIPE`` and then ``--control`` (the original trained by the same recipe on the same
blocks), one after the other (measure alone); the converted run with its long-context checks also every
``--curve-every`` steps and at every stage end (the learning curve's points; about 7 minutes each, so the run
takes longer than the recipe alone, whose checks fall after conversion and after training only). Then it writes
benchmarks/results/smollm2_sparse.md (the summary rows, the costs, the learning curve) and
docs/results/sparse_curve.png. ``--from-runs`` only reads the two
output folders again. ``--compare`` writes benchmarks/results/sparse_objectives.md from finished runs of the
same conversion with different stages (the objective comparison at equal wall time); with ``--append`` the
rows go under those already there (measured before, on the same conversion), with the command that added them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path


def _curve(out: Path) -> list[dict]:
    """Validation records that carry the long-context checks, in order (after conversion, every long_every
    steps, after the last stage)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in recs if r.get("split") == "validation" and "long" in r and r["stage"] != "original model"]


def _objective(stage: dict) -> str:
    answers = stage.get("answer_weight", 0.0)
    if stage["kind"] == "router_warmup":
        return "KL to the dense attention mass" + (f" + {answers:g} x that of the answers' queries" if answers else "")
    if stage["kind"] == "layer_distill":
        return "layer outputs"
    parts = [f"{w:g} LM" for w in [stage.get("lm_weight", 1.0)] if w] + \
            [f"{w:g} KD" for w in [stage.get("kd_weight", 0.0)] if w]
    return " + ".join(parts) + (f", answers +{answers:g}x" if answers else "")


def _keys(found: dict) -> str:
    return " · ".join(str(v) for _, v in sorted(found.items(), key=lambda kv: int(kv[0])))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default="recipes/smollm2-sparse.yaml")
    p.add_argument("--curve-every", type=int, default=20, metavar="N",
                   help="long checks every N steps and at every stage end of the converted run (0: the recipe's own)")
    p.add_argument("--no-control", action="store_true", help="only the converted run")
    p.add_argument("--from-runs", action="store_true", help="read the two output folders, train nothing")
    p.add_argument("--out", default="benchmarks/results/smollm2_sparse.md")
    p.add_argument("--plot", default="docs/results/sparse_curve.png")
    p.add_argument("--compare", nargs="+", metavar="OUT", help="finished runs to compare (objective table only)")
    p.add_argument("--append", action="store_true",
                   help="with --compare: add the rows under the table already in the results file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (both runs)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.compare:
        return compare(args.compare, argv, args.append)

    from mosa_retrofit.study import machine
    from mosa_retrofit.train.recipe import CONTROL_SUFFIX, Recipe
    from mosa_retrofit.train.trainer import summary_table, train

    curve_every = [f"evaluation.long_every={args.curve_every}"] if args.curve_every else []
    recipe = Recipe.from_yaml(args.recipe, [*curve_every, *args.overrides])
    control = dataclasses.replace(recipe, control=True, output_dir=recipe.output_dir + CONTROL_SUFFIX,
                                  evaluation=dataclasses.replace(recipe.evaluation, before_conversion=False, long_every=0))
    started = time.time()
    if not args.from_runs:
        train(recipe)
        if not args.no_control:
            train(control)  # (its "original model" row is the converted run's, measured once; no curve)
    main_dir, control_dir = Path(recipe.output_dir), Path(control.output_dir)
    summary = json.loads((main_dir / "summary.json").read_text())
    sibling = json.loads((control_dir / "summary.json").read_text()) if (control_dir / "summary.json").exists() else None

    curve = _curve(main_dir)
    m = recipe.conversion.mosa
    lines = [f"# The sparse recipe and its control: {m.dense_heads} of the KV groups dense, the others window "
             f"{m.local_window} + 1 in {m.sparsity:g} tokens routed",
             "", f"Command: `{' '.join(['python benchmarks/sparse_recipe.py', *argv])}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; this script {time.time() - started:.0f} s.", "",
             *([f"Runs read from `{main_dir}`" + (f" and `{control_dir}`" if sibling else " (no control run there)")
                + f", as `mosa-retrofit train {args.recipe} {' '.join([*curve_every, *args.overrides])}`".rstrip()
                + " wrote them.", ""] if args.from_runs else []),
             "## Summary", "", summary_table(summary, sibling), "",
             "## Learning curve", "", "Every long-context check of the converted run against training tokens.", "",
             "| tokens | held-out ppl | " + " | ".join(f"long {L} ppl" for L in (curve[0]["long"] if curve else {}))
             + " | " + " | ".join(f"passkey {v}" for v in (curve[0]["passkey"] if curve else {})) + " |",
             "|" + "---|" * (2 + len(curve[0]["long"] if curve else {}) + len(curve[0]["passkey"] if curve else {}))]
    for r in curve:
        lines.append(f"| {r['tokens']:,} | {r['ppl']:.2f} | " + " | ".join(f"{v:.2f}" for v in r["long"].values())
                     + " | " + " | ".join(_keys(f) for f in r["passkey"].values()) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    if curve:
        _plot(curve, summary, sibling, args.plot)


def compare(outs: list[str], argv, append: bool = False) -> None:
    """One row per finished run: its stages, what trained, tokens and training time, and its quality after
    training beside its own "after conversion" row (the same conversion in every run)."""
    from mosa_retrofit.study import machine

    path = Path("benchmarks/results/sparse_objectives.md")
    rows = [_compare_row(spec) for spec in outs]
    if append:
        lines = path.read_text().rstrip("\n").splitlines()
        last = max(i for i, line in enumerate(lines) if line.startswith("|"))
        note = (f"The last {len(rows)} row(s): `python benchmarks/sparse_recipe.py {' '.join(argv)}` ({machine()}; "
                f"{time.strftime('%Y-%m-%d')}), each run the recipe with the stages its row names, on the same "
                "conversion (the run's overrides are in its checkpoint state).")
        lines = lines[:last + 1] + rows + lines[last + 1:] + ["", note]
    else:
        lines = ["# Objectives compared at about equal training time, on the sparse recipe's conversion", "",
                 f"Command: `python benchmarks/sparse_recipe.py {' '.join(argv)}`", "",
                 f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}.", "",
                 "Each run: `mosa-retrofit train recipes/smollm2-sparse.yaml output_dir=OUT "
                 "evaluation.before_conversion=false evaluation.passkey_variants=[single] evaluation.long_every=0 "
                 "\"stages=[...]\"` with the stages below (the whole recipe is in each run's checkpoint state), "
                 "router warm-up without and adaptation with `training.gradient_checkpointing=true`; a row marked 'N "
                 "of M steps' is the recipe's own run at its step-N checks. Quality after training (× after "
                 "conversion, the same conversion in every run).", "",
                 "| stages: kind (objective; what trains), steps | trainable parameters | training tokens | "
                 "training time | held-out ppl | long ppl | passkey single (2k · 4k · 8k) |",
                 "|---|---|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print(text)


def _trains(stage: dict) -> str:
    lora = stage.get("lora")
    if lora:
        return f"LoRA r={lora.get('r', 16)} on {'/'.join(lora.get('target_modules', ['q/k/v/o']))} + routers"
    return stage.get("trainable", "routers")


def _compare_row(spec: str) -> str:
    """One run's row: OUT, or OUT@STEP for the run's long-context checks at global step STEP."""
    name, _, at = spec.partition("@")
    out = Path(name)
    summary = json.loads((out / "summary.json").read_text())
    state = json.loads(sorted(out.glob("checkpoint-*/state.json"))[-1].read_text())
    conv = next(e for e in summary["evals"] if e["name"] == "after conversion")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = {st["name"]: st["steps"] for st in state["recipe"]["stages"]}
    if at:
        last = next(r for r in recs if r["split"] == "validation" and r["global_step"] == int(at) and "long" in r)
        train = [r for r in recs if r["split"] == "train" and r["global_step"] <= int(at)]
        # steps are logged every few: the time of the logged span, scaled to all steps up to STEP
        time_s = (train[-1]["elapsed"] - train[0]["elapsed"]) * int(at) / (train[-1]["global_step"] - train[0]["global_step"])
        tokens = last["tokens"]
        steps = {k: f"{at} of {v}" for k, v in steps.items()}
    else:
        last = summary["evals"][-1]
        time_s = sum(v["time"] for v in state["stage_log"].values())
        tokens = summary["tokens"]
    stages = ", ".join(f"{st['kind']} ({_objective(st)}; {_trains(st)}), {steps[st['name']]} steps"
                       for st in state["recipe"]["stages"])
    trained = [v["trainable"] for v in state["stage_log"].values() if "trainable" in v]
    if not trained and (out / "console.log").exists():  # runs from before the count was kept: their output
        trained = [int(n.replace(",", "")) for n in
                   re.findall(r"([\d,]+) trainable parameters", (out / "console.log").read_text())]
    L = next(iter(last["long"]))
    return (f"| {stages} | {' + '.join(f'{n:,}' for n in trained) or '-'} | {tokens:,} | {time_s:.0f} s | "
            f"{last['ppl']:.2f} ({last['ppl'] / conv['ppl']:.3f}x) | "
            f"{last['long'][L]:.2f} ({last['long'][L] / conv['long'][L]:.3f}x) | "
            f"{_keys(last['passkey']['single'])} (was {_keys(conv['passkey']['single'])}) |")


def _plot(curve: list[dict], summary: dict, sibling: dict | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((e for e in summary["evals"] if e["name"] == "original model"), None)
    tokens = [r["tokens"] for r in curve]
    L = next(iter(curve[0]["long"]))
    panels = [("held-out perplexity", [r["ppl"] for r in curve], base and base["ppl"],
               sibling and sibling["evals"][-1]["ppl"]),
              (f"long-document perplexity ({int(L):,} of context)", [r["long"][L] for r in curve],
               base and base.get("long", {}).get(L), sibling and sibling["evals"][-1].get("long", {}).get(L))]
    variants = list(curve[0]["passkey"])
    fig, axes = plt.subplots(1, 2 + len(variants), figsize=(4.2 * (2 + len(variants)), 3.8))
    for ax, (title, ys, ref, ctrl) in zip(axes, panels):
        ax.plot(tokens, ys, "o-", label="converted, training")
        if ref:
            ax.axhline(ref, color="k", lw=1, ls="--", label="original")
        if ctrl:
            ax.axhline(ctrl, color="C3", lw=1, ls=":", label="control (original trained the same way)")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens (thousands)")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}")
    axes[0].legend(fontsize=7)
    for ax, v in zip(axes[2:], variants):
        lengths = sorted(curve[0]["passkey"][v], key=int)
        for j, Lp in enumerate(lengths):
            ax.plot(tokens, [r["passkey"][v][Lp] for r in curve], "o-", color=f"C{j}", label=f"{int(Lp) // 1024}k")
            if base and v in base.get("passkey", {}):
                ax.axhline(base["passkey"][v][Lp], color=f"C{j}", lw=0.8, ls="--")
        ax.set_title(f"passkey ({v}) found (dashed: original)", fontsize=9)
        ax.set_xlabel("training tokens (thousands)")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
