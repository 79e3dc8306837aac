"""What each calibration choice buys right after conversion (no training): SmolLM2-135M, held-out Wikipedia.

    python benchmarks/conversion_ablation.py [--dense-heads 3] [--sparsity 8] [--routing causal]

Converts the embedded SmolLM2-135M with every combination of head choice (first / scored), router init
(random / calibrated) and fill (zero / mean), all from one calibration pass, and prints held-out perplexity
and its ratio to the original, plus the out-of-domain (Shakespeare) ratio. Writes
benchmarks/results/conversion_ablation.md.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dense-heads", type=int, default=3)
    p.add_argument("--sparsity", type=float, default=8)
    p.add_argument("--routing", default="causal", choices=("expert_choice", "causal"))
    p.add_argument("--out", default="benchmarks/results/conversion_ablation.md")
    args = p.parse_args()

    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.eval.perplexity import perplexity
    from mosa_retrofit.study import StudySpec, machine
    from mosa_retrofit.study.measure import open_workbench

    torch.manual_seed(0)
    spec = StudySpec()
    bench = open_workbench(spec)  # progress bars for the calibration pass
    model = bench.model
    stats = bench.calibration_stats()

    def ppl(m, name):
        return perplexity(m, bench.blocks[name], spec.batch_size)

    base = {name: ppl(model, name) for name in bench.blocks}
    rows = []
    for choice, init, fill in itertools.product(("first", "scored"), ("random", "calibrated"), ("zero", "mean")):
        torch.manual_seed(0)  # the same random routers for every random-init row
        config = MoSAConfig(sparsity=args.sparsity, dense_heads=args.dense_heads, head_choice=choice,
                            sparse_heads="mosa", dense_scope="layer", router_init=init, fill=fill, routing=args.routing, include_first=True,
                            router_score="straight_through")
        converted = convert_(copy.deepcopy(model), config, calibration=bench.calibration, stats=stats, progress=False)
        val, ood = ppl(converted, "val"), ppl(converted, "ood")
        rows.append((choice, init, fill, val, val / base["val"], ood / base["ood"]))
        print(f"{choice:>6} heads, {init:>10} routers, {fill:>4} fill: ppl {val:9.2f} ({val / base['val']:7.2f}x), "
              f"out of domain {ood / base['ood']:7.2f}x", flush=True)

    lines = [f"# Conversion ablation: SmolLM2-135M, {args.dense_heads} dense heads of 9, sparsity {args.sparsity:g}, "
             f"{args.routing} routing, no training", "",
             f"Command: `python benchmarks/conversion_ablation.py --dense-heads {args.dense_heads} --sparsity "
             f"{args.sparsity:g} --routing {args.routing}`", "", f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}", "",
             f"Held-out Wikipedia: {spec.eval_tokens:,} tokens in blocks of {spec.eval_length} (original "
             f"{base['val']:.2f}); out of domain: {spec.ood_tokens:,} tokens of Shakespeare (original {base['ood']:.2f}); "
             f"calibration {spec.calibration_sequences} x {spec.calibration_length} training tokens.", "",
             "| dense heads | routers | fill | ppl | × original | out-of-domain × original |", "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {i} | {f} | {v:.2f} | {r:.2f} | {o:.2f} |" for c, i, f, v, r, o in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
