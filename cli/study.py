"""``mosa-retrofit study``: the retrofit sweep (perplexity kept vs attention FLOPs / KV / time) + baselines."""

from __future__ import annotations

import argparse
import shlex
import sys


def _list(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model to convert: smollm2-135m, a folder or a hub id")
    p.add_argument("--out", default="out/study", help="folder for results.jsonl, study.md, study.png")
    p.add_argument("--work", help="folder for adaptation runs (checkpoints, metrics); OUT/adapt when not given")
    p.add_argument("--dense-heads", type=_list(int), default=(1, 3, 6), help="dense heads kept per layer")
    p.add_argument("--sparsity", type=_list(float), default=(2, 4, 8, 16),
                   help="sparsities: a MoSA head attends T / sparsity tokens (baselines get the same compute)")
    p.add_argument("--routing", type=_list(str), default=("expert_choice", "causal"),
                   help="expert_choice (paper: top-k of the whole sequence) and/or causal (thresholds: decodable)")
    p.add_argument("--router-init", type=_list(str), default=("random", "calibrated"),
                   help="random (paper) and/or calibrated (routers fitted to what each head needs)")
    p.add_argument("--fill", type=_list(str), default=("mean",),
                   help="what MoSA / pruned heads write at skipped tokens: zero (paper), mean, or both: zero,mean")
    p.add_argument("--baselines", type=_list(str), default=("local", "pruned"), help="'' for none")
    p.add_argument("--data", default="wikipedia-offline", help="in-domain text (its last documents are held out)")
    p.add_argument("--ood-data", default="shakespeare-offline", help="out-of-domain text; 'none' to skip")
    p.add_argument("--eval-length", type=int, default=1024, help="tokens per evaluation / training block")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out in-domain tokens")
    p.add_argument("--ood-tokens", type=int, default=2048, help="out-of-domain tokens")
    p.add_argument("--calibration-sequences", type=int, default=8,
                   help="training-split sequences read once to score heads, fit routers, fills and thresholds")
    p.add_argument("--calibration-length", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--cost-lengths", type=_list(int), default=(2048, 8192), help="T for FLOPs and KV ratios")
    p.add_argument("--time-length", type=int, default=2048, help="T of the attention-layer timing")
    p.add_argument("--adapt", nargs="*", default=(), metavar="POINT",
                   help="points to adapt, e.g. mosa:2:8:causal:calibrated:mean local:2:8 pruned:2:8:mean")
    p.add_argument("--adapt-distill-steps", type=int, default=0,
                   help="layer-distillation steps per adapted point (each attention layer learns the original's output)")
    p.add_argument("--adapt-distill-lr", type=float, default=1e-3, help="peak learning rate of layer distillation")
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="end-to-end steps per adapted point (LM + distillation to the original's logits)")
    p.add_argument("--adapt-lr", type=float, default=1e-3, help="peak learning rate of the end-to-end steps (cosine)")
    p.add_argument("--adapt-trainable", choices=("attention", "all"), default="attention",
                   help="what the end-to-end steps train")
    p.add_argument("--adapt-batch", type=int, default=2, help="sequences of --eval-length tokens per step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mosa_retrofit.study import StudySpec, run_study

    spec = StudySpec(model=args.model, dense_heads=args.dense_heads, sparsity=args.sparsity, routing=args.routing,
                     router_init=args.router_init, fill=args.fill, baselines=args.baselines, data=args.data,
                     ood_data=None if args.ood_data.lower() == "none" else args.ood_data,
                     eval_length=args.eval_length, eval_tokens=args.eval_tokens, ood_tokens=args.ood_tokens,
                     calibration_sequences=args.calibration_sequences, calibration_length=args.calibration_length,
                     cost_lengths=args.cost_lengths, time_length=args.time_length, adapt=tuple(args.adapt),
                     adapt_steps=args.adapt_steps, adapt_lr=args.adapt_lr, adapt_batch=args.adapt_batch,
                     adapt_distill_steps=args.adapt_distill_steps, adapt_distill_lr=args.adapt_distill_lr,
                     adapt_trainable=args.adapt_trainable)
    command = "mosa-retrofit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else ""
    run_study(spec, args.out, args.work, progress=not args.quiet, command=command)
    print(f"\ntable: {args.out}/study.md, plot: {args.out}/study.png")
    return 0
