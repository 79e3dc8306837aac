"""Where the FLOPs go: quality against attention FLOPs and KV bytes at 8,192 tokens for the levers a conversion
has (dense fraction, window, routed share, which layers convert). SmolLM2-135M, no training, one run.

    python benchmarks/flops_frontier.py [--points default,d10-w192,...] [--trials 2] [--quick] [--adapted DIR ...]

Every point keeps dense the KV groups of highest retrieval score (the default's choice; fewer or more of them)
and turns the others into key-selection units; each is measured beside the original on held-out perplexity
(the shared protocol), long-document perplexity (the final 256 tokens of Shakespeare's plays given 4,096 and
7,936 tokens before them) and single-key passkey retrieval at 2k / 4k / 8k. ``sparse-recipe`` is the conversion
of recipes/smollm2-sparse.yaml; ``--adapted`` adds saved models (such as that recipe's ``final/``), measured the same
way, as rows of their own beside the zero-shot points. Writes benchmarks/results/flops_frontier.md and
docs/results/flops_frontier.png.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# name -> MoSAConfig fields ({}: the library default)
POINTS = {
    "default": {},
    "d12-w128": dict(dense_heads=0.125, local_window=128),
    "d10-w192": dict(dense_heads=0.10, local_window=192),
    "d10-w256-s128": dict(dense_heads=0.10, sparsity=128),
    "d10-w128": dict(dense_heads=0.10, local_window=128),
    "sparse-recipe": yaml.safe_load((ROOT / "recipes" / "smollm2-sparse.yaml").read_text())["conversion"]["mosa"],
}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--points", default=",".join(POINTS), help=f"comma-separated names of {list(POINTS)}")
    p.add_argument("--lengths", type=ints, default=[2048, 4096, 8192], help="passkey prompt lengths")
    p.add_argument("--trials", type=int, default=4, help="passkey keys per length (depths 25 %% and 75 %%)")
    p.add_argument("--contexts", type=ints, default=[4096, 7936], help="long-document contexts")
    p.add_argument("--documents", type=int, default=1, help="plays scored")
    p.add_argument("--quick", action="store_true", help="2 trials at 2k only, one context")
    p.add_argument("--adapted", nargs="*", default=[], metavar="DIR", help="saved (trained) models to measure too")
    p.add_argument("--out", default="benchmarks/results/flops_frontier.md")
    p.add_argument("--plot", default="docs/results/flops_frontier.png")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.trials, args.contexts = [2048], 2, [2048]
    names = [n for n in args.points.split(",") if n]
    unknown = [n for n in names if n not in POINTS]
    if unknown:
        raise SystemExit(f"unknown points {unknown}; known: {list(POINTS)}")
    missing = [d for d in args.adapted if not (Path(d) / "config.json").exists()]
    if missing:
        raise SystemExit(f"--adapted: no saved model (config.json) in {missing}")

    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.calibration import collect_stats, default_calibration
    from mosa_retrofit.convert.costs import cost_ratios
    from mosa_retrofit.convert.families import attention_layers
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.retrieval import default_retrieval_prompts, retrieval_scores
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.long_context import answer_correct, context_documents, context_perplexity
    from mosa_retrofit.eval.perplexity import perplexity
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.assets import shakespeare_plays
    from mosa_retrofit.text.prompts import passkey_prompt
    from mosa_retrofit.text.protocol import PROTOCOL

    started = time.time()
    original, source = load_any("smollm2-135m")
    tokenizer = load_tokenizer(source)
    calibration = default_calibration(original, tokenizer)
    windows = sorted({POINTS[n].get("local_window", MoSAConfig().local_window) for n in names})
    stats = collect_stats(original, calibration, {i: m for i, (_, m) in attention_layers(original).items()},
                          sparsities=(), windows=tuple(windows))
    retrieval = retrieval_scores(original, default_retrieval_prompts(tokenizer))
    docs = context_documents(tokenizer, shakespeare_plays(), max(args.contexts), 256)[: args.documents]
    blocks = PROTOCOL.blocks(tokenizer)
    prompts = {L: [passkey_prompt(tokenizer, L, depth, random.Random(f"frontier-{L}-{i}"))
                   for i, depth in enumerate([0.25, 0.75] * (args.trials // 2))] for L in args.lengths}

    def measure(model) -> dict:
        model.eval()
        row = {"held-out": perplexity(model, blocks)}
        row.update({f"long {L}": v for L, v in context_perplexity(model, docs, args.contexts, progress=False).items()})
        row.update({f"passkey {L}": sum(answer_correct(model, pr) for pr in ps) for L, ps in prompts.items()})
        return row

    rows = {"original": dict(measure(original), flops=1.0, kv=1.0)}
    print("original", rows["original"], flush=True)
    for name in names:
        model = load_any("smollm2-135m")[0]
        convert_(model, MoSAConfig(**POINTS[name]), calibration=calibration, stats=stats, retrieval=retrieval,
                 progress=False)
        cost = cost_ratios(model, 8192)
        rows[name] = dict(measure(model), flops=cost.flops, kv=cost.kv_bytes)
        print(name, rows[name], flush=True)
        del model
    for path in args.adapted:
        model = load_any(path)[0]
        cost = cost_ratios(model, 8192)
        label = Path(path).parent.name if Path(path).name == "final" else Path(path).name  # (a run's final/)
        rows[label] = dict(measure(model), flops=cost.flops, kv=cost.kv_bytes, adapted=True)
        print(label, rows[label], flush=True)
        del model

    base = rows["original"]
    cols = ["held-out"] + [f"long {L}" for L in args.contexts]
    head = ("| point | fields | attn FLOPs @8k | KV bytes @8k | " + " | ".join(
        f"{c} ppl (× original)" for c in cols) + " | passkey found of " + f"{args.trials} (" + " · ".join(
        f"{L // 1024}k" for L in args.lengths) + ") |")
    lines = ["# Where the FLOPs go: quality against attention FLOPs at 8,192 tokens, SmolLM2-135M-Instruct"
             + (", zero-shot and adapted" if args.adapted else ", no training"), "",
             f"Command: `python benchmarks/flops_frontier.py {' '.join(argv) if argv else ''}`".rstrip(), "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             f"Held-out: {PROTOCOL.describe()}. Long: the final 256 tokens of {len(docs)} play(s) given the context "
             f"before them. Passkey: single key at depths 25 % and 75 %, teacher forced. Every point keeps dense the "
             f"KV groups of highest retrieval score.", "", head, "|" + "---|" * (5 + len(cols)) ]
    for name, row in rows.items():
        fields = "adapted: the saved model" if row.get("adapted") else "recipes/smollm2-sparse.yaml's conversion" \
            if name == "sparse-recipe" else ", ".join(f"{k}={v}" for k, v in POINTS.get(name, {}).items()) or (
                "-" if name == "original" else "MoSAConfig()")
        figs = " | ".join(f"{row[c]:.2f} ({row[c] / base[c]:.3f})" for c in cols)
        keys = " · ".join(str(row[f"passkey {L}"]) for L in args.lengths)
        lines.append(f"| {name} | {fields} | {row['flops']:.3f}x | {row['kv']:.3f}x | {figs} | {keys} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    _plot(rows, cols, args.lengths, args.plot)


def _plot(rows: dict, cols: list[str], lengths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows["original"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in rows.items():
        if name == "original":
            continue
        kept = all(row[f"passkey {L}"] >= base[f"passkey {L}"] for L in lengths)
        for ax, col in zip(axes, (cols[0], cols[-1])):
            ax.scatter(row["flops"], row[col] / base[col], marker="*" if row.get("adapted") else "o" if kept else "x",
                       s=90 if row.get("adapted") else None, color="C0" if kept else "C3")
            ax.annotate(name, (row["flops"], row[col] / base[col]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for ax, col in zip(axes, (cols[0], cols[-1])):
        ax.axhline(1.02, color="grey", lw=0.8, ls="--")
        ax.axvline(0.35, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("attention FLOPs at 8,192 tokens (× original)")
        ax.set_ylabel(f"{col} perplexity (× original)")
    fig.suptitle("Quality against FLOPs (o: passkey as the original's, x: keys lost; *: adapted, blue if kept)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
