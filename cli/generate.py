"""``mosa-retrofit generate MODEL "prompt"``: stream text and report the KV cache against the original."""

from __future__ import annotations

import argparse

from .flags import COUNT, PROBABILITY, SEED, TEMPERATURE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text token by token (causal routing + sparse KV cache) and report KV bytes",
        description="Stream a continuation of PROMPT from MODEL_OR_DIR (a converted model with routing='causal' decodes "
                    "with its sparse KV cache; original models work too), then print the KV-cache bytes used against "
                    "what the unconverted model caches at the same length.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="with --sample")
    p.add_argument("--top-p", type=PROBABILITY, default=0.95, help="with --sample")
    p.add_argument("--num-beams", type=COUNT, default=1, help="beam search width (1: no beam search)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token (the only way an expert-choice model generates)")
    p.set_defaults(run=run)


def original_kv_bytes(model, tokens: int, batch: int = 1) -> int:
    """Bytes of K/V the unconverted model would cache for ``tokens`` tokens (sliding layers keep their window)."""
    from mosa_retrofit.convert.families import family_of
    from mosa_retrofit.convert.surgery import attention_layers

    fam = family_of(model)
    size = next(model.parameters()).element_size()
    total = 0
    for _, m in attention_layers(model, fam).values():
        H, KV, d = fam.dims(m)
        window = fam.sliding_window(m)
        kept = tokens if window is None else min(tokens, window)
        total += 2 * batch * KV * kept * d * size
    return total


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from mosa_retrofit.convert.attention import decode_refusal, mosa_layers
    from mosa_retrofit.convert.cache import cache_bytes
    from mosa_retrofit.convert.compat import output_cache
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.validate import positions_of

    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise ValueError("--max-new-tokens and --num-beams must be >= 1")
    if not args.prompt.strip():
        raise ValueError("PROMPT is empty: give the text to continue")
    model, source = load_any(args.model)
    why = decode_refusal(model)
    if why is not None and not args.no_cache:
        raise ValueError(f"{args.model} cannot decode with a cache: {why}; or pass --no-cache")
    tokenizer = load_tokenizer(source)
    ids = tokenizer(args.prompt, return_tensors="pt")
    prompt, positions = ids["input_ids"].shape[1], positions_of(model.config)
    if positions is not None and prompt + args.max_new_tokens > positions:  # learned and rotary positions alike
        room = (f"give --max-new-tokens <= {positions - prompt}" if prompt < positions else
                "shorten the prompt")
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the prompt's {prompt:,} tokens and "
                         f"{args.max_new_tokens:,} new ones reach beyond the {positions:,} positions of {args.model}; "
                         f"{room}")
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=False) if args.num_beams == 1 else None
    opts = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, num_beams=args.num_beams,
                use_cache=not args.no_cache, return_dict_in_generate=True, streamer=streamer,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.sample:
        opts.update(temperature=args.temperature, top_p=args.top_p)
    with torch.no_grad():
        out = model.generate(**ids, **opts)
    if streamer is None:
        print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))
    length = out.sequences.shape[1]
    cache = output_cache(out)
    if cache is None or args.no_cache:
        print(f"\n{length} tokens (no cache)")
        return 0
    dense, sparse, _ = cache_bytes(cache)
    rows = out.sequences.shape[0] * args.num_beams  # beam search caches every beam
    original = original_kv_bytes(model, length - 1, rows)  # the last token is never cached
    ratio = (dense + sparse) / original
    beams = f" ({rows} beams)" if rows > 1 else ""
    print(f"\nKV cache after {length - 1} tokens{beams}: {(dense + sparse) / 1024:,.1f} KiB (dense heads "
          f"{dense / 1024:,.1f} KiB, MoSA heads {sparse / 1024:,.1f} KiB); the original model caches "
          f"{original / 1024:,.1f} KiB: {ratio:.3f}x")
    windows = [g.window(None) for m in mosa_layers(model).values() for g in m.mosa_groups if g.windowed]
    window = min(windows, default=None)
    if ratio > 0.99 and window and length - 1 <= window:
        print(f"(all {length - 1} tokens lie within the {window}-token window the MoSA heads keep whole: the cache "
              "saves bytes on longer contexts only; `mosa-retrofit inspect MODEL --seq-len 8192` shows how much)")
    return 0
