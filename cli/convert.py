"""``mosa-retrofit convert`` and ``mosa-retrofit inspect``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from mosa_retrofit.config import FILLS, GRANULARITIES, HEAD_CHOICES, KEPT_HEADS, ROUTER_INITS, ROUTER_SCORES, ROUTINGS
from mosa_retrofit.evaluate import PROTOCOL

PRESETS = ("default", "paper")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it has one (flags that override a config say theirs in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return action.help
        return super()._get_help_string(action)
DEFAULT_CALIBRATION = "wikipedia-offline"


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
                    "with mosa_retrofit.load(OUT)). The defaults are the best retrofit we know: dense heads chosen "
                    "as whole KV groups by what sparse selection would change most, routers fitted per KV group, "
                    "mean fill and causal routing (the model can generate with a sparse KV cache), all calibrated "
                    "on --calibration-data. --preset paper gives the MoSA paper's conversion instead. Ends with "
                    "held-out perplexity of the original and the converted model (--no-check skips it). "
                    "Precedence: flags > --config > --preset.",
        formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist, or use --overwrite)")
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="default: the best retrofit we know (calibrated); paper: the MoSA paper's conversion "
                        "(4 first heads dense, random sigmoid routers, expert-choice top-k, zero fill)")
    p.add_argument("--config", help="a MoSAConfig JSON file (over the preset; flags given explicitly override it)")
    p.add_argument("--sparsity", type=float, help="each MoSA head attends T // sparsity tokens (default 8)")
    p.add_argument("--dense-heads", type=_count,
                   help="heads kept dense per layer: int or fraction (default 0.25); rounded up to whole KV groups "
                        "under GQA with --router-granularity kv_group")
    p.add_argument("--head-choice", choices=HEAD_CHOICES,
                   help="which heads stay dense: scored (those sparse selection would change most; default), "
                        "first (paper) or last")
    p.add_argument("--layers", type=_layers, help="layers to convert: all, 0,1,5 or re:<regex>")
    p.add_argument("--kept-heads", choices=KEPT_HEADS, help="kept heads are dense or local (sliding window)")
    p.add_argument("--local-window", type=int, help="window of local kept heads")
    p.add_argument("--router-score", choices=ROUTER_SCORES,
                   help="straight_through (default: outputs unscaled, sigmoid gradient) or sigmoid (paper)")
    p.add_argument("--router-init", choices=ROUTER_INITS,
                   help="calibrated (default: fitted to the tokens each head needs) or random (paper)")
    p.add_argument("--fill", choices=FILLS,
                   help="what MoSA heads write at tokens they skip: mean (default: their calibrated mean output) "
                        "or zero (paper)")
    p.add_argument("--router-granularity", choices=GRANULARITIES,
                   help="kv_group (default: one selection and one K/V copy per GQA group; the cache shrinks in "
                        "bytes) or head (paper: one per head)")
    p.add_argument("--routing", choices=ROUTINGS,
                   help="causal (default: thresholds; can generate) or expert_choice (paper: top-k over the sequence)")
    p.add_argument("--include-first", action=argparse.BooleanOptionalAction, default=None,
                   help="MoSA heads always select the first token")
    p.add_argument("--calibration-data", "--calib-text", dest="calibration_data", default=DEFAULT_CALIBRATION,
                   help="calibration text: 'wikipedia-offline' (embedded; its held-out articles are never used), "
                        "'shakespeare-offline', text/jsonl/parquet files or a hub dataset (falls back to the "
                        "embedded text when the hub is unreachable)")
    p.add_argument("--calib-sequences", type=int, default=16, help="calibration sequences")
    p.add_argument("--calib-length", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="after converting, measure held-out perplexity of the original and the converted model "
                        f"({PROTOCOL.describe()}; about half a minute for SmolLM2-135M on 2 CPU cores)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run_convert)

    i = sub.add_parser(
        "inspect", help="per-layer head split, k, attention FLOPs and KV cache against the original",
        description="Print, per layer, the dense / MoSA / local head split, k at --seq-len and the attention "
                    "FLOPs, KV-cache entries (per query head, as in the paper) and KV-cache bytes (what a cache "
                    "holds under GQA) against the original model. With --plot, draw which tokens each MoSA head "
                    "of --layer selects on a sample text.",
        formatter_class=HelpFormatter)
    i.add_argument("model", metavar="MODEL_OR_DIR")
    i.add_argument("--seq-len", type=int, default=2048, help="T for k, FLOPs and KV cache")
    i.add_argument("--plot", metavar="FILE.png", help="draw the token selection of one layer's MoSA heads")
    i.add_argument("--layer", type=int, help="layer to plot (default: the first converted one)")
    i.add_argument("--text", help="sample text for --plot (default: the start of a Wikipedia article)")
    i.set_defaults(run=run_inspect)


def build_config(args: argparse.Namespace):
    import json

    from mosa_retrofit import MoSAConfig
    from mosa_retrofit.config import PAPER

    base = dict(PAPER) if args.preset == "paper" else {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {args.config} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of MoSAConfig fields")
        base.update(data)
    flags = dict(sparsity=args.sparsity, dense_heads=args.dense_heads, head_choice=args.head_choice,
                 layers=args.layers, kept_heads=args.kept_heads, local_window=args.local_window,
                 router_score=args.router_score, router_init=args.router_init,
                 router_granularity=args.router_granularity, include_first=args.include_first, routing=args.routing,
                 fill=args.fill)
    base.update({k: v for k, v in flags.items() if v is not None})
    return MoSAConfig.from_dict(base)


def calibration_ids(tokenizer, data: str, sequences: int, length: int, progress: bool = True):
    """(sequences, length) calibration token ids from ``data``: the embedded texts without the documents the
    evaluation protocol holds out, or all of a user's files / hub dataset (an unreachable hub dataset falls back
    to the embedded text with a warning)."""
    from mosa_retrofit.data import BUILTIN_SOURCES, documents, token_stream
    from mosa_retrofit.recipe import DataSpec

    n = sequences * length
    try:
        docs, stream = documents(DataSpec(source=data, block_size=max(length, 2), streaming=True))
        if docs is not None and data in BUILTIN_SOURCES:
            docs = docs[:-PROTOCOL.validation_documents]  # never calibrate on the held-out documents
        ids = token_stream(tokenizer, docs if docs is not None else stream, n, progress, "tokenising calibration text")
    except (ConnectionError, OSError) as e:  # a hub dataset that cannot be reached (a missing file is an error)
        if data in BUILTIN_SOURCES or Path(data.split(",")[0]).suffix or Path(data).exists():
            raise
        print(f"warning: calibration data {data!r} could not be read ({type(e).__name__}: {e}); using the embedded "
              f"{DEFAULT_CALIBRATION} text instead", file=sys.stderr)
        return calibration_ids(tokenizer, DEFAULT_CALIBRATION, sequences, length, progress)
    if ids.numel() < n:
        raise ValueError(f"--calibration-data {data!r} has {ids.numel()} tokens; --calib-sequences "
                         f"{sequences} x --calib-length {length} needs {n}")
    return ids.long().view(sequences, length)


def run_convert(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mosa_retrofit import convert_
    from mosa_retrofit.assets import resolve_model
    from mosa_retrofit.evaluate import perplexity
    from mosa_retrofit.families import family_of

    config = build_config(args)  # validates every value before anything is loaded
    for name in ("calib_sequences", "calib_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; choose another OUT or pass --overwrite")
    check_local(args.model)
    source = resolve_model(args.model)
    config = dataclasses.replace(config, base_model_name_or_path=args.model)
    print(f"loading {args.model} ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None  # a bare checkpoint: fine unless calibration or the check needs to tokenize text
    family_of(model)  # unsupported families fail here, before any work
    if tokenizer is None and (config.needs_calibration or args.check):
        raise ValueError(f"{args.model} has no tokenizer, which calibration and the check need (use --preset paper "
                         "--no-check for a bare checkpoint)")
    calibration = blocks = before = None
    if config.uses_calibration:
        calibration = calibration_ids(tokenizer, args.calibration_data, args.calib_sequences, args.calib_length)
    if args.check:
        blocks = PROTOCOL.blocks(tokenizer, getattr(model.config, "max_position_embeddings", None))
        before = perplexity(model, blocks, progress=True)
    convert_(model, config, calibration=calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: OUT is either complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary(model, 2048))
    if args.check:
        after = perplexity(model, blocks, progress=True)
        print(f"\ncheck ({PROTOCOL.describe()}): original {before:.2f}, converted {after:.2f} "
              f"({after / before:.2f}x the original)")
        if after > 4 * before:
            print("the converted model needs adaptation before use: mosa-retrofit train (see recipes/)")
    print(f"\nsaved to {out}; load with mosa_retrofit.load({str(out)!r})")
    return 0


def check_local(name: str) -> None:
    """A path-looking MODEL must exist (hub ids like org/name are left to transformers)."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{name} does not exist (give a local folder, a hub id or 'smollm2-135m')")


def summary(model, T: int) -> str:
    """Per-layer table: head split, k, attention FLOPs, KV entries and KV bytes relative to the original."""
    from mosa_retrofit.costs import attention_costs, ratios

    rows = ["| layer | dense | local | MoSA | k | attention FLOPs × | KV entries × | KV bytes × |",
            "|---|---|---|---|---|---|---|---|"]
    costs = attention_costs(model, T)
    for c in costs:
        rows.append(f"| {c.layer} | {c.dense} | {c.local} | {c.mosa} | {c.k or '-'} | {c.flops / c.flops_original:.3f} "
                    f"| {c.kv / c.kv_original:.3f} | {c.kv_bytes / c.kv_bytes_original:.3f} |")
    r = ratios(costs)
    held, original = sum(c.kv_bytes for c in costs), sum(c.kv_bytes_original for c in costs)
    rows.append(f"| all | | | | | **{r.flops:.3f}** | **{r.kv:.3f}** | **{r.kv_bytes:.3f}** |")
    return (f"At T = {T} (FLOPs count the causal half; KV entries per query head as in the paper; KV bytes what "
            f"a cache holds under GQA: {_mib(held)} against {_mib(original)} for the original):\n\n" + "\n".join(rows))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_inspect(args: argparse.Namespace) -> int:
    from mosa_retrofit.io import load_any

    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    check_local(args.model)
    model, source = load_any(args.model)
    converted = bool(getattr(model.config, "mosa", None))
    print(("converted MoSA model" if converted else "original (unconverted) model") + f": {args.model}\n")
    print(summary(model, args.seq_len))
    if args.plot:
        from mosa_retrofit.plots import plot_selection

        layer = plot_selection(model, source, args.plot, args.layer, args.text)
        print(f"\nwrote {args.plot} (token selection of layer {layer})")
    return 0
