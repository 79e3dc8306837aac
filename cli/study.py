"""``mosa-retrofit study``: the retrofit sweep (perplexity kept vs attention FLOPs / KV / time) + baselines."""

from __future__ import annotations

import argparse
import shlex
import sys

from mosa_retrofit.study.spec import StudySpec

from .common import HelpFormatter, add_dataclass_flags, given_flags


def add_parser(sub) -> None:
    p = sub.add_parser(
        "study", help="sweep conversions of a model: perplexity kept vs attention FLOPs, KV cache and time",
        description="Convert MODEL at every combination of --dense-heads x --sparsity x --routing x --router-init x "
                    "--fill (at each dense count every method keeps the same heads dense: highest output energy on "
                    "calibration text), plus the equal-compute baselines that replace the other heads by "
                    "sliding-window heads ('local') or remove them ('pruned'); measure held-out perplexity "
                    "(in-domain and out-of-domain), attention FLOPs and KV entries relative to the original at "
                    "--cost-lengths, and the forward+backward time of one attention layer. Points named by --adapt "
                    "are also adapted: --adapt-distill-steps of layer distillation, then --adapt-steps end-to-end "
                    "steps. Writes OUT/results.jsonl (one line per point, resumable: rerun the same command to "
                    "continue), OUT/study.md (table) and OUT/study.png (plot).",
        formatter_class=HelpFormatter)
    p.add_argument("--out", default="out/study", help="folder for results.jsonl, study.md, study.png")
    p.add_argument("--work", help="folder for adaptation runs (checkpoints, metrics); OUT/adapt when not given")
    p.add_argument("--adapt", nargs="*", default=None, metavar="POINT",
                   help="points to adapt, e.g. mosa:2:8:causal:calibrated:mean local:2:8 pruned:2:8:mean")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, spec_flags=add_dataclass_flags(p, StudySpec, skip=("adapt",),
                                                           choices={"adapt_trainable": ("attention", "all")}))


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    """The StudySpec the flags describe (flags not given keep the spec's defaults)."""
    given = given_flags(args, args.spec_flags)
    if args.adapt is not None:
        given["adapt"] = tuple(args.adapt)
    return StudySpec(**given)


def run(args: argparse.Namespace) -> int:
    from mosa_retrofit.study.measure import run_study

    spec = spec_from_args(args)
    command = "mosa-retrofit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else ""
    run_study(spec, args.out, args.work, progress=not args.quiet, command=command)
    print(f"\ntable: {args.out}/study.md, plot: {args.out}/study.png")
    return 0
