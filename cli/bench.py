"""``mosa-retrofit bench attention``: time MoSA layers against dense attention (ratios, FLOPs, memory)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .convert import DTYPES, check_writable_parent, checked_device
from .flags import COUNT, COUNTS, NONNEGATIVE, SPARSITIES, SPARSITY, THREADS

WHAT = ("model", "keys", "attention", "generate")  # the bench subcommands


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed of a converted model beside its original; kernel benchmarks",
                       description="Benchmarks; every figure is a ratio against the original model or dense "
                                   "attention, measured in the same run. `mosa-retrofit bench MODEL` is short for "
                                   "`mosa-retrofit bench model MODEL`.")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for add in (_add_model, _add_attention, _add_keys, _add_generate):
        add(bsub)


def _add_model(bsub) -> None:
    m = bsub.add_parser(
        "model", help="a converted model against its original: prefill, decode, training step, memory",
        description="Times MODEL (a converted model) and its original in the same run: prefill at every --contexts "
                    "length, greedy decoding after each of them at every --batch size, one training step "
                    "(forward + backward) at --train-length, and the peak memory of the longest prefill. Each "
                    "ratio is printed beside the FLOP or byte ratio that bounds it (the limit), with the machine "
                    "and thread count in the header. Text: the embedded Wikipedia articles, repeated as needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("model", metavar="MODEL_OR_DIR", help="a converted model folder (or hub id)")
    m.add_argument("--baseline", help="the original model (default: the converted model's base)")
    m.add_argument("--contexts", type=COUNTS, default=(2048, 4096, 8192),
                   help="prefill lengths, and the contexts decoding is timed after (within the model's positions: "
                        "where a context + --decode-tokens would pass them, decoding is timed after fewer tokens)")
    m.add_argument("--batch", type=COUNTS, default=(1, 8), help="decode batch sizes")
    m.add_argument("--decode-tokens", type=COUNT, default=16, help="decode steps timed per measurement")
    m.add_argument("--train-length", type=NONNEGATIVE, default=2048, help="tokens of the timed training step (0: none)")
    m.add_argument("--reps", type=COUNT, default=3, help="prefill and training repetitions (the minimum is kept)")
    m.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads")
    m.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    m.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    m.add_argument("--attn-backend", choices=("auto", "flash", "flex", "math"), default=None,
                   help="kernel of the windowed heads (default: the one the model was saved with)")
    m.add_argument("--prefill-chunk", type=COUNT, default=None,
                   help="every prefill reads this many tokens per forward through the KV cache (what generate's "
                        "prefill_chunk_size does for a long prompt; default: one forward)")
    m.add_argument("--output", help="also write the Markdown table to this file")
    m.set_defaults(run=_checked(run_model))


def _add_attention(bsub) -> None:
    a = bsub.add_parser(
        "attention",
        help="one attention layer: all-MoSA and hybrid against dense causal SDPA",
        description=(
            "Times forward and forward+backward of a layer of MoSA heads and of a hybrid layer (some dense "
            "heads kept) against a dense causal multi-head layer of the same width and head count, and "
            "prints each time ratio beside its FLOP ratio and the peak memory. Pins torch to --threads."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--seq-lens", type=COUNTS, default=None,
                   help="comma-separated T values (default 1024,4096,8192; with --quick 256,512)")
    a.add_argument("--sparsities", type=SPARSITIES, default=(4.0, 8.0, 16.0), help="comma-separated sparsities")
    a.add_argument("--width", type=COUNT, default=1024, help="model width h")
    a.add_argument("--heads", type=COUNT, default=16, help="heads in every layer")
    a.add_argument("--head-dim", type=COUNT, default=64, help="per-head width h'")
    a.add_argument("--hybrid-dense-heads", type=NONNEGATIVE, default=4, help="dense heads kept in the hybrid layer")
    a.add_argument("--batch", type=COUNT, default=1)
    a.add_argument("--reps", type=COUNT, default=3, help="timed repetitions of the dense layer (MoSA: 2x+1)")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    a.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    a.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (1 gives stable ratios)")
    a.add_argument("--quick", action="store_true", help="smoke run in seconds: width 256, 4 heads, 1 rep")
    a.add_argument("--profile", action="store_true", help="also print where an all-MoSA step spends its time")
    a.add_argument("--output", help="also write the Markdown table to this file")
    a.set_defaults(run=_checked(run_attention))


def _add_keys(bsub) -> None:
    k = bsub.add_parser(
        "keys", help="the key-selection attention op, per backend, against fused dense causal SDPA",
        description="Times the key-selection op of windowed MoSA heads (window + sinks + routed keys, GQA units) "
                    "against dense causal SDPA with the same Q/K/V, forward and forward+backward, per backend, and "
                    "prints each time ratio beside the FLOP ratio (the op's pairs over the causal half).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("--seq-lens", type=COUNTS, default=(2048, 8192), help="comma-separated T values")
    k.add_argument("--backends", default="flash,flex,math", help="comma-separated: flash, flex, math")
    k.add_argument("--heads", type=COUNT, default=9, help="query heads")
    k.add_argument("--kv-heads", type=COUNT, default=3, help="key/value heads (units)")
    k.add_argument("--head-dim", type=COUNT, default=64)
    k.add_argument("--window", type=COUNT, default=256)
    k.add_argument("--sparsity", type=SPARSITY, default=64, help="1 routed key in this many tokens")
    k.add_argument("--reps", type=COUNT, default=3)
    k.add_argument("--no-backward", action="store_true", help="forward only")
    k.add_argument("--threads", type=THREADS, default=1)
    k.add_argument("--device", default="cpu")
    k.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    k.add_argument("--output", help="also write the Markdown table to this file")
    k.set_defaults(run=_checked(run_keys))


def _add_generate(bsub) -> None:
    g = bsub.add_parser(
        "generate", help="a converted causal-routing model against its original: KV-cache bytes and decode speed",
        description="Prefill the same text into MODEL (converted, routing='causal') and into its original, measure "
                    "the KV cache each holds at every --contexts length, and time greedy decoding one token at a "
                    "time after --decode-context tokens. Prints ratios against the original. Text: the embedded "
                    "Wikipedia articles, repeated as needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("model", metavar="MODEL_OR_DIR", help="a converted model with routing='causal'")
    g.add_argument("--baseline", help="the original model (default: the converted model's base)")
    g.add_argument("--contexts", type=COUNTS, default=(2048, 8192), help="prefill lengths for KV bytes")
    g.add_argument("--decode-context", type=COUNT, default=4096, help="context length at which decoding is timed")
    g.add_argument("--decode-tokens", type=COUNT, default=32, help="decode steps timed")
    g.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (1 gives stable ratios)")
    g.add_argument("--output", help="also write the Markdown table to this file")
    g.set_defaults(run=_checked(run_generate))


def run_attention(args: argparse.Namespace) -> int:
    from mosa_retrofit.bench.attention import bench_attention, format_table, profile_mosa

    if args.hybrid_dense_heads >= args.heads or args.hybrid_dense_heads < 0:
        raise ValueError(f"--hybrid-dense-heads must be in [0, --heads - 1 = {args.heads - 1}], got {args.hybrid_dense_heads}")
    if args.width < 1 or args.heads < 1 or args.head_dim < 1 or args.batch < 1 or args.reps < 1:
        raise ValueError("--width, --heads, --head-dim, --batch and --reps must be >= 1")
    if args.quick:
        args.seq_lens = args.seq_lens or (256, 512)
        args.width, args.heads, args.head_dim, args.reps = 256, 4, 64, 1
        args.hybrid_dense_heads = min(args.hybrid_dense_heads, 1)
    args.seq_lens = args.seq_lens or (1024, 4096, 8192)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    rows = bench_attention(args.seq_lens, args.sparsities, args.width, args.heads, args.head_dim,
                           args.hybrid_dense_heads, args.batch, args.reps, dtype, args.device)
    cpu = _cpu_name()
    header = (f"MoSA attention layer vs dense causal SDPA: h={args.width}, {args.heads} heads of {args.head_dim}, "
              f"hybrid keeps {args.hybrid_dense_heads} dense, batch {args.batch}, {args.dtype}, "
              f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}{cpu}")
    _emit(header, format_table(rows), args.output)
    if args.profile:
        T = max(args.seq_lens)
        print(f"\nProfile of one all-MoSA forward+backward, T={T}, sparsity {args.sparsities[0]:g}:")
        print(profile_mosa(T, args.sparsities[0], args.width, args.heads, args.head_dim, args.device))
    return 0


def run_keys(args: argparse.Namespace) -> int:
    from mosa_retrofit.bench.keys import bench_keys, format_keys

    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in ("flash", "flex", "math")]
    if bad:
        raise ValueError(f"--backends: unknown {bad}; valid: flash, flex, math")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    device = checked_device(args.device)
    torch.set_num_threads(args.threads)
    rows = bench_keys(args.seq_lens, backends, args.heads, args.kv_heads, args.head_dim, args.window, args.sparsity,
                      reps=args.reps, backward=not args.no_backward, device=str(device), dtype=DTYPES[args.dtype])
    header = (f"Key-selection op vs dense causal SDPA: {args.heads} query heads in {args.kv_heads} KV groups of "
              f"{args.head_dim}, window {args.window} + 4 sinks + 1/{args.sparsity:g} routed, {args.dtype}, device "
              f"{device}, torch {torch.__version__}, {args.threads} thread(s){_cpu_name()}; medians of {args.reps}")
    _emit(header, format_keys(rows), args.output)
    return 0


def run_model(args: argparse.Namespace) -> int:
    from mosa_retrofit.bench.model import bench_model, format_rows
    from mosa_retrofit.convert.adapter import base_mismatch
    from mosa_retrofit.convert.attention import set_attn_backend
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.text.assets import wikipedia_articles
    from mosa_retrofit.text.data import token_stream
    from mosa_retrofit.validate import positions_of, within_positions

    if args.decode_tokens < 1 or args.threads < 1 or args.reps < 1 or args.train_length < 0:
        raise ValueError("--decode-tokens, --threads and --reps must be >= 1, --train-length >= 0")
    device = checked_device(args.device)
    model, source = load_any(args.model)
    mosa = getattr(model.config, "mosa", None) or {}
    if not mosa:
        raise ValueError(f"{args.model} is not a converted model (its config has no mosa block)")
    base = args.baseline or mosa.get("base_model_name_or_path")
    if base is None:
        raise ValueError(f"{args.model} names no base model; give --baseline")
    positions = positions_of(model.config)  # learned and rotary positions alike: nothing runs past them
    within_positions("--contexts", max(args.contexts), positions, args.model)
    within_positions("--train-length", args.train_length, positions, args.model)
    if positions is not None and args.decode_tokens + 1 >= positions:  # + 1: the untimed first step
        raise ValueError(f"--decode-tokens {args.decode_tokens:,} leaves no context within the {positions:,} "
                         f"positions of {args.model}; give --decode-tokens < {positions - 1:,}")
    longest = max(max(args.contexts), args.train_length)
    original, _ = load_any(base)
    why = base_mismatch(model, original)
    if why is not None:
        raise ValueError(f"--baseline {base} is not {args.model}'s original: {why}; give the model it was converted "
                         "from (or leave --baseline out)")
    dtype = DTYPES[args.dtype]
    model, original = model.to(device, dtype), original.to(device, dtype)
    if args.attn_backend:
        set_attn_backend(model, args.attn_backend)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(source)
    need = longest + 1
    ids = token_stream(tokenizer, wikipedia_articles(), need).long()
    while ids.numel() < need:
        ids = torch.cat([ids, ids])
    rows = bench_model(model, original, ids[None, :need].to(device), list(args.contexts), list(args.batch),
                       args.decode_tokens, args.train_length or None, args.reps, positions=positions,
                       chunk=args.prefill_chunk)
    header = (f"Speed: {args.model} (converted) vs {base} (original); {args.dtype}, device {device}, torch "
              f"{torch.__version__}, {args.threads} thread(s){_cpu_name()}. Times are the minimum of {args.reps} "
              f"runs; decode over {args.decode_tokens} greedy steps"
              f"{f'; prefills read {args.prefill_chunk:,} tokens per forward' if args.prefill_chunk else ''}. Limit: the original's FLOPs (prefill, training) "
              f"or bytes read per step (decode) over the converted model's.")
    _emit(header, format_rows(rows), args.output)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from mosa_retrofit.bench.generate import bench_generate, format_rows
    from mosa_retrofit.convert.attention import decode_refusal
    from mosa_retrofit.convert.hub import load_tokenizer, read_config
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.text.assets import resolve_model
    from mosa_retrofit.text.data import token_stream
    from mosa_retrofit.validate import positions_of, within_positions

    if args.decode_context < 2 or args.decode_tokens < 1 or args.threads < 1:
        raise ValueError("--decode-context must be >= 2, --decode-tokens and --threads >= 1")
    positions = positions_of(read_config(resolve_model(args.model)))
    within_positions("--decode-context + --decode-tokens", args.decode_context + args.decode_tokens, positions,
                     args.model)
    within_positions("--contexts", max(args.contexts), positions, args.model)
    model, source = load_any(args.model)
    mosa = getattr(model.config, "mosa", None) or {}
    why = decode_refusal(model) if mosa else "it is not a converted model"
    if why is not None:
        raise ValueError(f"{args.model} cannot decode with a cache: {why}")
    base = args.baseline or mosa.get("base_model_name_or_path")
    if base is None:
        raise ValueError(f"{args.model} names no base model; give --baseline")
    original, _ = load_any(base)
    torch.set_num_threads(args.threads)
    from mosa_retrofit.text.assets import wikipedia_articles

    tokenizer = load_tokenizer(source)
    need = max(max(args.contexts), args.decode_context) + 1
    ids = token_stream(tokenizer, wikipedia_articles(), need).long()
    while ids.numel() < need:
        ids = torch.cat([ids, ids])
    rows = bench_generate(model, original, ids[None, :need], list(args.contexts), args.decode_context,
                          args.decode_tokens)
    header = (f"Decoding: {args.model} (MoSA, causal routing) vs {base}; greedy, batch 1, "
              f"{next(model.parameters()).dtype}, torch {torch.__version__}, {args.threads} thread(s){_cpu_name()}")
    _emit(header, format_rows(rows), args.output)
    return 0


def _checked(run):
    """``run`` after the checks every bench command shares, made before anything is loaded or timed: --threads,
    --device and --output (a file that can be written, not a folder)."""
    def checked(args: argparse.Namespace) -> int:
        if getattr(args, "threads", 1) < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if getattr(args, "device", None):
            checked_device(args.device)
        if getattr(args, "output", None):
            out = Path(args.output)
            if out.is_dir():
                raise ValueError(f"--output {out} is a folder; give a file name such as {out / 'bench.md'}")
            check_writable_parent(out, "--output")
        return run(args)

    return checked


def _emit(header: str, table: str, output: str | None) -> None:
    """Print the header and table; also write them to ``output`` when given."""
    print(header + "\n\n" + table)
    if output:
        from mosa_retrofit.atomic import write_atomic

        write_atomic(output, header + "\n\n" + table + "\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f" ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return ""
