"""Long context at equal KV bytes: an embedded model (SmolLM2-135M by default) and its conversions, no training,
all in one run.

    python benchmarks/long_context.py [--lengths 2048,4096,8192] [--trials 2] [--documents 2]
    python benchmarks/long_context.py --model gemma3-270m --converted out/gemma-default --at 32768 \
        --lengths 4096,8192,16384,32768 --contexts 2048,8192,16384,32512 --prefill-chunk 4096 --held --no-time

Measures the original model and each conversion below (all keep the same dense KV groups, chosen by retrieval
score over the whole model, so only the other heads differ) on:
  * passkey retrieval (multi-key variant: four named keys, one asked) at each length x depth, teacher forced;
  * perplexity of the final 256 tokens of Shakespeare's plays given L tokens before them (L up to 7,936: with
    the scored tokens, the model's 8,192 positions);
  * KV-cache bytes and attention FLOPs at --at tokens (8,192) against the original (cost model), the time of one
    --at-token forward against the original's (measured in this run; --no-time skips it) and, with --held, the
    KV bytes each model's cache holds after an --at-token prefill (measured).
--converted DIR measures a saved conversion instead of converting here (the original and that one only; --label
names it); --earlier FILE copies the rows of an earlier results file of the same grid (the same prompts and plays)
into the table instead of measuring those models again (the original's KV held there gives the new ratio);
--prefill-chunk reads every input that many tokens at a time through the KV cache (the same scores; what 32k
tokens need on a small machine).
Writes benchmarks/results/long_context.md (long_context_<model>.md for another --model) and a plot.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

# name -> MoSAConfig fields ({} is the library default; None is the original model). Equal KV bytes at 8,192
# tokens: streaming window 384 + 4 sinks = mosa_keys window 128 + 4 sinks + 8192/32 routed tokens.
RETRIEVAL = dict(head_choice="retrieval", dense_scope="model", dense_heads=0.25)
V2 = dict(sparsity=8, dense_heads=3, head_choice="scored", dense_scope="layer", sparse_heads="mosa")
MODELS = {
    "original": None,
    "default conversion: MoSA key selection, window 256 + 1/64 routed": {},
    "streaming baseline (DuoAttention-style), window 384": dict(**RETRIEVAL, sparse_heads="streaming",
                                                                 local_window=384),
    "sliding-window baseline, window 388": dict(**RETRIEVAL, sparse_heads="local", local_window=388),
    "MoSA, the paper's head form (previous default: 3 dense heads per layer, sparsity 8)": V2,
    "pruning baseline (the other heads removed, their mean output kept)": dict(**RETRIEVAL, sparse_heads="pruned",
                                                                              fill="mean"),
}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def earlier_rows(path: Path, header: str) -> tuple[list[str], list[str], dict | None]:
    """The table rows and configuration lines of an earlier results file whose table has ``header`` (the same
    grid), and the original's KV held there (as ``{"held": bytes}``, the base of the new rows' ratio)."""
    if not path.is_file():
        raise SystemExit(f"--earlier {path}: no such file")
    lines = path.read_text().splitlines()
    if header not in lines:
        raise SystemExit(f"--earlier {path} did not measure this grid; its table should start\n{header}")
    rows = list(itertools.takewhile(lambda line: line.startswith("| "), lines[lines.index(header) + 2:]))
    configs = [line for line in lines if line.startswith("- ") and "`" in line]
    original = next((r for r in rows if r.split("|")[1].strip() == "original"), None)
    held = re.search(r"\| ([\d.]+) MiB \(1\.000x\)", original or "")
    return rows, configs, {"held": float(held.group(1)) * 2**20} if held else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", type=ints, default=[2048, 4096, 8192], help="passkey prompt lengths")
    p.add_argument("--depths", default="0.25,0.75", help="depths of the asked key")
    p.add_argument("--variant", default="single", choices=("single", "multi"), help="passkey variant")
    p.add_argument("--trials", type=int, default=4, help="keys per (length, depth)")
    p.add_argument("--contexts", type=ints, default=[512, 1024, 2048, 4096, 7936])
    p.add_argument("--documents", type=int, default=1, help="plays scored")
    p.add_argument("--models", default="", help="comma-separated indices into the model list (default: all)")
    p.add_argument("--model", default="smollm2-135m", help="the original model (an embedded name or a folder)")
    p.add_argument("--converted", default="", help="a saved conversion to measure (default: convert MODELS here)")
    p.add_argument("--label", default="default conversion", help="the name of --converted in the table")
    p.add_argument("--earlier", default="",
                   help="an earlier results file of the same grid whose rows (the original's among them) are copied "
                        "instead of measured again (needs --converted and --no-time)")
    p.add_argument("--at", type=int, default=8192, help="tokens of the cost model, the timed forward and --held")
    p.add_argument("--prefill-chunk", type=int, default=None, help="read inputs this many tokens at a time")
    p.add_argument("--held", action="store_true", help="measure the KV bytes held after an --at-token prefill")
    p.add_argument("--no-time", action="store_true", help="skip the timed forward (when not measuring alone)")
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="")
    args = p.parse_args()
    slug = "" if args.model == "smollm2-135m" else "_" + Path(args.model).name
    args.out = args.out or f"benchmarks/results/long_context{slug}.md"
    args.plot = args.plot or f"docs/results/long_context{slug or '_frontier'}.png"
    depths = [float(d) for d in args.depths.split(",")]
    if args.earlier and not (args.converted and args.no_time):
        p.error("--earlier copies an earlier run's rows beside one measured --converted model, untimed: add "
                "--converted DIR and --no-time")
    at = f"{args.at // 1024}k" if args.at % 1024 == 0 else str(args.at)
    head = [f"KV bytes @{at}", f"attn FLOPs @{at}"] + ([] if args.no_time else [f"{at} forward time"])
    head += [f"KV held @{at}"] if args.held else []
    header = ("| model | " + " | ".join(head) + " | held-out ppl | " + " | ".join(f"passkey @{L}" for L in args.lengths)
              + " | " + " | ".join(f"ppl, L={L}" for L in args.contexts) + " |")
    copied, copied_configs, earlier_base = earlier_rows(Path(args.earlier), header) if args.earlier else ([], [], None)

    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.calibration import collect_stats, default_calibration
    from mosa_retrofit.convert.costs import cost_ratios
    from mosa_retrofit.convert.families import attention_layers
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.retrieval import default_retrieval_prompts, retrieval_scores
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.convert.compat import prefill
    from mosa_retrofit.eval.long_context import context_documents, context_perplexity, passkey_grid, prefill_footprint
    from mosa_retrofit.eval.perplexity import perplexity
    from mosa_retrofit.eval.plots import plot_long_context
    from mosa_retrofit.study import machine
    from mosa_retrofit.text.assets import EMBEDDED, shakespeare_plays
    from mosa_retrofit.text.protocol import PROTOCOL

    started = time.time()
    original, source = load_any(args.model)
    tokenizer = load_tokenizer(source)
    title = EMBEDDED[args.model].hub_id.split("/")[-1] if args.model in EMBEDDED else args.model
    chosen = list(MODELS.items())
    if args.models:
        chosen = [chosen[int(i)] for i in args.models.split(",")]
    if args.converted:
        chosen = [(f"{args.label} ({args.converted})", load_any(args.converted)[0])]
    elif any(f is not None for _, f in chosen):
        calibration = default_calibration(original, tokenizer)
        layers = attention_layers(original)
        windows = tuple({MoSAConfig(**f).local_window for f in MODELS.values()
                         if f is not None and MoSAConfig(**f).sparse_heads == "mosa_keys"})
        stats = collect_stats(original, calibration, {i: m for i, (_, m) in layers.items()}, sparsities=(8,),
                              fills=("mean",), windows=windows)
        retrieval = retrieval_scores(original, default_retrieval_prompts(tokenizer))
    if chosen[0][1] is not None and not args.earlier:
        chosen.insert(0, ("original", None))
    docs = context_documents(tokenizer, shakespeare_plays(), max(args.contexts), 256)[: args.documents]
    blocks = PROTOCOL.blocks(tokenizer)
    probe = torch.randint(0, 1000, (1, args.at), generator=torch.Generator().manual_seed(0))

    def forward_time(model) -> float:
        with torch.no_grad():
            t = time.perf_counter()
            if args.prefill_chunk:
                prefill(model, probe, args.prefill_chunk)
            else:
                model(input_ids=probe, use_cache=False)
            return time.perf_counter() - t

    rows, grids, curves = [], {}, {}
    for name, fields in chosen:
        model = original
        if isinstance(fields, torch.nn.Module):
            model, fields = fields, {"saved": args.converted}
        elif fields is not None:
            model = load_any(args.model)[0]
            convert_(model, MoSAConfig(**fields), calibration=calibration, stats=stats, retrieval=retrieval,
                     progress=False)
        model.eval()
        print(f"\n== {name}", flush=True)
        grids[name] = passkey_grid(model, tokenizer, args.lengths, depths, args.trials, args.variant,
                                   chunk=args.prefill_chunk)
        curves[name] = context_perplexity(model, docs, args.contexts, chunk=args.prefill_chunk)
        cost = cost_ratios(model, args.at) if fields is not None else None
        rows.append(dict(name=name, config=fields, ppl=perplexity(model, blocks),
                         seconds=None if args.no_time else forward_time(model),
                         held=prefill_footprint(model, args.at, chunk=args.prefill_chunk)[0] if args.held else None,
                         kv=cost.kv_bytes if cost else 1.0, flops=cost.flops if cost else 1.0))
        print(json.dumps({**rows[-1], "passkey": {f"{L}@{d}": v for (L, d), v in grids[name].items()},
                          "curve": curves[name]}), flush=True)

    base = earlier_base or rows[0]
    passkey = lambda g, L: sum(g[(L, d)] for d in depths) / len(depths)
    reading = f"read {args.prefill_chunk} tokens at a time through the KV cache" if args.prefill_chunk else "one forward"
    lines = [f"# Long context: {title} and its conversions, no training", "",
             f"Command: `python benchmarks/long_context.py {shlex.join(sys.argv[1:])}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             f"Passkey: {'multi-key variant (four named keys, one asked)' if args.variant == 'multi' else 'one key'}"
             f", {args.trials} keys x depths "
             f"{', '.join(f'{d:.0%}' for d in depths)} per length, teacher forced. Perplexity: the final 256 tokens "
             f"of {len(docs)} play(s) given L tokens of the play before them. Every input: {reading}. Held-out: "
             f"{PROTOCOL.describe()}. KV bytes and attention FLOPs at {args.at:,} tokens against the original "
             "(cost model)" + ("" if args.no_time else f"; forward time: one {args.at:,}-token forward against "
                                "the original's, same run")
             + (f"; KV held: bytes the model's cache holds after one {args.at:,}-token prefill (measured)"
                if args.held else "") + ".", "",
             *([f"Rows copied from {args.earlier} (the same prompts and plays), not measured again: "
                f"{', '.join(r.split('|')[1].strip() for r in copied)}.", ""] if args.earlier else []),
             header, "|---|" + "---|" * (len(head) + 1 + len(args.lengths) + len(args.contexts)), *copied]
    for r in rows:
        g, c = grids[r["name"]], curves[r["name"]]
        cells = [f"{r['kv']:.3f}x", f"{r['flops']:.3f}x"]
        cells += [] if args.no_time else [f"{r['seconds'] / base['seconds']:.2f}x"]
        cells += [f"{r['held'] / 2**20:.1f} MiB ({r['held'] / base['held']:.3f}x)"] if args.held else []
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['ppl']:.2f} | "
                     + " | ".join(f"{passkey(g, L):.2f}" for L in args.lengths) + " | "
                     + " | ".join(f"{c[L]:.2f}" for L in args.contexts) + " |")
    lines += ["", "Configurations (MoSAConfig fields; the rest are the defaults):", ""]
    lines += copied_configs + [f"- {r['name']}: `{json.dumps(r['config'])}`" for r in rows if r["config"] is not None]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.earlier:  # the copied rows keep no per-depth grid to draw
        print(f"\nwrote {out}")
        return
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_long_context(grids, curves, Path(args.plot))
    print(f"\nwrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
