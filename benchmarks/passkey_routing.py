"""Why the sparse recipe's point loses the 2k single-key passkey: what its routers pass on those prompts, and the
keys found with routing as calibrated, with nothing routed and with every token routed. SmolLM2-135M, one run.

    python benchmarks/passkey_routing.py [--sinks 4,16] [--lengths 2048,4096]

The recipe's conversion (recipes/smollm2-sparse.yaml: a tenth of the KV groups dense, the others 240-token window
+ sinks + 1 in 512 routed, calibrated causal routers), zero-shot, on the recipe's single-key prompts (6 per length,
depths 25/50/75 %). "nothing routed" sets every unit's threshold to +inf (each unit keeps its sinks, its window and
the first token), "all routed" to -inf (every unit sees every key: the original's attention). Per prompt: the
tokens each unit passes (mean over units) and the positions passed most often. Writes
benchmarks/results/passkey_routing.md.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

import yaml

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-sparse.yaml"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sinks", default="4,16", help="comma-separated sink_tokens values to convert with")
    p.add_argument("--lengths", default="2048,4096", help="comma-separated prompt lengths")
    p.add_argument("--out", default="benchmarks/results/passkey_routing.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    sinks = [int(s) for s in args.sinks.split(",")]
    lengths = [int(s) for s in args.lengths.split(",")]

    import torch

    import mosa_retrofit.convert.heads.routed as routed
    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.calibration import default_calibration
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.long_context import answer_correct
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.prompts import passkey_prompt

    started = time.time()
    base = yaml.safe_load(RECIPE.read_text())["conversion"]["mosa"]
    original, source = load_any("smollm2-135m")
    tok = load_tokenizer(source)
    calibration = default_calibration(original, tok)
    depths = (0.25, 0.5, 0.75)
    prompts = {L: [passkey_prompt(tok, L, depths[i % 3], random.Random(f"recipe-single-{L}-{i}"), "single")
                   for i in range(6)] for L in lengths}
    passed: list = []
    real = routed.causal_select

    def recording(*a, **k):  # what the key-selection units pass (E, B, T), layer after layer
        out = real(*a, **k)
        passed.append(out[:, 0].detach())
        return out

    routed.causal_select = recording
    lines = ["# What the sparse recipe's routers pass on the passkey prompts (zero-shot conversion)", "",
             f"Command: `python benchmarks/passkey_routing.py{' ' + ' '.join(argv) if argv else ''}`", ""]
    body = []
    for s in sinks:
        model = load_any("smollm2-135m")[0]
        convert_(model, MoSAConfig(**{**base, "sink_tokens": s}), calibration=calibration, tokenizer=tok,
                 progress=False)
        model.eval()
        thresholds = [m.mosa_threshold for m in model.modules() if hasattr(m, "mosa_threshold")]
        saved = [t.clone() for t in thresholds]
        body += [f"## sink_tokens = {s}", "",
                 "| length | depth | found (as calibrated) | tokens passed per unit | positions passed most "
                 "(units) | needle at | found, nothing routed | found, all routed |",
                 "|---|---|---|---|---|---|---|---|"]
        for L in lengths:
            for i, q in enumerate(prompts[L]):
                passed.clear()
                found = answer_correct(model, q)
                units = torch.cat(passed)  # (units, T)
                per_unit = units.sum(-1).float().mean().item()
                counts = collections.Counter(t for u in units for t in u.nonzero().flatten().tolist())
                top = ", ".join(f"{t} ({c})" for t, c in counts.most_common(6))
                other = {}
                for name, value in (("none", float("inf")), ("all", float("-inf"))):
                    for t in thresholds:
                        t.fill_(value)
                    other[name] = answer_correct(model, q)
                    for t, v in zip(thresholds, saved):
                        t.copy_(v)
                body.append(f"| {L} | {depths[i % 3]:.2f} | {'yes' if found else 'no'} | {per_unit:.1f} | {top} | "
                            f"{q.needle_at} | {'yes' if other['none'] else 'no'} | {'yes' if other['all'] else 'no'} |")
                print(body[-1], flush=True)
        body.append("")
        del model
    routed.causal_select = real
    lines += [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s.", "", *body]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
