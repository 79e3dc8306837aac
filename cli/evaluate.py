"""``mosa-retrofit eval MODEL --data ...``: perplexity, tokens/s, attention FLOPs and KV cache (bytes, entries);
``--tasks T1,T2``: lm-evaluation-harness tasks instead (``mosa_retrofit.eval.harness``)."""

from __future__ import annotations

import argparse

from mosa_retrofit.text.protocol import PROTOCOL

from .flags import BLOCK, COUNT, LIMIT


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity, tokens/s, attention FLOPs and KV cache of a model (and of its original)",
        description="Measure MODEL (converted or not) on held-out text: perplexity over non-overlapping blocks, "
                    "forward tokens/s, and attention FLOPs and KV cache (bytes a cache holds under GQA, and "
                    "entries per query head as in the paper) relative to the unconverted model. --baseline "
                    "measures the original model beside it (default: the converted model's base). The defaults "
                    f"are the project's evaluation protocol ({PROTOCOL.describe()}), the same as convert's check, "
                    "train's validation and the study.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--data", default=PROTOCOL.data,
                   help="'wikipedia-offline', 'shakespeare-offline', text/jsonl/parquet files or a hub dataset (validation documents)")
    p.add_argument("--data-name", help="hub dataset configuration name")
    p.add_argument("--split", default="train", help="hub split to read")
    p.add_argument("--text-field", default="text")
    p.add_argument("--validation-documents", type=COUNT, default=PROTOCOL.validation_documents,
                   help="evaluate on the last N documents (the held-out split of the training recipes)")
    p.add_argument("--block-size", type=BLOCK, default=None,
                   help=f"tokens per block (default: {PROTOCOL.block_size}, or the model's positions if fewer)")
    p.add_argument("--max-tokens", type=COUNT, default=PROTOCOL.tokens, help="validation tokens used")
    p.add_argument("--batch-size", type=COUNT, default=4)
    p.add_argument("--baseline", nargs="?", const="auto", metavar="BASE",
                   help="also measure BASE (default: the converted model's base_model_name_or_path)")
    p.add_argument("--cost-seq-len", type=COUNT, default=8192, help="T at which FLOPs and the KV cache are counted")
    p.add_argument("--causal", action="store_true",
                   help="switch an expert-choice model to causal routing first (thresholds set on 16 training blocks)")
    h = p.add_argument_group("lm-evaluation-harness (the [eval] extra)")
    h.add_argument("--tasks", metavar="T1,T2",
                   help="run these lm-eval tasks through its Hugging Face wrapper instead of the perplexity "
                        "measurement (--data and the cost flags are then unused); lm-eval's own tasks fetch their "
                        "datasets from the hub")
    h.add_argument("--include-path", metavar="DIR", help="a folder of lm-eval task YAMLs (local tasks)")
    h.add_argument("--limit", type=LIMIT, metavar="N", help="documents per task (a fraction if < 1)")
    p.set_defaults(run=run)


def _measure(model, blocks, batch_size: int) -> tuple[float, float]:
    import math
    import time

    from mosa_retrofit.eval.perplexity import nll

    t0 = time.perf_counter()
    total, count = nll(model, blocks, batch_size, progress=True)
    return math.exp(total / count), blocks.numel() / (time.perf_counter() - t0)


def _run_tasks(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mosa_retrofit.eval import harness

    try:
        harness.require_lm_eval()
    except ImportError as e:  # the CLI's one-line error
        raise ValueError(str(e)) from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks names no task: {args.tasks!r}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path} is not a folder")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit:g}")
    if args.baseline is not None or args.causal:
        raise ValueError("--baseline and --causal do not apply to --tasks; evaluate each model on its own")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = harness.evaluate_tasks(args.model, tasks, include_path=args.include_path, limit=limit,
                                     batch_size=args.batch_size)["results"]
    print(f"lm-eval on {args.model}" + (f" (--limit {args.limit:g})" if limit else "") + "\n")
    print("| task | metric | value |")
    print("|---|---|---|")
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if kind and "_stderr" not in metric and isinstance(value, (int, float)):
                print(f"| {task} | {metric if kind == 'none' else key} | {value:.4f} |")
    return 0


def run(args: argparse.Namespace) -> int:
    from mosa_retrofit.convert.costs import cost_ratios
    from mosa_retrofit.convert.hub import load_tokenizer, read_config
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.text.assets import resolve_model
    from mosa_retrofit.text.data import DataSpec, load_corpus
    from mosa_retrofit.validate import positions_of, within_positions

    for name in ("block_size", "max_tokens", "batch_size", "cost_seq_len", "validation_documents"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tasks is not None:
        return _run_tasks(args)
    if args.include_path is not None or args.limit is not None:
        raise ValueError("--include-path and --limit apply to --tasks only")
    positions = positions_of(read_config(resolve_model(args.model)))
    if args.block_size is None:
        args.block_size = min(PROTOCOL.block_size, positions or PROTOCOL.block_size)
    within_positions("--block-size", args.block_size, positions, args.model)
    if args.max_tokens < args.block_size:
        raise ValueError(f"--max-tokens {args.max_tokens:,} is fewer than one block of --block-size "
                         f"{args.block_size:,}: give --max-tokens >= {args.block_size:,} (or a smaller --block-size)")
    spec = DataSpec(source=args.data, name=args.data_name, split=args.split, text_field=args.text_field,
                    block_size=args.block_size, validation_documents=args.validation_documents,
                    validation_tokens=max(args.max_tokens, args.block_size),
                    max_train_tokens=16 * args.block_size + 1)  # read only for --causal calibration
    model, source = load_any(args.model)
    if args.causal and (getattr(model.config, "mosa", None) or {}).get("routing") == "causal":
        raise ValueError(f"--causal: {args.model} already routes causally (its thresholds were set when it was "
                         "converted or trained); drop --causal to evaluate it as it is")
    base = args.baseline
    if base == "auto":  # before any measurement
        base = (getattr(model.config, "mosa", None) or {}).get("base_model_name_or_path")
        if base is None:
            raise ValueError(f"{args.model} names no base model (it is not a converted model, or an old one); give "
                             "--baseline BASE")
    tokenizer = load_tokenizer(source)
    corpus = load_corpus(spec, tokenizer, progress=False, validation_only=not args.causal)
    blocks = corpus.blocks("validation", args.block_size)
    if args.causal:
        from mosa_retrofit.convert.thresholds import make_causal_

        make_causal_(model, corpus.blocks("train", args.block_size)[:16].long())
    rows = []
    ppl, tps = _measure(model, blocks, args.batch_size)
    rows.append((args.model + (" (causal routing)" if args.causal else ""), ppl, tps, cost_ratios(model, args.cost_seq_len)))
    if base is not None:
        baseline, _ = load_any(base)
        b_ppl, b_tps = _measure(baseline, blocks, args.batch_size)
        rows.append((base, b_ppl, b_tps, cost_ratios(baseline, args.cost_seq_len)))
    print(f"held-out perplexity: {blocks.numel():,} tokens of the last {args.validation_documents} documents of "
          f"{args.data}, in {len(blocks)} blocks of {args.block_size}; FLOPs and KV cache at T = {args.cost_seq_len} "
          "relative to the unconverted model (KV bytes: what a cache holds; KV entries: per query head)\n")
    print("| model | perplexity | tokens/s (forward) | attention FLOPs × | KV bytes × | KV entries × |")
    print("|---|---|---|---|---|---|")
    for name, p, t, r in rows:
        print(f"| {name} | {p:.2f} | {t:,.0f} | {r.flops:.3f} | {r.kv_bytes:.3f} | {r.kv:.3f} |")
    if len(rows) == 2:
        print(f"\nperplexity ratio {rows[0][1] / rows[1][1]:.3f}, speed ratio {rows[0][2] / rows[1][2]:.2f}")
    return 0
