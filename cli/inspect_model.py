"""``mosa-retrofit inspect``: per-layer head split, k, attention FLOPs and KV cache against the original."""

from __future__ import annotations

import argparse

from .common import HelpFormatter
from .convert import summary
from .flags import COUNT, NONNEGATIVE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="per-layer head split, k, attention FLOPs and KV cache against the original",
        description="Print, per layer, the dense / MoSA / local head split, k at --seq-len and the attention "
                    "FLOPs, KV-cache entries (per query head, as in the paper) and KV-cache bytes (what a cache "
                    "holds under GQA) against the original model. With --plot, draw which tokens each MoSA head "
                    "of --layer selects on a sample text.",
        formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--seq-len", type=COUNT, default=2048, help="T for k, FLOPs and KV cache")
    p.add_argument("--plot", metavar="FILE.png", help="draw the token selection of one layer's MoSA heads")
    p.add_argument("--layer", type=NONNEGATIVE, help="layer to plot (default: the first converted one)")
    p.add_argument("--text", help="sample text for --plot (default: the start of a Wikipedia article)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mosa_retrofit.convert.serialization import load_any

    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    if not args.plot and (args.layer is not None or args.text is not None):
        raise ValueError("--layer and --text choose what --plot draws; add --plot FILE.png")
    if args.text is not None and not args.text.strip():
        raise ValueError("--text is empty: give the sample text to plot, or leave --text out for the default")
    model, source = load_any(args.model)
    converted = bool(getattr(model.config, "mosa", None))
    print(("converted MoSA model" if converted else "original (unconverted) model") + f": {args.model}\n")
    print(summary(model, args.seq_len))
    if args.plot:
        from mosa_retrofit.eval.plots import plot_selection

        layer = plot_selection(model, source, args.plot, args.layer, args.text)
        print(f"\nwrote {args.plot} (token selection of layer {layer})")
    return 0
