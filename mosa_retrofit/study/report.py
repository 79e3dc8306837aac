"""The study's report: study.md (command and machine header, goal check, table) and study.png."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..atomic import savefig_atomic, write_atomic
from .spec import StudySpec, format_number


def label(row: dict) -> str:
    """The line a point belongs to in the plot."""
    if row["method"] == "original":
        return "original"
    if row["method"] == "mosa":
        name = f"MoSA {row['routing'].replace('_', '-')}, {row['init']} routers"
    else:
        name = f"{row['method']} heads (baseline)"
    if row["method"] in ("mosa", "pruned"):
        name += f", {row.get('fill') or 'zero'} fill"
    distill = row.get("distill_steps", 0)
    if distill or row["steps"]:
        name += ", adapted " + (f"{distill} layer-distill + " if distill else "") + f"{row['steps']} steps"
    return name


def format_row(row: dict, original: dict | None) -> str:
    ratio = f" ({row['ppl_val'] / original['ppl_val']:.2f}x)" if original and row is not original else ""
    return f"{row['key']}: ppl {row['ppl_val']:.2f}{ratio}, FLOPs@8k {row.get('flops_8192', float('nan')):.3f}"


def write_report(rows: list[dict], spec: StudySpec, out: Path, command: str) -> None:
    """study.md (header, goal check, table) and study.png, written atomically from ``rows``."""

    original = next((r for r in rows if r["method"] == "original"), None)
    text = render_markdown(rows, original, spec, command)
    write_atomic(out / "study.md", text)
    if original is not None and len(rows) > 1:
        plot_study(rows, original, out / "study.png", spec)


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_markdown(rows: list[dict], original: dict | None, spec: StudySpec, command: str) -> str:
    L, H = spec.cost_lengths, spec.cost_lengths[-1]
    ood = spec.ood_data is not None
    lines = ["# Retrofit study", "", f"Command: `{command or 'mosa-retrofit study'}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}", "",
             f"Perplexity on {spec.eval_tokens:,} held-out tokens of `{spec.data}` (last {spec.validation_documents} "
             f"documents, never trained or calibrated on)" + (f" and {spec.ood_tokens:,} tokens of `{spec.ood_data}` "
             f"(out of domain)" if ood else "") + f", blocks of {spec.eval_length} tokens. At each dense count every "
             "method keeps the same heads dense: the highest output energy on "
             f"{spec.calibration_sequences}x{spec.calibration_length} training tokens; 'local' / 'pruned' replace the "
             "other heads by sliding-window heads at equal query-key pairs at the evaluation length (window w) / by "
             "nothing (fill 'zero') or their mean output (fill 'mean'). FLOPs and KV cache: attention of all layers "
             "relative to the original (projections included; KV bytes: what a cache holds under GQA, '-' for rows "
             "measured before bytes were recorded; KV entries: per query head, as the paper counts). "
             f"Time: forward+backward of attention layer 0 at T = {spec.time_length}, 1 thread, relative to the "
             "original layer, measured back to back. Adaptation: steps of layer distillation + end-to-end steps "
             f"({spec.adapt_batch} x {spec.eval_length} tokens each) and their wall time on this machine.", ""]
    if original is not None:
        lines += _goal_lines(rows, original, H, spec) + [""]
    head = ["point", "method", "dense", "sparsity", "routing", "router init", "fill", "adaptation", "ppl", "× orig"]
    if ood:
        head += ["OOD ppl", "× orig"]
    head += [f"FLOPs@{t}" for t in L] + [f"KV bytes@{t}" for t in L] + [f"KV entries@{t}" for t in L]
    head += ["fwd+bwd time"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base = original or r
        cells = [f"`{r['key']}`", r["method"] + (f" (w={r['window']})" if r.get("window") else ""),
                 str(r["dense"] if r["dense"] is not None else "all"),
                 format_number(r["sparsity"]) if r["sparsity"] else "-", r["routing"] or "-", r["init"] or "-",
                 r.get("fill") or "-", _adaptation(r), f"{r['ppl_val']:.2f}", f"{r['ppl_val'] / base['ppl_val']:.2f}"]
        if ood:
            cells += [f"{r['ppl_ood']:.2f}", f"{r['ppl_ood'] / base['ppl_ood']:.2f}"]
        cells += [_f(r.get(f"flops_{t}")) for t in L] + [_f(r.get(f"kv_bytes_{t}")) for t in L]
        cells += [_f(r.get(f"kv_{t}")) for t in L] + [_f(r["time_ratio"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _adaptation(row: dict) -> str:
    distill, steps = row.get("distill_steps", 0), row["steps"]
    if not (distill or steps):
        return "-"
    text = (f"{distill} layer-distillation + " if distill else "") + f"{steps} steps"
    return text + (f" ({row['adapt_seconds'] / 60:.0f} min)" if row.get("adapt_seconds") else "")


def _goal_lines(rows: list[dict], original: dict, T: int, spec: StudySpec) -> list[str]:
    """The spec's goal at T (perplexity, FLOPs and KV thresholds): the best point of each method within it."""
    ok = [r for r in rows if r["method"] != "original" and r.get(f"flops_{T}", 1) <= spec.goal_flops
          and r.get(f"kv_{T}", 1) <= spec.goal_kv]
    out = [f"Goal at T = {T}: perplexity at most {spec.goal_ppl_ratio:g}x the original's ({original['ppl_val']:.2f}) "
           f"with at most {spec.goal_flops:.3g}x the attention FLOPs and {spec.goal_kv:.3g}x the KV entries. Best "
           "point of each method within that budget:", "",
           "| method | best point | ppl | × orig | FLOPs | KV | goal met |", "|---|---|---|---|---|---|---|"]
    best: dict[str, dict] = {}
    for r in ok:
        name = label(r)
        if name not in best or r["ppl_val"] < best[name]["ppl_val"]:
            best[name] = r
    for name, r in sorted(best.items(), key=lambda kv: kv[1]["ppl_val"]):
        ratio = r["ppl_val"] / original["ppl_val"]
        out.append(f"| {name} | `{r['key']}` | {r['ppl_val']:.2f} | {ratio:.2f} | {r[f'flops_{T}']:.3f} | "
                   f"{r[f'kv_{T}']:.3f} | {'yes' if ratio <= spec.goal_ppl_ratio else 'no'} |")
    return out


def family(row: dict) -> str:
    """The plot line of a point: its method and fill (routing and router init are points on that line)."""
    if row["method"] == "mosa":
        return f"MoSA, {row.get('fill') or 'zero'} fill" + (" (paper)" if (row.get("fill") or "zero") == "zero" else "")
    if row["method"] == "pruned":
        return f"pruned heads, {row.get('fill') or 'zero'} fill (baseline)"
    return f"{row['method']} heads (baseline)"


def plot_study(rows: list[dict], original: dict, path: Path, spec: StudySpec) -> None:
    """Perplexity ratio against attention FLOP ratio at the longest cost length, a panel per evaluation text.
    Without training: one line per method and fill, its lower envelope (the best perplexity at that compute or
    less) over dense counts, sparsities, routings and router inits (every point drawn faintly). Adapted points:
    large markers in their method's colour, joined to the same point before adaptation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = spec.cost_lengths[-1]
    panels = [("val", spec.data)] + ([("ood", spec.ood_data)] if spec.ood_data else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "original" and not (r.get("distill_steps") or r["steps"]):
            groups.setdefault(family(r), []).append(r)
    colours = {g: f"C{i}" for i, g in enumerate(sorted(groups))}
    by_key = {r["key"]: r for r in rows}
    for ax, (name, title) in zip(axes[0], panels):
        ratio = lambda p: p[f"ppl_{name}"] / original[f"ppl_{name}"]
        for g, pts in sorted(groups.items()):
            xs, ys = [p[f"flops_{T}"] for p in pts], [ratio(p) for p in pts]
            ax.scatter(xs, ys, color=colours[g], alpha=0.3, s=12)
            env_x, env_y, best = [], [], math.inf
            for x, y in sorted(zip(xs, ys)):
                if y < best:
                    best = y
                    env_x.append(x)
                    env_y.append(y)
            ax.plot(env_x, env_y, "--" if "baseline" in g else "-", marker="o", ms=4, color=colours[g], label=g)
        for r in rows:
            if not (r.get("distill_steps") or r["steps"]):
                continue
            colour = colours.get(family(r), "k")
            before = by_key.get(r["key"].split("@")[0])
            if before is not None:
                ax.plot([before[f"flops_{T}"], r[f"flops_{T}"]], [ratio(before), ratio(r)], ":", color=colour, lw=1)
            ax.scatter([r[f"flops_{T}"]], [ratio(r)], marker="*", s=160, color=colour, edgecolor="k", zorder=5,
                       label=f"{r['key']}: {_adaptation(r)}" if name == "val" else None)
        ax.axhline(1.05, color="gray", lw=0.8, ls=":")
        ax.axvline(1 / 3, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"attention FLOPs at T = {T}, relative to the original")
        ax.set_ylabel("perplexity / original perplexity")
        ax.set_title(f"{title} (original ppl {original[f'ppl_{name}']:.1f})")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].legend(fontsize=6.5, loc="upper left")
    fig.suptitle(f"MoSA retrofit of {spec.model}: perplexity kept vs attention compute (lines: best point at that "
                 "compute or less, no training; stars: adapted; dotted: 1.05x and 3x-lower FLOPs)", fontsize=8.5)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)


def machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()}")
