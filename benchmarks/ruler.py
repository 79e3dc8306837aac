"""RULER-style tasks on SmolLM2-135M-Instruct: the original and its default conversion (no training), the same
prompts for both, answered by greedy generation through each model's own KV cache.

    python benchmarks/ruler.py [--lengths 2048,4096,8192] [--trials 4] [--tasks niah_number,...]

Writes benchmarks/results/ruler_smollm2.md: every task's score per length (original · converted), the worst
task's ratio first, whether the conversion stays within one trial of the original wherever the original passes at
least half its trials, and the KV bytes each model's cache holds after a prefill of the longest length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="the original model")
    p.add_argument("--lengths", type=ints, default=[2048, 4096, 8192])
    p.add_argument("--trials", type=int, default=4, help="prompts per task and length")
    p.add_argument("--tasks", default="", help="comma-separated (default: every task)")
    p.add_argument("--out", default="benchmarks/results/ruler_smollm2.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.costs import cost_ratios
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.long_context import prefill_footprint
    from mosa_retrofit.eval.ruler import greedy_answerer, ruler_prompts, run_ruler, task_ratios
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.assets import wikipedia_articles
    from mosa_retrofit.text.ruler import TASKS

    tasks = [t for t in args.tasks.split(",") if t] or list(TASKS)
    started = time.time()
    original, source = load_any(args.model)
    tokenizer = load_tokenizer(source)
    converted = load_any(args.model)[0]
    convert_(converted, MoSAConfig(), tokenizer=tokenizer, progress=False)
    models = {"original": original.eval(), "default conversion": converted.eval()}
    prompts = ruler_prompts(tokenizer, wikipedia_articles(), tasks, args.lengths, args.trials)
    scores = run_ruler({n: greedy_answerer(m, tokenizer) for n, m in models.items()}, prompts)
    longest = max(args.lengths)
    held = {n: prefill_footprint(m, longest)[0] for n, m in models.items()}
    cost = cost_ratios(converted, longest)

    o, c = scores["original"], scores["default conversion"]
    rows = task_ratios(o, c)
    worst = next((r for r in rows if r.ratio is not None), None)
    checked = [(t, L) for t in tasks for L in args.lengths if o[t, L] >= 0.5]
    within = [(t, L) for t, L in checked if c[t, L] >= o[t, L] - 1 / args.trials - 1e-9]
    lines = ["# RULER-style tasks: SmolLM2-135M-Instruct and its default conversion, no training", "",
             f"Command: `{' '.join(['python benchmarks/ruler.py', *argv])}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             f"{args.trials} prompts per task and length (the asked needle at depths (i + 0.5) / {args.trials}), "
             "filler from the embedded Wikipedia articles, greedy generation through each model's KV cache, "
             "scored as RULER does (the share of expected strings the answer contains). Each cell: original · "
             "default conversion.", "",
             f"Worst task: **{worst.task}** at {worst.ratio:.2f}x the original's score ({worst.converted:.2f} "
             f"against {worst.original:.2f}, mean over the lengths)." if worst else "No task solved by the original.",
             "",
             f"Within one trial of the original wherever the original passes at least half its trials: "
             f"{len(within)} of {len(checked)} (task, length) cells"
             + (f"; not: {', '.join(f'{t} @{L}' for t, L in checked if (t, L) not in within)}" if len(within) <
                len(checked) else "") + ".", "",
             "| task | " + " | ".join(f"{L:,}" for L in args.lengths) + " | mean, converted / original |",
             "|---|" + "---|" * (len(args.lengths) + 1)]
    for r in sorted(rows, key=lambda r: tasks.index(r.task)):
        lines.append(f"| {r.task} | " + " | ".join(f"{o[r.task, L]:.2f} · {c[r.task, L]:.2f}" for L in args.lengths)
                     + f" | {'-' if r.ratio is None else f'{r.ratio:.2f}x'} |")
    lines += ["", f"KV cache held after one {longest:,}-token prefill: original {held['original'] / 2**20:.1f} MiB, "
              f"default conversion {held['default conversion'] / 2**20:.1f} MiB "
              f"({held['default conversion'] / held['original']:.3f}x; cost model {cost.kv_bytes:.3f}x KV bytes, "
              f"{cost.flops:.3f}x attention FLOPs)."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
