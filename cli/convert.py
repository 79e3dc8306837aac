"""``mosa-retrofit convert`` and ``mosa-retrofit inspect``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from mosa_retrofit.config import FILLS, GRANULARITIES, HEAD_CHOICES, KEPT_HEADS, ROUTER_INITS, ROUTER_SCORES, ROUTINGS


def _count(text: str) -> float:
    v = float(text)
    if v < 0 or (v >= 1 and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or a fraction in [0, 1), got {text!r}")
    return int(v) if v >= 1 or v == 0 else v


def _layers(text: str):
    if text == "all" or text.startswith("re:"):
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', '0,1,5' or 're:<regex>', got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a pretrained causal LM to hybrid MoSA and save it",
        description="Convert MODEL (a local folder, a hub id, or 'smollm2-135m', the embedded default) to hybrid "
                    "MoSA attention and save it to OUT (safetensors + config.json with a 'mosa' block; load it "
                    "with mosa_retrofit.load(OUT)). Flags override --config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist, or use --overwrite)")
    p.add_argument("--config", help="a MoSAConfig JSON file (flags given explicitly override it)")
    p.add_argument("--sparsity", type=float, help="each MoSA head attends T // sparsity tokens (default 8)")
    p.add_argument("--dense-heads", type=_count, help="heads kept dense per layer: int or fraction (default 0.25)")
    p.add_argument("--head-choice", choices=HEAD_CHOICES,
                   help="which heads stay dense: first, last, or scored (highest output energy; needs calibration)")
    p.add_argument("--layers", type=_layers, help="layers to convert: all, 0,1,5 or re:<regex>")
    p.add_argument("--kept-heads", choices=KEPT_HEADS, help="kept heads are dense or local (sliding window)")
    p.add_argument("--local-window", type=int, help="window of local kept heads")
    p.add_argument("--router-score", choices=ROUTER_SCORES)
    p.add_argument("--router-init", choices=ROUTER_INITS, help="calibrated: fitted to the tokens each head needs")
    p.add_argument("--fill", choices=FILLS,
                   help="what MoSA heads write at tokens they skip: zero (paper) or mean (their calibrated mean output; "
                        "far less damage before adaptation)")
    p.add_argument("--router-granularity", choices=GRANULARITIES)
    p.add_argument("--routing", choices=ROUTINGS,
                   help="expert_choice (paper, top-k over the sequence) or causal (thresholds; can generate)")
    p.add_argument("--include-first", action=argparse.BooleanOptionalAction, default=None,
                   help="MoSA heads always select the first token")
    p.add_argument("--calib-text", help="text file for calibration (default: the offline Wikipedia articles)")
    p.add_argument("--calib-sequences", type=int, default=16, help="calibration sequences")
    p.add_argument("--calib-length", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run_convert)

    i = sub.add_parser(
        "inspect", help="per-layer head split, k, attention FLOPs and KV cache against the original",
        description="Print, per layer, the dense / MoSA / local head split, k at --seq-len and the attention "
                    "FLOPs and KV-cache entries against the original model. With --plot, draw which tokens each "
                    "MoSA head of --layer selects on a sample text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    i.add_argument("model", metavar="MODEL_OR_DIR")
    i.add_argument("--seq-len", type=int, default=2048, help="T for k, FLOPs and KV entries")
    i.add_argument("--plot", metavar="FILE.png", help="draw the token selection of one layer's MoSA heads")
    i.add_argument("--layer", type=int, help="layer to plot (default: the first converted one)")
    i.add_argument("--text", help="sample text for --plot (default: the start of a Wikipedia article)")
    i.set_defaults(run=run_inspect)


def build_config(args: argparse.Namespace):
    from mosa_retrofit import MoSAConfig

    base = MoSAConfig.from_json(args.config) if args.config else MoSAConfig()
    flags = dict(sparsity=args.sparsity, dense_heads=args.dense_heads, head_choice=args.head_choice,
                 layers=args.layers, kept_heads=args.kept_heads, local_window=args.local_window,
                 router_score=args.router_score, router_init=args.router_init,
                 router_granularity=args.router_granularity, include_first=args.include_first, routing=args.routing,
                 fill=args.fill)
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})


def _calibration_texts(path: str | None) -> list[str]:
    if path:
        return [Path(path).read_text()]
    from mosa_retrofit.assets import wikipedia_articles
    from mosa_retrofit.evaluate import split_articles

    return split_articles(wikipedia_articles())[0]  # train split only


def run_convert(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mosa_retrofit import convert_
    from mosa_retrofit.assets import resolve_model
    from mosa_retrofit.evaluate import token_blocks
    from mosa_retrofit.families import family_of

    config = build_config(args)  # validates every value before anything is loaded
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; choose another OUT or pass --overwrite")
    if args.calib_text and not Path(args.calib_text).is_file():
        raise FileNotFoundError(f"--calib-text {args.calib_text} does not exist")
    _check_local(args.model)
    source = resolve_model(args.model)
    config = dataclasses.replace(config, base_model_name_or_path=args.model)
    print(f"loading {args.model} ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None  # a bare checkpoint: fine unless calibration needs to tokenize text
    family_of(model)  # unsupported families fail here, before any work
    calibration = None
    if config.needs_calibration:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer, which calibration needs")
        texts = _calibration_texts(args.calib_text)
        calibration = token_blocks(tokenizer, texts, args.calib_length, args.calib_sequences * args.calib_length)
    convert_(model, config, calibration=calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: OUT is either complete or absent
    print(summary(model, 2048))
    print(f"\nsaved to {out}; load with mosa_retrofit.load({str(out)!r})")
    return 0


def _check_local(name: str) -> None:
    """A path-looking MODEL must exist (hub ids like org/name are left to transformers)."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{name} does not exist (give a local folder, a hub id or 'smollm2-135m')")


def summary(model, T: int) -> str:
    """Per-layer table: head split, k, attention FLOPs and KV entries relative to the original."""
    from mosa_retrofit.costs import attention_costs, ratios

    rows = ["| layer | dense | local | MoSA | k | attention FLOPs × | KV entries × |", "|---|---|---|---|---|---|---|"]
    costs = attention_costs(model, T)
    for c in costs:
        rows.append(f"| {c.layer} | {c.dense} | {c.local} | {c.mosa} | {c.k or '-'} | {c.flops / c.flops_original:.3f} "
                    f"| {c.kv / c.kv_original:.3f} |")
    f, kv = ratios(costs)
    rows.append(f"| all | | | | | **{f:.3f}** | **{kv:.3f}** |")
    return f"At T = {T} (FLOPs count the causal half; KV entries per query head):\n\n" + "\n".join(rows)


def run_inspect(args: argparse.Namespace) -> int:
    from mosa_retrofit.io import load_any

    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    _check_local(args.model)
    model, source = load_any(args.model)
    converted = bool(getattr(model.config, "mosa", None))
    print(("converted MoSA model" if converted else "original (unconverted) model") + f": {args.model}\n")
    print(summary(model, args.seq_len))
    if args.plot:
        from mosa_retrofit.plots import plot_selection

        layer = plot_selection(model, source, args.plot, args.layer, args.text)
        print(f"\nwrote {args.plot} (token selection of layer {layer})")
    return 0
