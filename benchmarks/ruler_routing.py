"""Why a converted model misses a RULER-style needle: per prompt, the answer with routing as calibrated, with nothing
routed and with every token routed, and which key-selection units pass the needle's tokens.

    python benchmarks/ruler_routing.py --converted out/smollm2-default --task niah_word --lengths 2048 --trials 4

"Nothing routed" sets every unit's threshold to +inf (each unit keeps its sinks and its window), "every token
routed" to -inf (every unit sees every key: the original's attention, so it answers as the original). A needle
found with every token routed and missed as calibrated is lost to routing; "units passing the needle" counts the
key-selection units (layer, KV group) whose router passes any of the needle's first 12 tokens in the prompt's
prefill, and names their layers. Writes benchmarks/results/ruler_routing.md.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="the original model (its tokenizer)")
    p.add_argument("--converted", required=True, help="a saved conversion with key-selection units")
    p.add_argument("--task", default="niah_word", help="a needle task of the suite")
    p.add_argument("--lengths", type=ints, default=[2048])
    p.add_argument("--trials", type=int, default=4, help="prompts per length (ruler.py's prompts of that many trials)")
    p.add_argument("--out", default="benchmarks/results/ruler_routing.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    import torch

    import mosa_retrofit.convert.heads.routed as routed
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.ruler import greedy_answerer, ruler_prompts
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.assets import wikipedia_articles
    from mosa_retrofit.text.ruler import score

    started = time.time()
    tokenizer = load_tokenizer(load_any(args.model)[1])
    prompts = ruler_prompts(tokenizer, wikipedia_articles(), [args.task], args.lengths, args.trials)
    if not all(q.needles_at for cell in prompts.values() for q in cell):
        raise SystemExit(f"--task {args.task} inserts no needle; use a needle task (niah_*, variable_tracking)")
    model = load_any(args.converted)[0].eval()
    units = [(name, m) for name, m in model.named_modules() if hasattr(m, "mosa_threshold")]
    if not units:
        raise SystemExit(f"{args.converted} has no key-selection units (sparse_heads='mosa_keys')")
    thresholds = [m.mosa_threshold for _, m in units]
    layer_ids = [int(re.search(r"\.(\d+)\.", name).group(1)) for name, _ in units]  # the layer of each unit
    saved = [t.clone() for t in thresholds]
    passed: list = []
    real = routed.causal_select

    def recording(*a, **k):  # what each key-selection layer passes, (E, B, T): one call per layer and forward
        out = real(*a, **k)
        passed.append(out[:, 0].detach())
        return out

    answer = greedy_answerer(model, tokenizer)
    rows = []
    routed.causal_select = recording
    try:
        for (_, L), cell in prompts.items():
            for i, q in enumerate(cell):
                passed.clear()
                found = score(answer(q), q.answers)
                T = q.ids.shape[1]
                prefill = [u for u in passed if u.shape[-1] == T]  # [(E, T)] per converted layer, in layer order
                layers = collections.Counter()
                for n, u in enumerate(prefill):
                    hit = int(u[:, q.needles_at[0]: q.needles_at[0] + 12].any(-1).sum())
                    if hit:
                        layers[layer_ids[n]] += hit
                every = torch.cat(prefill)
                other = {}
                for name, value in (("none", float("inf")), ("all", float("-inf"))):
                    for t in thresholds:
                        t.fill_(value)
                    other[name] = score(answer(q), q.answers)
                    for t, v in zip(thresholds, saved):
                        t.copy_(v)
                rows.append(f"| {L:,} | {(i + 0.5) / args.trials:.3f} | {q.needles_at[0]:,} of {T:,} | {found:.2f} | "
                            f"{other['none']:.2f} | {other['all']:.2f} | {sum(layers.values())} of {every.shape[0]} "
                            f"({', '.join(f'{n}: {c}' for n, c in sorted(layers.items())) or '-'}) | "
                            f"{every.sum(-1).float().mean().item():.1f} |")
                print(rows[-1], flush=True)
    finally:
        routed.causal_select = real
    lines = [f"# Why {args.converted} misses {args.task} needles: what its routers pass", "",
             f"Command: `{' '.join(['python benchmarks/ruler_routing.py', *argv])}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             f"The prompts of `benchmarks/ruler.py --trials {args.trials}` (the same seeds). Scores as RULER's "
             "(the share of expected strings the answer contains), greedy generation through the model's cache. "
             "Units passing the needle: key-selection units whose router passes any of the needle's first 12 "
             "tokens in the prefill (per model layer).", "",
             "| length | depth | needle at | as calibrated | nothing routed | every token routed (the original) | "
             "units passing the needle (layer: units) | tokens passed per unit |",
             "|---|---|---|---|---|---|---|---|", *rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
