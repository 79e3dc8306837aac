"""Where each embedded model's retrieval lives, and which KV groups the default conversion keeps dense for it.

    python benchmarks/retrieval_shares.py [--models smollm2-135m,gemma3-270m] [--top 6]

For every layer the default conversion would convert, the retrieval score of each KV group (the attention mass
from the answer onto the asked key, summed over the group's query heads and over the 16 default multi-key
prompts of 1,024 tokens, ``convert.retrieval``), as a share of all those groups' scores; then which groups the
default keeps dense and why: by the count (``dense_heads``, a quarter of the groups, the highest scores) or by the
share rule (``dense_share``: a group that alone carries that much of the score stays dense). Writes
benchmarks/results/retrieval_shares.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def shares(name: str, top: int) -> tuple[list[str], list[list[str]]]:
    """(summary lines, table rows) of one embedded model."""
    from mosa_retrofit import MoSAConfig
    from mosa_retrofit.convert.families import attention_layers, family_of
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.retrieval import default_retrieval_prompts, retrieval_scores
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.convert.surgery import Evidence, plan_layers
    from mosa_retrofit.validate import positions_of

    model, source = load_any(name)
    model.eval()
    family, config = family_of(model), MoSAConfig()
    layers = {i: m for i, (_, m) in attention_layers(model, family).items()
              if config.converts_layer(i, family.sliding_window(m))}
    prompts = default_retrieval_prompts(load_tokenizer(source), length=min(1024, positions_of(model.config) or 1024))
    scores = retrieval_scores(model, prompts, list(layers), progress=False)  # {layer: (H,)}
    plans = plan_layers(model, config, Evidence(retrieval=scores))
    dims = {i: family.dims(m)[:2] for i, m in layers.items()}  # {layer: (H, KV)}
    dense = lambda i, heads: i not in plans or set(heads) <= set(plans[i].dense)  # noqa: E731
    units = []  # (score, layer, group, its query heads)
    for i, (H, KV) in dims.items():
        G = H // KV
        for g, v in enumerate(scores[i].float().view(KV, G).sum(1).tolist()):
            units.append((v, i, g, range(g * G, (g + 1) * G)))
    units.sort(key=lambda u: -u[0])
    total = sum(max(u[0], 0.0) for u in units)
    counted = round(sum(config.dense_count(i, H) / (H // KV) for i, (H, KV) in dims.items()))
    rows = []
    for rank, (v, i, g, heads) in enumerate(units[:top], 1):
        why = "-" if not dense(i, heads) else "count" if rank <= counted else f"share >= {config.dense_share:g}"
        rows.append([name, str(rank), str(i), str(g), f"{v:.2f}", f"{v / total:.3f}", why])
    kept = sum(dense(i, heads) for _, i, _, heads in units)
    where = f" ({', '.join(map(str, layers))})" if len(layers) <= 6 else ""
    summary = [f"{name}: {len(units)} KV groups in {len(layers)} converted layers{where}; total score {total:.2f}; "
               f"the count keeps {counted}, the default keeps {kept} dense."]
    return summary, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="embedded models, comma-separated")
    p.add_argument("--top", type=int, default=6, help="groups listed per model, highest score first")
    p.add_argument("--out", default="benchmarks/results/retrieval_shares.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    from mosa_retrofit.study import machine

    started = time.time()
    summaries, rows = [], []
    for name in [m for m in args.models.split(",") if m]:
        s, r = shares(name, args.top)
        summaries += s
        rows += r
    lines = ["# Where retrieval lives: each model's KV groups by retrieval score, and what the default keeps dense", "",
             f"Command: `{' '.join(['python benchmarks/retrieval_shares.py', *argv])}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             "Score: the attention mass from the answer onto the asked key, summed over a KV group's query heads and "
             "the 16 default multi-key prompts of 1,024 tokens; share: of all the converted layers' groups. Dense: "
             "why the default conversion keeps the group dense (the count, or the share rule), '-' if it does not.",
             "", *[f"* {s}" for s in summaries], "",
             "| model | rank | layer | KV group | score | share | dense |", "|---|---|---|---|---|---|---|",
             *["| " + " | ".join(r) + " |" for r in rows]]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
