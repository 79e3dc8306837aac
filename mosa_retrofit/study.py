"""The retrofit study: how much perplexity a conversion keeps for how much attention compute and KV cache.

A sweep over (dense heads kept per layer) x (sparsity) x (routing) x (router init) x (fill), each point
converted from the same original model, scored on held-out in-domain text and on an out-of-domain text, costed
at several sequence lengths, and timed (forward + backward of one attention layer against the original layer).
At a given dense count every method keeps the *same* heads dense (the highest output energy on calibration
text, see calibration.py). Two baselines replace the other heads at equal compute (``MoSAConfig.sparse_heads``):

* ``local``: sliding-window heads whose window gives the same query-key pairs at the evaluation length as
  a MoSA head at that sparsity (``costs.equal_compute_window``); they still project every token;
* ``pruned``: the heads are removed (with fill='mean': replaced by their mean output, a mean-ablation).

Points named in ``StudySpec.adapt`` are also adapted by the ordinary recipe trainer (``adapt_distill_steps``
of layer distillation, then ``adapt_steps`` end-to-end steps of LM + distillation loss on ``adapt_trainable``),
then measured again.

Every finished point is appended to ``results.jsonl`` at once, so an interrupted study resumes where it
stopped (adaptation resumes from its last checkpoint); the Markdown table and the plot are rebuilt from it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .assets import resolve_model
from .calibration import collect_stats
from .compat import StopForward, without_cache
from .config import FILLS, ROUTER_INITS, ROUTINGS, MoSAConfig
from .costs import attention_costs, equal_compute_window, ratios
from .data import load_corpus
from .evaluate import PROTOCOL, nll
from .io import load
from .recipe import DataSpec, Recipe
from .surgery import attention_layers, convert_
from .train import train

METHODS = ("mosa", "local", "pruned")


def _fail(name: str, value, valid: str) -> None:
    raise ValueError(f"StudySpec.{name} must be {valid}, got {value!r}")


@dataclass(frozen=True)
class Point:
    """One converted model of the study (``method='original'`` is the unconverted reference)."""

    method: str
    dense: int | None = None
    sparsity: float | None = None
    routing: str | None = None
    init: str | None = None
    fill: str | None = None
    distill_steps: int = 0
    steps: int = 0

    @property
    def adapted(self) -> bool:
        return bool(self.distill_steps or self.steps)

    @property
    def key(self) -> str:
        """'mosa:3:8:causal:calibrated:mean', 'local:3:8', 'pruned:3:8:mean', 'original'; once adapted, '@A'
        (A end-to-end steps) or '@L+A' (L layer-distillation steps first)."""
        if self.method == "original":
            parts = []
        elif self.method == "mosa":
            parts = [self.dense, _num(self.sparsity), self.routing, self.init, self.fill]
        elif self.method == "pruned":
            parts = [self.dense, _num(self.sparsity), self.fill]
        else:
            parts = [self.dense, _num(self.sparsity)]
        base = ":".join([self.method, *map(str, parts)])
        if not self.adapted:
            return base
        return base + "@" + (f"{self.distill_steps}+" if self.distill_steps else "") + str(self.steps)

    @classmethod
    def parse(cls, key: str) -> Point:
        """Inverse of ``key`` (without the '@' suffix), validated with a clear message."""
        parts = key.split(":")
        try:
            method = parts[0]
            if (method == "mosa" and len(parts) == 6 and parts[3] in ROUTINGS and parts[4] in ROUTER_INITS
                    and parts[5] in FILLS):
                return cls("mosa", int(parts[1]), float(parts[2]), parts[3], parts[4], parts[5])
            if method == "pruned" and len(parts) == 4 and parts[3] in FILLS:
                return cls(method, int(parts[1]), float(parts[2]), fill=parts[3])
            if method == "local" and len(parts) == 3:
                return cls(method, int(parts[1]), float(parts[2]))
        except ValueError:
            pass
        raise ValueError(f"bad study point {key!r}: use 'mosa:DENSE:SPARSITY:ROUTING:INIT:FILL' (ROUTING in "
                         f"{ROUTINGS}, INIT in {ROUTER_INITS}, FILL in {FILLS}), 'local:DENSE:SPARSITY' or "
                         "'pruned:DENSE:SPARSITY:FILL'")

    def config(self, eval_length: int, dense_head_ids: dict | None = None) -> MoSAConfig:
        """The conversion; ``dense_head_ids`` (resolved once per dense count) makes every method keep the same
        heads, otherwise heads are scored by this point's own fill."""

        # the committed study's layout: single heads by output energy, one router per head, thresholds on the
        # calibration rows as given (the default conversion's KV groups are measured in docs/conversion.md)
        common = dict(sparsity=self.sparsity, dense_heads=self.dense, head_choice="scored", include_first=True,
                      dense_head_ids=dense_head_ids or {}, router_granularity="head", threshold_length=None)
        if self.method == "mosa":
            return MoSAConfig(**common, routing=self.routing, router_init=self.init, fill=self.fill,
                              router_score="straight_through")
        if self.method == "local":
            return MoSAConfig(**common, sparse_heads="local",
                              local_window=equal_compute_window(eval_length, self.sparsity))
        return MoSAConfig(**common, sparse_heads="pruned", fill=self.fill)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class StudySpec:
    """What the study sweeps and how it measures (defaults: the committed SmolLM2 study)."""

    model: str = "smollm2-135m"
    dense_heads: tuple = (1, 3, 6)
    sparsity: tuple = (2, 4, 8, 16)
    routing: tuple = ROUTINGS
    router_init: tuple = ROUTER_INITS
    fill: tuple = ("mean",)
    """What MoSA and pruned heads write at tokens they skip (MoSAConfig.fill): 'zero' (the paper), 'mean'."""
    baselines: tuple = ("local", "pruned")
    data: str = PROTOCOL.data
    """In-domain text: training / calibration documents, and the last ``validation_documents`` held out."""
    validation_documents: int = PROTOCOL.validation_documents
    ood_data: str | None = "shakespeare-offline"
    """Out-of-domain check (None: skip): its last ``ood_documents`` documents."""
    ood_documents: int = 2
    eval_length: int = PROTOCOL.block_size
    """Tokens per evaluation block (and per training sequence when adapting); the defaults of ``data``,
    ``validation_documents``, ``eval_length`` and ``eval_tokens`` are the evaluation protocol's."""
    eval_tokens: int = PROTOCOL.tokens
    ood_tokens: int = 2048
    calibration_sequences: int = 8
    calibration_length: int = 512
    cost_lengths: tuple = (2048, 8192)
    time_length: int = 2048
    """Sequence length of the forward+backward timing of one attention layer (1 thread)."""
    time_repeats: int = 3
    adapt: tuple = ()
    """Point keys (``Point.key`` without '@') adapted by the recipe trainer: ``adapt_distill_steps`` steps of
    layer distillation (attention weights, routers, fills), then ``adapt_steps`` end-to-end steps (LM +
    distillation to the original's logits, attention weights)."""
    adapt_distill_steps: int = 0
    adapt_distill_lr: float = 1e-3
    adapt_steps: int = 0
    adapt_lr: float = 1e-3
    adapt_trainable: str = "attention"
    """What the end-to-end steps train: 'attention' (converted layers' weights, routers, fills) or 'all'."""
    adapt_batch: int = 2
    """Sequences of ``eval_length`` tokens per optimizer step."""
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self):
        for name in ("dense_heads", "sparsity", "routing", "router_init", "fill", "baselines", "cost_lengths", "adapt"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.dense_heads):
            _fail("dense_heads", self.dense_heads, "integers >= 0")
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 1 for s in self.sparsity):
            _fail("sparsity", self.sparsity, "numbers >= 1")
        for name, valid in (("routing", ROUTINGS), ("router_init", ROUTER_INITS), ("fill", FILLS),
                            ("baselines", ("local", "pruned"))):
            bad = [v for v in getattr(self, name) if v not in valid]
            if bad:
                _fail(name, bad, f"a subset of {valid}")
        for name in ("validation_documents", "ood_documents", "eval_length", "eval_tokens", "ood_tokens",
                     "calibration_sequences", "calibration_length", "time_length", "time_repeats", "adapt_batch",
                     "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "an integer >= 1")
        if self.eval_tokens < self.eval_length or self.ood_tokens < self.eval_length:
            _fail("eval_tokens", (self.eval_tokens, self.ood_tokens), f">= eval_length = {self.eval_length}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 2 for t in self.cost_lengths):
            _fail("cost_lengths", self.cost_lengths, "integers >= 2")
        for name in ("adapt_steps", "adapt_distill_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail(name, v, "an integer >= 0")
        for key in self.adapt:
            Point.parse(key)
        if self.adapt and not (self.adapt_steps or self.adapt_distill_steps):
            _fail("adapt_steps", self.adapt_steps, "> 0 (or adapt_distill_steps > 0) when points to adapt are named")
        if self.adapt_trainable not in ("attention", "all"):
            _fail("adapt_trainable", self.adapt_trainable, "'attention' or 'all'")
        for name in ("adapt_lr", "adapt_distill_lr"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "> 0")

    def points(self) -> list[Point]:
        """Every point at budget 0 (the original first), then the adapted ones."""
        pts = [Point("original")]
        for d in self.dense_heads:
            for s in self.sparsity:
                pts += [Point("mosa", d, float(s), r, i, f) for f in self.fill for r in self.routing
                        for i in self.router_init]
                pts += [Point(b, d, float(s), fill=f if b == "pruned" else None) for b in self.baselines
                        for f in (self.fill if b == "pruned" else (None,))]
        pts += [dataclasses_replace(Point.parse(k), distill_steps=self.adapt_distill_steps, steps=self.adapt_steps)
                for k in self.adapt]
        return pts


def dataclasses_replace(p: Point, **kw) -> Point:
    return Point(**{**asdict(p), **kw})


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Workbench:
    """Everything shared by the points: the original model, token blocks, calibration statistics, timing."""

    spec: StudySpec
    model: nn.Module
    tokenizer: object
    blocks: dict  # name -> (N, T) validation blocks
    calibration: Tensor
    timing_ids: Tensor  # (1, time_length) real text: causal routing selects as many tokens as it would in use
    stats: dict | None = None  # calibration statistics of the original model (one pass serves every point)
    timing_call: tuple | None = None
    progress: bool = True

    def calibration_stats(self) -> dict:

        if self.stats is None:
            layers = {i: m for i, (_, m) in attention_layers(self.model).items()}
            self.stats = collect_stats(self.model, self.calibration, layers, self.progress)
        return self.stats

    def dense_ids(self, n: int) -> dict:
        """The heads every method keeps dense at ``n`` per layer: the n of highest output energy (mean fill)."""
        stats = self.calibration_stats()
        return {str(i): sorted(s.head_scores("mean").argsort(descending=True)[:n].tolist()) for i, s in stats.items()}

    def config(self, point: Point) -> MoSAConfig:
        return point.config(self.spec.eval_length, self.dense_ids(point.dense))

    def convert(self, point: Point) -> nn.Module:

        model = copy.deepcopy(self.model)
        return convert_(model, self.config(point), calibration=self.calibration, stats=self.calibration_stats(),
                        progress=False)

    def measure(self, model: nn.Module, point: Point, extra: dict | None = None) -> dict:

        row = {"key": point.key, **asdict(point)}
        for name, blocks in self.blocks.items():
            total, count = nll(model, blocks, self.spec.batch_size)
            row[f"ppl_{name}"] = math.exp(total / count)
        for T in self.spec.cost_lengths:
            row[f"flops_{T}"], row[f"kv_{T}"], row[f"kv_bytes_{T}"] = ratios(attention_costs(model, T))
        row["time_ratio"] = self.time_ratio(model) if point.method != "original" else 1.0
        if point.method == "local":
            row["window"] = point.config(self.spec.eval_length).local_window
        row.update(extra or {})
        return row

    def time_ratio(self, model: nn.Module, layer: int = 0) -> float:
        """Median over repeats of (converted / original) forward+backward time of attention layer ``layer``,
        one thread, both timed back to back on the same captured inputs (T = spec.time_length)."""

        if self.timing_call is None:
            self.timing_call = capture_attention_call(self.model, layer, self.timing_ids)
        args, kwargs = self.timing_call
        original = attention_layers(self.model)[layer][1]
        converted = attention_layers(model)[layer][1]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fwd_bwd(original, args, kwargs), fwd_bwd(converted, args, kwargs)  # warm-up
            ratios = [fwd_bwd(converted, args, kwargs) / fwd_bwd(original, args, kwargs)
                      for _ in range(self.spec.time_repeats)]
        finally:
            torch.set_num_threads(threads)
        return statistics.median(ratios)


def capture_attention_call(model: nn.Module, layer: int, ids: Tensor) -> tuple[tuple, dict]:
    """The (args, kwargs) the model passes to attention layer ``layer`` for token ids (1, T)."""

    module = attention_layers(model)[layer][1]
    seen = {}

    def hook(mod, args, kwargs):
        seen["call"] = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args),
                        {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()})
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    args, kwargs = seen["call"]
    return args, without_cache(kwargs)


def fwd_bwd(module: nn.Module, args: tuple, kwargs: dict) -> float:
    """Seconds for one forward + backward (to the input and every weight) of an attention module."""
    kwargs = dict(kwargs)
    name = "hidden_states" if "hidden_states" in kwargs else None
    x = (kwargs[name] if name else args[0]).detach().requires_grad_(True)
    if name:
        kwargs[name] = x
    else:
        args = (x, *args[1:])
    params = [p for p in module.parameters() if p.requires_grad]
    was_training = module.training
    module.eval()  # no dropout, no threshold tracking: the timed step changes nothing
    try:
        t0 = time.perf_counter()
        out = module(*args, **kwargs)[0]
        torch.autograd.grad(out, [x, *params], grad_outputs=torch.ones_like(out), allow_unused=True)
        return time.perf_counter() - t0
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------------------------- running


def open_workbench(spec: StudySpec, progress: bool = True) -> Workbench:
    from transformers import AutoModelForCausalLM, AutoTokenizer


    source = resolve_model(spec.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa").eval()
    n_cal = spec.calibration_sequences * spec.calibration_length
    corpus = load_corpus(DataSpec(source=spec.data, block_size=spec.eval_length,
                                  validation_documents=spec.validation_documents, validation_tokens=spec.eval_tokens + 1,
                                  max_train_tokens=n_cal + spec.time_length + spec.eval_length), tokenizer,
                           progress=False)
    blocks = {"val": corpus.blocks("validation", spec.eval_length).long()}
    if spec.ood_data:
        ood = load_corpus(DataSpec(source=spec.ood_data, block_size=spec.eval_length,
                                   validation_documents=spec.ood_documents, validation_tokens=spec.ood_tokens + 1),
                          tokenizer, progress=False, validation_only=True)
        blocks["ood"] = ood.blocks("validation", spec.eval_length).long()
    calibration = corpus.train[:n_cal].long().view(spec.calibration_sequences, spec.calibration_length)
    timing = corpus.train[-spec.time_length:].long()[None]  # training text, away from the calibration tokens
    if timing.shape[1] < spec.time_length:
        raise ValueError(f"{spec.data} has {timing.shape[1]} training tokens, fewer than time_length = {spec.time_length}")
    return Workbench(spec, model, tokenizer, blocks, calibration, timing, progress=progress)


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that point is simply measured again
            continue
    return rows


def run_study(spec: StudySpec, out: str | Path, work: str | Path | None = None, progress: bool = True,
              command: str = "", say=print) -> list[dict]:
    """Measure every point of ``spec`` not yet in ``out/results.jsonl``; write study.md and study.png."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work is not None else out / "adapt"
    results_file = out / "results.jsonl"
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    done = {r["key"]: r for r in read_results(results_file)}
    if results_file.exists() and len(results_file.read_text().splitlines()) != len(done):  # cut lines: drop them
        tmp = out / ".results.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
        os.replace(tmp, results_file)
    todo = [p for p in spec.points() if p.key not in done]
    say(f"study: {len(spec.points())} points, {len(done)} already measured in {results_file}")
    if todo:
        bench = open_workbench(spec, progress)
        bar = tqdm(todo, desc="study", unit="point", disable=not progress)
        for point in bar:
            bar.set_postfix_str(point.key)
            t0 = time.perf_counter()
            if point.method == "original":
                row = bench.measure(bench.model, point)
            elif point.adapted:
                row = adapt_point(bench, point, work / point.key.replace(":", "_").replace("@", "_"), progress)
            else:
                row = bench.measure(bench.convert(point), point)
            row["seconds"] = time.perf_counter() - t0
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[point.key] = row
            say(format_row(row, done.get("original")))
    rows = [done[p.key] for p in spec.points() if p.key in done]
    write_report(rows, spec, out, command)
    return rows


def adapt_point(bench: Workbench, point: Point, work: Path, progress: bool) -> dict:
    """Convert and adapt ``point`` with the recipe trainer, then measure the adapted model."""

    spec = bench.spec
    mosa = bench.config(point).to_dict()
    stages = []
    if point.distill_steps:
        stages.append({"name": "layer_distill", "kind": "layer_distill", "steps": point.distill_steps,
                       "lr": spec.adapt_distill_lr, "trainable": "attention"})
    if point.steps:
        stages.append({"name": "adaptation", "kind": "adaptation", "steps": point.steps, "lr": spec.adapt_lr,
                       "trainable": spec.adapt_trainable, "lm_weight": 1.0, "kd_weight": 1.0})
    recipe = Recipe.from_dict({
        "output_dir": str(work), "seed": spec.seed,
        "model": {"name_or_path": spec.model, "dtype": "float32", "attn_implementation": "sdpa"},
        "conversion": {"mosa": mosa, "calibration_sequences": spec.calibration_sequences,
                       "calibration_length": spec.calibration_length},
        "data": {"source": spec.data, "block_size": spec.eval_length,
                 "validation_documents": spec.validation_documents, "validation_tokens": spec.eval_length + 1},
        "stages": stages,
        "optimizer": {"lr": spec.adapt_lr, "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0},
        "schedule": {"warmup_fraction": 0.05, "min_lr_ratio": 0.1},
        "training": {"micro_batch_size": spec.adapt_batch},
        "checkpointing": {"every": 20, "keep_last": 1},
        "logging": {"every": 5, "tensorboard": False, "plot": True},
        "evaluation": {"every": 0, "before_conversion": False},
    })
    if (work / "summary.json").exists() and (work / "final" / "config.json").exists():
        summary = json.loads((work / "summary.json").read_text())  # trained before the study was interrupted
    else:
        summary = train(recipe, resume=work.exists() and bool(ckpt.checkpoints(work)), progress=progress)
    model = load(str(work / "final"), dtype=torch.float32).eval()
    return bench.measure(model, point, {"adapt_tokens": summary["tokens"], "adapt_seconds": summary["elapsed_s"]})


# ---------------------------------------------------------------------------------------------- reporting


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


def write_report(rows: list[dict], spec: StudySpec, out: Path, command: str) -> None:
    """study.md (header, goal check, table) and study.png, written atomically from ``rows``."""

    original = next((r for r in rows if r["method"] == "original"), None)
    text = render_markdown(rows, original, spec, command)
    tmp = out / ".study.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "study.md")
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
        lines += _goal_lines(rows, original, H) + [""]
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
                 _num(r["sparsity"]) if r["sparsity"] else "-", r["routing"] or "-", r["init"] or "-",
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


def _goal_lines(rows: list[dict], original: dict, T: int) -> list[str]:
    """The issue's goal at T: ppl within 5% with FLOPs >= 3x and KV >= 2x lower; best of each method there."""
    ok = [r for r in rows if r["method"] != "original" and r.get(f"flops_{T}", 1) <= 1 / 3 and r.get(f"kv_{T}", 1) <= 0.5]
    out = [f"Goal at T = {T}: perplexity within 5% of the original ({original['ppl_val']:.2f}) with attention FLOPs "
           f"≥ 3x and KV entries ≥ 2x lower. Best point of each method within that budget:", "",
           "| method | best point | ppl | × orig | FLOPs | KV | goal met |", "|---|---|---|---|---|---|---|"]
    best: dict[str, dict] = {}
    for r in ok:
        name = label(r)
        if name not in best or r["ppl_val"] < best[name]["ppl_val"]:
            best[name] = r
    for name, r in sorted(best.items(), key=lambda kv: kv[1]["ppl_val"]):
        ratio = r["ppl_val"] / original["ppl_val"]
        out.append(f"| {name} | `{r['key']}` | {r['ppl_val']:.2f} | {ratio:.2f} | {r[f'flops_{T}']:.3f} | "
                   f"{r[f'kv_{T}']:.3f} | {'yes' if ratio <= 1.05 else 'no'} |")
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
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
