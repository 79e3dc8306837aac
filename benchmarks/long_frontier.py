"""The long-context frontier at equal KV bytes: how a windowed head's cache is best spent (recent window against
routed tokens), and how many KV groups stay dense. SmolLM2-135M, no training.

    python benchmarks/long_frontier.py [--context 4096] [--documents 2] [--budget 388]

Every row keeps dense the KV groups of highest retrieval score (a --dense fraction of them, over the whole
model); the other heads cache --budget rows per unit at 8,192 tokens, split between sinks (4), a recent window
w and routed tokens (8,192 / sparsity). w = budget - 4 is DuoAttention's streaming head (no router). Prints the
perplexity of the final 256 tokens of Shakespeare's plays given --context tokens before them, held-out
perplexity, and KV bytes / attention FLOPs at 8,192 tokens against the original. Writes
benchmarks/results/long_frontier.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--documents", type=int, default=2)
    p.add_argument("--budget", type=int, default=388, help="rows per windowed unit at 8,192 tokens")
    p.add_argument("--dense", default="0.15,0.25", help="fractions of KV groups kept dense")
    p.add_argument("--routed", default="0,128,256,384", help="routed tokens per unit at 8,192 (the rest: window)")
    p.add_argument("--out", default="benchmarks/results/long_frontier.md")
    args = p.parse_args()

    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.calibration import collect_stats, default_calibration
    from mosa_retrofit.convert.costs import cost_ratios
    from mosa_retrofit.convert.families import attention_layers
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.retrieval import default_retrieval_prompts, retrieval_scores
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.long_context import context_documents, context_perplexity
    from mosa_retrofit.eval.perplexity import perplexity
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.assets import shakespeare_plays
    from mosa_retrofit.text.protocol import PROTOCOL

    started = time.time()
    original, source = load_any("smollm2-135m")
    tokenizer = load_tokenizer(source)
    calibration = default_calibration(original, tokenizer)
    windows = tuple(args.budget - 4 - int(r) for r in args.routed.split(",") if int(r) > 0)
    stats = collect_stats(original, calibration, {i: m for i, (_, m) in attention_layers(original).items()},
                          sparsities=(), windows=windows)
    retrieval = retrieval_scores(original, default_retrieval_prompts(tokenizer))
    docs = context_documents(tokenizer, shakespeare_plays(), args.context, 256)[: args.documents]
    blocks = PROTOCOL.blocks(tokenizer)
    base_long = context_perplexity(original, docs, [args.context], progress=False)[args.context]
    base_ppl = perplexity(original, blocks)
    rows = [("original", "-", "-", base_ppl, base_long, 1.0, 1.0)]
    print(rows[-1], flush=True)
    for dense in (float(v) for v in args.dense.split(",")):
        for routed in (int(v) for v in args.routed.split(",")):
            window = args.budget - 4 - routed
            if window < 1:
                continue
            fields = dict(head_choice="retrieval", dense_scope="model", dense_heads=dense, local_window=window)
            fields.update(sparse_heads="streaming") if routed == 0 else fields.update(
                sparse_heads="mosa_keys", sparsity=8192 / routed)
            model = load_any("smollm2-135m")[0]
            convert_(model, MoSAConfig(**fields), calibration=calibration, stats=stats, retrieval=retrieval,
                     progress=False)
            cost = cost_ratios(model, 8192)
            long = context_perplexity(model, docs, [args.context], progress=False)[args.context]
            rows.append((f"{dense:.2f}", window, routed, perplexity(model, blocks), long, cost.kv_bytes, cost.flops))
            print(rows[-1], flush=True)
    lines = ["# Long-context frontier: SmolLM2-135M-Instruct, window against routed tokens at equal KV bytes, no "
             "training", "",
             f"Command: `python benchmarks/long_frontier.py --context {args.context} --documents {args.documents} "
             f"--budget {args.budget} --dense {args.dense} --routed {args.routed}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             f"Long: perplexity of the final 256 tokens of {len(docs)} plays given {args.context:,} tokens before "
             f"them. Held-out: {PROTOCOL.describe()}. Windowed units cache {args.budget} rows at 8,192 tokens: 4 "
             "sinks + window + routed tokens (routed 0: the streaming baseline).", "",
             "| dense KV groups | window | routed @8k | held-out ppl | long ppl | × original (long) | KV bytes @8k "
             "| attn FLOPs @8k |", "|---|---|---|---|---|---|---|---|"]
    for dense, window, routed, ppl, long, kv, flops in rows:
        lines.append(f"| {dense} | {window} | {routed} | {ppl:.2f} | {long:.2f} | {long / base_long:.3f} | "
                     f"{kv:.3f}x | {flops:.3f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
