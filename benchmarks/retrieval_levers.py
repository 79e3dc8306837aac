"""Where the sparse recipe's passkey goes: the answer's log-probability, not only keys found, for the levers a
conversion at 0.35x FLOPs / 0.15x KV bytes has. SmolLM2-135M, zero-shot, one run.

    python benchmarks/retrieval_levers.py [--variants original,point,nothing,dense20,oracle] [--models DIR ...]
                                          [--checks single,multi] [--trials 6]

Six trials per check (the recipe's prompts: single and multi-key passkey at 2k, 4k, 8k, depths 25/50/75 %; with
``--trials`` more, the first six still the recipe's; ``--checks`` picks single, multi or both), each
scored two ways: found (teacher forced, every answer token the argmax: what the recipe's summary counts) and the
answer's log-probability summed over its tokens, averaged over the six prompts (a continuous score: a model can
lose a key by a hair, and the original finds the multi-key one only about half the time). Variants:

* ``original``: the unconverted model;
* ``point``: the recipe's conversion (a tenth of the KV groups dense by retrieval score, the others window 240
  + 4 sinks + 1 in 512 routed by calibrated causal routers);
* ``nothing``: the same, nothing routed (every threshold +inf): sinks and window only;
* ``dense20``: a fifth of the groups dense instead of a tenth (0.43x FLOPs, 0.25x KV bytes: over the budget, the
  ceiling more dense groups would give);
* ``oracle``: the recipe's conversion whose units also route the key sentences (ten tokens before each digit of a
  hidden key, through the answer's digits): what routers that pass the keys would give;
* ``--models``: saved models (converted or not), such as the recipe's adapted model and its control
  (``out/smollm2-sparse/final``, ``out/smollm2-sparse-control/final``), each a row of its own.

Writes benchmarks/results/retrieval_levers.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-sparse.yaml"
VARIANTS = ("original", "point", "nothing", "dense20", "oracle")
CHECKS = [(v, L) for v in ("single", "multi") for L in (2048, 4096, 8192)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    p.add_argument("--models", nargs="*", default=[], metavar="DIR", help="saved models to score as well")
    p.add_argument("--checks", default="single,multi", help="passkey variants to score: single, multi or both")
    p.add_argument("--trials", type=int, default=6, help="prompts per check (depths 25/50/75 %% in turn)")
    p.add_argument("--out", default="benchmarks/results/retrieval_levers.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    kinds = [c for c in args.checks.split(",") if c]
    if not kinds or any(c not in ("single", "multi") for c in kinds):
        raise SystemExit(f"--checks {args.checks!r}: give single, multi or single,multi")
    if args.trials < 1:
        raise SystemExit(f"--trials {args.trials}: give 1 or more prompts per check")
    checks = [(v, L) for v, L in CHECKS if v in kinds]
    missing = [m for m in args.models if not (Path(m) / "config.json").exists()]
    if missing:
        raise SystemExit(f"--models: no saved model (config.json) in {missing}")

    import torch
    import yaml

    import mosa_retrofit.convert.heads.routed as routed
    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.calibration import default_calibration
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.long_context import tail_logits
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.prompts import passkey_prompt

    started = time.time()
    point = yaml.safe_load(RECIPE.read_text())["conversion"]["mosa"]
    original, source = load_any("smollm2-135m")
    tok = load_tokenizer(source)
    calibration = default_calibration(original, tok)
    depths = (0.25, 0.5, 0.75)
    prompts = {(v, L): [passkey_prompt(tok, L, depths[i % 3], random.Random(f"recipe-{v}-{L}-{i}"), v)
                        for i in range(args.trials)] for v, L in checks}
    real_select, oracle = routed.causal_select, {"mask": None}

    def select(*a, **k):  # the units' own choice, plus the key sentences while an oracle mask is set
        out = real_select(*a, **k)
        return out if oracle["mask"] is None else out | oracle["mask"][None, None, : out.shape[-1]]

    routed.causal_select = select

    def key_sentences(q) -> "torch.Tensor":
        ids = q.ids[0].tolist()
        digit = [tok.decode([t]).strip().isdigit() for t in ids[: q.answer_start]]
        mask = torch.zeros(len(ids), dtype=torch.bool)
        for i, d in enumerate(digit):
            if d:
                mask[max(0, i - 10): i + 1] = True
        return mask

    @torch.no_grad()
    def score(model, q, with_oracle: bool) -> tuple[bool, float]:
        oracle["mask"] = key_sentences(q) if with_oracle else None
        ids = q.ids
        n = ids.shape[1] - q.answer_start
        logits = tail_logits(model, ids, n + 1)[0, :-1].float()  # (n, V) predicting the answer's tokens
        target = ids[0, q.answer_start:]
        oracle["mask"] = None
        return bool(torch.equal(logits.argmax(-1), target)), float(logits.log_softmax(-1)[torch.arange(n), target].sum())

    def measure(model, name: str, with_oracle: bool = False) -> dict:
        model.eval()
        row = {"name": name}
        for (v, L), qs in prompts.items():
            got = [score(model, q, with_oracle) for q in qs]
            row[f"{v}{L}"] = [sum(f for f, _ in got), round(sum(lp for _, lp in got) / len(got), 2)]
        print(json.dumps(row), flush=True)
        return row

    def converted(**over):
        model = load_any("smollm2-135m")[0]
        convert_(model, MoSAConfig(**{**point, **over}), calibration=calibration, tokenizer=tok, progress=False)
        return model

    rows = []
    for name in names:
        if name == "original":
            rows.append(measure(original, name))
            continue
        model = converted(dense_heads=0.2) if name == "dense20" else converted()
        if name == "nothing":
            for m in model.modules():
                if hasattr(m, "mosa_threshold"):
                    m.mosa_threshold.fill_(float("inf"))
        rows.append(measure(model, name, with_oracle=name == "oracle"))
        del model
    for path in args.models:
        rows.append(measure(load_any(path)[0], path))
    routed.causal_select = real_select

    labels = {"original": "original", "point": "the recipe's conversion (10 % dense, window 240 + 1/512 routed)",
              "nothing": "the same, nothing routed", "dense20": "20 % of the groups dense (over the budget)",
              "oracle": "the recipe's conversion, key sentences routed into every unit (oracle)"}
    head = "| variant | " + " | ".join(f"{v} {L // 1024}k" for v, L in checks) + " |"
    lines = ["# Where the sparse recipe's passkey goes: answer log-probability by lever", "",
             f"Command: `python benchmarks/retrieval_levers.py{' ' + ' '.join(argv) if argv else ''}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s.", "",
             f"Each cell: keys found of {args.trials}, then the answer's log-probability (summed over its tokens, "
             f"mean of the {args.trials} prompts; 0 is certain). SmolLM2-135M-Instruct, the recipe's prompts"
             + (" (its six, then more drawn the same way)." if args.trials > 6 else "."), "",
             head, "|---|" + "---|" * len(checks)]
    for r in rows:
        label = labels.get(r["name"], f"`{r['name']}`")
        cells = [f"{r[f'{v}{L}'][0]} ({r[f'{v}{L}'][1]:.2f})" for v, L in checks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
