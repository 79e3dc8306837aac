"""``mosa-retrofit long MODEL``: passkey retrieval and perplexity against context, or the RULER-style suite
(``--suite ruler``), beside the original model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import HelpFormatter
from .convert import check_writable_parent
from .flags import COUNT, COUNTS, FRACTIONS, NONNEGATIVE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "long", help="long-context evaluation: passkey retrieval (lengths x depths) and perplexity against context",
        description="Measure MODEL and the original model beside it (--baseline; default: the converted model's "
                    "base) on long contexts: passkey retrieval (a 5-digit key hidden in filler at each depth of "
                    "each length, scored exactly by teacher forcing; --variant multi hides several keys and asks "
                    "for one) and perplexity of the same final --score-tokens of long documents (Shakespeare's "
                    "plays, embedded) given each --contexts amount of text before them. Prints both tables and "
                    "draws OUT/long_context.png (heat maps and curves). --suite ruler runs RULER's synthetic tasks "
                    "instead (needles with number / word / UUID values, multi-key, multi-value, multi-query, "
                    "variable tracking, common and frequent words; built from a seed on embedded Wikipedia text), "
                    "each answered by greedy generation through the model's KV cache and scored as RULER does "
                    "(the answer contains every expected string); the worst task's ratio is printed first.",
        formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--baseline", default="auto", help="the model to measure beside MODEL ('auto': its base; 'none')")
    p.add_argument("--lengths", type=COUNTS, default=[1024, 2048, 4096, 8192],
                   help="passkey prompt lengths in tokens (those beyond the model's positions are dropped)")
    p.add_argument("--depths", type=FRACTIONS, default=[0.1, 0.5, 0.9], help="depths of the key")
    p.add_argument("--trials", type=COUNT, default=2, help="keys per (length, depth)")
    p.add_argument("--variant", choices=("single", "multi"), default="single")
    p.add_argument("--suite", choices=("passkey", "ruler"), default="passkey",
                   help="passkey + perplexity against context, or the RULER-style tasks (--lengths, --trials "
                        "prompts per task and length)")
    p.add_argument("--tasks", type=_tasks, default=None,
                   help="with --suite ruler: comma-separated tasks (default: all of " + ", ".join(_task_names()) + ")")
    p.add_argument("--contexts", type=COUNTS, default=[512, 1024, 2048, 4096, 7936],
                   help="tokens of context before the scored tokens (with --score-tokens at most the model's "
                        "positions; longer ones are dropped)")
    p.add_argument("--score-tokens", type=COUNT, default=256, help="final tokens scored in each document")
    p.add_argument("--documents", type=COUNT, default=4, help="long documents scored")
    p.add_argument("--prefill", type=NONNEGATIVE, default=None,
                   help="tokens of the prefill whose KV-cache bytes and time are measured (default: the longest "
                        "--lengths; 0: skip)")
    p.add_argument("--prefill-chunk", type=COUNT, default=None,
                   help="read every prompt, document and --prefill this many tokens at a time through the KV cache "
                        "(the same scores without one forward over the whole length: what 32k tokens need on a "
                        "small machine; default: one forward)")
    p.add_argument("--out", default="out/long", help="folder for long_context.png")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.eval.long_context import context_documents, context_perplexity, passkey_grid, prefill_footprint
    from mosa_retrofit.eval.plots import plot_long_context
    from mosa_retrofit.text.assets import shakespeare_plays

    _check(args)
    model, source = load_any(args.model)
    base = args.baseline
    if base == "auto":
        base = (getattr(model.config, "mosa", None) or {}).get("base_model_name_or_path")
    models = {}
    if base and base != "none":  # the original first: the footprint ratios are against it
        models[base] = load_any(base)[0]
    models[args.model] = model
    tokenizer = load_tokenizer(source)
    if args.suite == "ruler":
        return _run_ruler(args, models, tokenizer, _ruler_lengths(args, model))
    lengths, contexts = _within_positions(args, model)
    docs = context_documents(tokenizer, shakespeare_plays(), max(contexts), args.score_tokens)[: args.documents]
    if not docs:
        raise ValueError(f"no document has {max(contexts) + args.score_tokens} tokens; lower --contexts")
    grids, curves, footprints = {}, {}, {}
    prefill = max(lengths) if args.prefill is None else args.prefill
    for name, m in models.items():
        grids[name] = passkey_grid(m, tokenizer, lengths, args.depths, args.trials, args.variant,
                                   chunk=args.prefill_chunk)
        curves[name] = context_perplexity(m, docs, contexts, args.score_tokens, chunk=args.prefill_chunk)
        if prefill:
            footprints[name] = prefill_footprint(m, prefill, chunk=args.prefill_chunk)
    _print_tables(args, lengths, contexts, len(docs), grids, curves, footprints, prefill)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_long_context(grids, curves, out / "long_context.png")
    print(f"\nwrote {out / 'long_context.png'}")
    return 0


def _task_names() -> tuple[str, ...]:
    from mosa_retrofit.text.ruler import TASKS

    return TASKS


def _tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in _task_names()]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or text!r}; choose from {', '.join(_task_names())}")
    return names


def _ruler_lengths(args: argparse.Namespace, model) -> list[int]:
    """The --lengths the model's positions hold (said when some are dropped)."""
    from mosa_retrofit.validate import positions_of

    limit = positions_of(model.config)
    lengths = [L for L in args.lengths if not limit or L <= limit]
    if not lengths:
        raise ValueError(f"the model has {limit} positions: give --lengths <= {limit}")
    if lengths != list(args.lengths):
        print(f"the model has {limit} positions: RULER lengths {lengths}")
    return lengths


def _run_ruler(args: argparse.Namespace, models: dict, tokenizer, lengths: list[int]) -> int:
    from mosa_retrofit.eval.long_context import prefill_footprint
    from mosa_retrofit.eval.ruler import SOLVED, greedy_answerer, ruler_prompts, run_ruler, task_ratios
    from mosa_retrofit.text.assets import wikipedia_articles

    tasks = args.tasks or list(_task_names())
    prompts = ruler_prompts(tokenizer, wikipedia_articles(), tasks, lengths, args.trials)
    scores = run_ruler({name: greedy_answerer(m, tokenizer, args.prefill_chunk) for name, m in models.items()},
                       prompts)
    prefill = max(lengths) if args.prefill is None else args.prefill
    footprints = ({name: prefill_footprint(m, prefill, chunk=args.prefill_chunk) for name, m in models.items()}
                  if prefill else {})
    names = list(models)
    if len(names) == 2:
        worst = task_ratios(scores[names[0]], scores[names[1]])
        scored = [r for r in worst if r.ratio is not None]
        if scored:
            r = scored[0]
            print(f"\nworst task: {r.task} at {r.ratio:.2f}x the original's score ({r.converted:.2f} against "
                  f"{r.original:.2f}, mean over lengths {', '.join(map(str, lengths))})")
        unsolved = [r.task for r in worst if r.ratio is None]
        if unsolved:
            print(f"the original does not solve (mean score under {SOLVED}, no ratio): {', '.join(unsolved)}")
    print(f"\nRULER-style tasks, mean score over {args.trials} prompts per cell (string_match_all"
          + (f"; each cell: {' · '.join(names)}" if len(names) > 1 else "") + "):\n")
    print("| task | " + " | ".join(str(L) for L in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for t in tasks:
        print(f"| {t} | " + " | ".join(" · ".join(f"{scores[n][t, L]:.2f}" for n in names) for L in lengths) + " |")
    _print_footprints(footprints, prefill)
    return 0


def _print_footprints(footprints: dict, prefill: int) -> None:
    if footprints:
        first_bytes, first_time = next(iter(footprints.values()))
        print(f"\nKV cache held after one {prefill}-token prefill, and its time (ratios against the first row):\n")
        print("| model | KV cache | prefill time |\n|---|---|---|")
        for name, (held, seconds) in footprints.items():
            print(f"| {name} | {held / 2**20:.1f} MiB ({held / max(first_bytes, 1):.3f}x) | "
                  f"{seconds / first_time:.2f}x |")


def _check(args: argparse.Namespace) -> None:
    """Every flag checked before any model is read."""
    from mosa_retrofit.convert.hub import read_config
    from mosa_retrofit.text.assets import resolve_model
    from mosa_retrofit.validate import positions_of, within_positions

    for name in ("trials", "score_tokens", "documents"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for long_context.png")
    check_writable_parent(Path(args.out), "--out")
    if args.prefill is not None:
        if args.prefill < 0:
            raise ValueError(f"--prefill must be >= 0 tokens (0 skips it), got {args.prefill}")
        within_positions("--prefill", args.prefill,
                         positions_of(read_config(resolve_model(args.model))), args.model)


def _within_positions(args: argparse.Namespace, model) -> tuple[list[int], list[int]]:
    """The passkey lengths and contexts the model's positions hold (said when some are dropped)."""
    from mosa_retrofit.validate import positions_of

    lengths, contexts, limit = list(args.lengths), list(args.contexts), positions_of(model.config)
    if limit:
        lengths = [L for L in args.lengths if L <= limit]
        contexts = [L for L in args.contexts if L + args.score_tokens <= limit]
        if not lengths or not contexts:
            raise ValueError(f"the model has {limit} positions: give --lengths <= {limit} and --contexts <= "
                             f"{limit - args.score_tokens}")
        if lengths != list(args.lengths) or contexts != list(args.contexts):
            print(f"the model has {limit} positions: passkey lengths {lengths}, contexts {contexts}")
    return lengths, contexts


def _print_tables(args, lengths, contexts, documents, grids, curves, footprints, prefill) -> None:
    print(f"\npasskey ({args.variant}) accuracy over {args.trials} keys per cell, averaged over depths "
          f"{', '.join(f'{d:.0%}' for d in args.depths)}:\n")
    print("| model | " + " | ".join(str(L) for L in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, grid in grids.items():
        cells = [sum(grid[(L, d)] for d in args.depths) / len(args.depths) for L in lengths]
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    print(f"\nperplexity of the final {args.score_tokens} tokens of {documents} plays given L tokens before them:\n")
    print("| model | " + " | ".join(f"L = {L}" for L in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{curve[L]:.2f}" for L in contexts) + " |")
    _print_footprints(footprints, prefill)
