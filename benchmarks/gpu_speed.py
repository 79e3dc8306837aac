"""Speed on a GPU: Llama-3.2-1B-shaped random weights and SmolLM2-135M, converted with the default layout, against
their originals: prefill and decoding at 8k and 32k tokens, bf16.

    python benchmarks/gpu_speed.py                      # on a machine with a CUDA GPU
    python benchmarks/gpu_speed.py --small --device cpu # the same code at toy sizes (the tests run this)

Layout: the default's budget (a quarter of the KV groups dense, every other group a key-selection unit with
4 sinks + a 256-token window + 1/64 routed tokens, causal routing), with the dense groups taken by position and
random routers: on random weights there is nothing to calibrate, and which groups stay dense does not change
the speed. Lengths beyond a model's positions are skipped (SmolLM2 has 8,192). The windowed heads run
``attn_backend='auto'`` (FlexAttention on CUDA). Writes a Markdown table (command, machine and torch in the
header) to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=8, vocab_size=256, max_position_embeddings=4096,
             tie_word_embeddings=True)
LAYOUT = dict(head_choice="first", dense_scope="layer", router_init="random")  # the default's budget, no calibration


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build(name: str, small: bool, dtype: torch.dtype, device: str):
    """(original, converted) for 'llama-3.2-1b-shape' (random weights) or 'smollm2-135m' (the embedded model)."""
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mosa_retrofit import MoSAConfig, convert_, resolve_model

    torch.manual_seed(0)
    if name == "smollm2-135m" and not small:
        original = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"))
    else:
        cfg = LlamaConfig(**(SMALL if small else LLAMA_1B))
        original = LlamaForCausalLM(cfg)
    original = original.to(device, dtype).eval()
    config = MoSAConfig(**LAYOUT, **({"local_window": 16} if small else {}))
    converted = convert_(copy.deepcopy(original), config, progress=False)
    return original, converted


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="llama-3.2-1b-shape,smollm2-135m")
    p.add_argument("--contexts", type=ints, default=[8192, 32768])
    p.add_argument("--batch", type=ints, default=[1, 8])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--train-length", type=int, default=0, help="also time a training step of this many tokens")
    p.add_argument("--small", action="store_true", help="toy sizes (contexts 64,128), for a smoke test on any machine")
    p.add_argument("--out", default="benchmarks/results/gpu_speed.md")
    args = p.parse_args(argv)
    if args.small:
        args.contexts, args.decode_tokens, args.reps = [64, 128], 4, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (run with --device cpu --small for the smoke test)")

    from mosa_retrofit.bench.model import bench_model, format_rows
    from mosa_retrofit.study import machine

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    sections = []
    for name in [m for m in args.models.split(",") if m]:
        original, converted = build(name, args.small, dtype, args.device)
        positions = original.config.max_position_embeddings
        contexts = [T for T in args.contexts if T <= positions]
        skipped = [T for T in args.contexts if T > positions]
        ids = torch.randint(0, original.config.vocab_size, (1, max(contexts) + 1), generator=g).to(args.device)
        t0 = time.perf_counter()
        rows = bench_model(converted, original, ids, contexts, args.batch, args.decode_tokens,
                           args.train_length or None, args.reps, progress=False)
        note = f" ({', '.join(f'{T:,}' for T in skipped)} skipped: beyond its {positions:,} positions)" if skipped else ""
        sections.append(f"### {name}{note}\n\n{format_rows(rows)}\n\n(measured in {time.perf_counter() - t0:,.0f} s)")
        del original, converted
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else machine()
    header = (f"# Speed on {device}\n\n`python benchmarks/gpu_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f"; torch {torch.__version__}, {args.dtype}; times are the minimum of {args.reps} runs; the limit is the "
              "original's FLOPs (prefill) or bytes read per step (decode) over the converted model's.\n")
    text = header + "\n" + "\n\n".join(sections) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    print(text)
    return text


if __name__ == "__main__":
    main()
