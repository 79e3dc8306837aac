"""RULER-style tasks on an embedded model (SmolLM2-135M-Instruct by default, or Gemma-3-270M-it): the original
and its default conversion (no training), the same prompts for both, answered by greedy generation through each
model's own KV cache.

    python benchmarks/ruler.py [--model gemma3-270m] [--lengths 2048,4096,8192] [--trials 4] [--tasks ...]

Writes benchmarks/results/ruler_<model>.md: every task's score per length (original · converted), the worst
task's ratio first (among the tasks the original solves), whether the conversion stays within one trial of the
original wherever the original passes at least half its trials, and the KV bytes each model's cache holds after a
prefill of the longest length and the peak memory of that prefill, beside the cost model's KV bytes at the
model's own positions.
"""

from __future__ import annotations

import argparse
import sys

import torch
import time
from pathlib import Path


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def earlier_original(path: Path, tasks: list[str], lengths: list[int], trials: int) -> dict[tuple[str, int], float]:
    """The original's cell of every (task, length) in an earlier results file, which must have run the same grid."""
    text = path.read_text()
    if f"{trials} prompts per task and length" not in text:
        raise SystemExit(f"{path} did not run {trials} prompts per task and length")
    head = next(line for line in text.splitlines() if line.startswith("| task |"))
    columns = [c.strip().replace(",", "") for c in head.strip("|").split("|")][1:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")][1:]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| task")}
    try:
        return {(t, L): float(rows[t][columns.index(str(L))].split(" · ")[0]) for t in tasks for L in lengths}
    except (KeyError, ValueError) as e:
        raise SystemExit(f"{path} lacks the original's score of {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="the original model")
    p.add_argument("--converted", default="", help="its default conversion, saved (default: converted here)")
    p.add_argument("--label", default="default conversion",
                   help="the name of --converted in the results (a baseline's, say)")
    p.add_argument("--lengths", type=ints, default=[2048, 4096, 8192])
    p.add_argument("--trials", type=int, default=4, help="prompts per task and length")
    p.add_argument("--tasks", default="", help="comma-separated (default: every task)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill prompts this many tokens at a time")
    p.add_argument("--original-from", default="",
                   help="take the original's scores from this earlier results file of the same --lengths, --trials and "
                        "tasks (the same prompts: each is built from a seed of its task and length) instead of running "
                        "it again")
    p.add_argument("--out", default="", help="default: benchmarks/results/ruler_smollm2.md or ruler_<model>.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    slug = "smollm2" if args.model == "smollm2-135m" else Path(args.model).name
    args.out = args.out or f"benchmarks/results/ruler_{slug}.md"

    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.bench.model import peak_bytes
    from mosa_retrofit.convert.costs import cost_ratios
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.long_context import prefill_footprint
    from mosa_retrofit.eval.ruler import SOLVED, greedy_answerer, ruler_prompts, run_ruler, task_ratios
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.assets import EMBEDDED, wikipedia_articles
    from mosa_retrofit.text.ruler import TASKS
    from mosa_retrofit.validate import positions_of

    tasks = [t for t in args.tasks.split(",") if t] or list(TASKS)
    started = time.time()
    original, source = load_any(args.model)
    tokenizer = load_tokenizer(source)
    if args.converted:
        converted = load_any(args.converted)[0]
    else:
        converted = load_any(args.model)[0]
        convert_(converted, MoSAConfig(), tokenizer=tokenizer, progress=False)
    title = EMBEDDED[args.model].hub_id.split("/")[-1] if args.model in EMBEDDED else args.model
    models = {"original": original.eval(), "default conversion": converted.eval()}
    prompts = ruler_prompts(tokenizer, wikipedia_articles(), tasks, args.lengths, args.trials)
    answering = models if not args.original_from else {"default conversion": converted}
    scores = run_ruler({n: greedy_answerer(m, tokenizer, args.prefill_chunk) for n, m in answering.items()}, prompts)
    if args.original_from:
        scores["original"] = earlier_original(Path(args.original_from), tasks, args.lengths, args.trials)
    longest = max(args.lengths)
    held, peak = {}, {}
    for n, m in models.items():  # one prefill each: the cache it leaves and the memory it peaked at
        fill = lambda: held.__setitem__(n, prefill_footprint(m, longest, chunk=args.prefill_chunk)[0])  # noqa: E731
        peak[n] = peak_bytes(fill, torch.device("cpu"))
    positions = positions_of(original.config) or longest
    cost, cost_full = cost_ratios(converted, longest), cost_ratios(converted, positions)

    o, c = scores["original"], scores["default conversion"]
    rows = task_ratios(o, c)
    worst = next((r for r in rows if r.ratio is not None), None)
    checked = [(t, L) for t in tasks for L in args.lengths if o[t, L] >= 0.5]
    within = [(t, L) for t, L in checked if c[t, L] >= o[t, L] - 1 / args.trials - 1e-9]
    lines = [f"# RULER-style tasks: {title} and its {args.label}, no training", "",
             f"Command: `{' '.join(['python benchmarks/ruler.py', *argv])}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             *([f"The original's scores are those of {args.original_from} (the same prompts), not run again.", ""]
               if args.original_from else []),
             f"{args.trials} prompts per task and length (the asked needle at depths (i + 0.5) / {args.trials}), "
             "filler from the embedded Wikipedia articles, greedy generation through each model's KV cache, "
             "scored as RULER does (the share of expected strings the answer contains). Each cell: original · "
             f"{args.label}.", "",
             f"Worst task the original solves (a mean score of at least {SOLVED} over the lengths): "
             f"**{worst.task}** at {worst.ratio:.2f}x the original's score ({worst.converted:.2f} against "
             f"{worst.original:.2f})." if worst else f"The original solves no task (mean score >= {SOLVED}).",
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
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    ratio = lambda a, b: "" if a is None or not b else f" ({a / b:.3f}x)"  # noqa: E731
    lines += ["", f"KV cache held after one {longest:,}-token prefill: original {mib(held['original'])}, "
              f"{args.label} {mib(held['default conversion'])}"
              f"{ratio(held['default conversion'], held['original'])}; cost model {cost.kv_bytes:.3f}x KV bytes, "
              f"{cost.flops:.3f}x attention FLOPs. Peak memory of that prefill: original {mib(peak['original'])}, "
              f"{args.label} {mib(peak['default conversion'])}"
              f"{ratio(peak['default conversion'], peak['original'])}.", "",
              f"At the model's own {positions:,} positions the cost model gives {cost_full.kv_bytes:.3f}x KV bytes "
              f"and {cost_full.flops:.3f}x attention FLOPs."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
