"""Speed of the default conversion of SmolLM2-135M beside the original, at 1 and 2 threads, in one command:
prefill, decoding (batch 1 and 8) after 2k / 4k / 8k tokens, a 2k training step and peak memory, each ratio
beside the FLOP or byte ratio that bounds it; writes benchmarks/results/speed.md and docs/results/speed.png.

    python benchmarks/speed.py [--model out/smollm2-mosa] [--threads 1,2] [--reps 2]
    python benchmarks/speed.py --model out/gemma-default --threads 2 --reps 1 --contexts 16384,32768 --batch 1 \
        --decode-tokens 4 --train-length 0 --prefill-chunk 4096 --out benchmarks/results/speed_gemma3-270m.md

Converts the embedded model first when --model does not exist (``mosa-retrofit convert smollm2-135m MODEL``).
Each thread count runs ``mosa-retrofit bench MODEL`` in its own process, one after the other.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path


MODEL, OUT = "out/smollm2-mosa", "benchmarks/results/speed.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--contexts", default="", help="bench's --contexts (default: its own)")
    p.add_argument("--batch", default="", help="bench's --batch (default: its own)")
    p.add_argument("--train-length", default="", help="bench's --train-length (default: its own)")
    p.add_argument("--prefill-chunk", default="", help="bench's --prefill-chunk (default: one forward)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--plot", default="", help="default: docs/results/speed.png, or <out's name>.png for another --out")
    args = p.parse_args()
    args.plot = args.plot or ("docs/results/speed.png" if args.out == OUT else f"docs/results/{Path(args.out).stem}.png")
    cli = [sys.executable, "-m", "mosa_retrofit"]
    if not Path(args.model).exists():
        subprocess.run([*cli, "convert", "smollm2-135m", args.model], check=True)
    started = time.time()
    sections, tables = [], {}
    for threads in [int(t) for t in args.threads.split(",")]:
        tmp = Path(args.out).with_suffix(f".{threads}t.tmp")
        extra = [f for name in ("contexts", "batch", "train_length", "prefill_chunk") if getattr(args, name)
                 for f in (f"--{name.replace('_', '-')}", getattr(args, name))]
        cmd = [*cli, "bench", args.model, "--threads", str(threads), "--reps", str(args.reps), "--decode-tokens",
               str(args.decode_tokens), *extra, "--output", str(tmp)]
        subprocess.run(cmd, check=True)
        text = tmp.read_text()
        tmp.unlink()
        tables[threads] = text
        sections.append(f"## {threads} thread(s)\n\n`{' '.join(['mosa-retrofit', *cmd[3:-2]])}`\n\n{text}")
    head = (f"# Speed: {_what(args.model)} beside the original\n\n"
            f"`python benchmarks/speed.py --model {args.model} --threads {args.threads} --reps {args.reps}"
            + (f" --decode-tokens {args.decode_tokens}" if args.decode_tokens != 8 else "")
            + "".join(f" {f}" for f in extra)
            + (f" --out {args.out} --plot {args.plot}" if args.out != OUT else "") + "` "
            f"({time.strftime('%Y-%m-%d')}, {time.time() - started:,.0f} s in all).\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(head + "\n" + "\n".join(sections))
    _plot(tables, args.plot, _what(args.model))
    print(Path(args.out).read_text())


def _rows(table: str) -> list[tuple[str, str, float, float | None]]:
    """(measure, tokens, ratio, limit) of the rows with a speed ratio."""
    out = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and "**" in cells[4]:
            ratio = float(re.search(r"\*\*([\d.]+)x", cells[4]).group(1))
            limit = re.match(r"([\d.]+)x", cells[5])
            out.append((cells[0], cells[1], ratio, float(limit.group(1)) if limit else None))
    return out


def _what(model: str) -> str:
    """The model measured, in words: the default conversion, or the saved model's folder."""
    return "the default conversion of SmolLM2-135M-Instruct" if model == MODEL else f"`{model}`"


def _plot(tables: dict[int, str], path: str, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    first = _rows(next(iter(tables.values())))
    labels = [f"{m}\n{t}" for m, t, _, _ in first]
    width = 0.8 / (len(tables) + 1)
    for i, (threads, table) in enumerate(tables.items()):
        ratios = [r for _, _, r, _ in _rows(table)]
        ax.bar([x + i * width for x in range(len(ratios))], ratios, width, label=f"measured, {threads} thread(s)")
    limits = [lim or 0 for _, _, _, lim in first]
    ax.bar([x + len(tables) * width for x in range(len(limits))], limits, width, color="lightgrey",
           label="limit (FLOP / byte ratio)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([x + width * len(tables) / 2 for x in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("× the original's speed")
    ax.set_title(f"{what.strip('`')} against the original (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
