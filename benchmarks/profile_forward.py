"""Where one long forward of a converted model spends its time: torch's profiler over one T-token forward (no
KV cache, logits of the last token), operators by self time, beside the original model's.

    python benchmarks/profile_forward.py out/smollm2-mosa [--tokens 8192] [--threads 1] [--rows 12]

Uses only the public API (``mosa_retrofit.load``), so the same script profiles any version of the package.
"""

from __future__ import annotations

import argparse
import time

import torch


def profile(model, ids, rows: int) -> tuple[float, str]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        model(input_ids=ids[:, :256], use_cache=False, logits_to_keep=1)  # warm-up (memoised weights)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            seconds = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)
    return seconds, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a converted model folder")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--original", action="store_true", help="also profile the original model")
    args = p.parse_args()

    import mosa_retrofit
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = mosa_retrofit.load(args.model).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    seconds, table = profile(model, ids, args.rows)
    print(f"converted ({mosa_retrofit.__file__}): one {args.tokens:,}-token forward in {seconds:.2f} s "
          f"(with the profiler on), {args.threads} thread(s)\n{table}")
    if args.original:
        base = model.config.mosa["base_model_name_or_path"]
        original = AutoModelForCausalLM.from_pretrained(mosa_retrofit.resolve_model(base)).eval()
        seconds, table = profile(original, ids, args.rows)
        print(f"original: one {args.tokens:,}-token forward in {seconds:.2f} s (with the profiler on)\n{table}")


if __name__ == "__main__":
    main()
