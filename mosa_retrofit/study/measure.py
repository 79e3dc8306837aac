"""Running the study: the shared workbench (model, text, calibration), measuring and adapting points, results.jsonl."""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import output_lock, write_atomic
from ..convert.calibration import collect_stats
from ..convert.compat import StopForward, without_cache
from ..convert.config import MoSAConfig
from ..convert.costs import attention_costs, ratios
from ..convert.hub import load_tokenizer
from ..convert.serialization import load
from ..convert.surgery import attention_layers, check_config, convert_
from ..eval.perplexity import nll
from ..text.assets import resolve_model
from ..text.data import DataSpec, load_corpus
from ..train import checkpoint as ckpt
from ..train.recipe import Recipe
from ..train.trainer import train
from ..validate import positions_of, within_positions
from .report import format_row, write_report
from .spec import Point, StudySpec


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
    from transformers import AutoModelForCausalLM


    source = resolve_model(spec.model)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa").eval()
    for point in spec.points():  # every point must fit the model before the first is measured
        if point.method != "original":
            check_config(model, point.config(spec.eval_length))
    for name in ("eval_length", "calibration_length", "time_length"):
        within_positions(f"study.{name}", getattr(spec, name), positions_of(model.config), spec.model)
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
    out = Path(out)
    with output_lock(out, "--out"):  # a second study into the same folder stops in one line
        return _run_study(spec, out, work, progress, command, say)


def _run_study(spec: StudySpec, out: Path, work, progress: bool, command: str, say) -> list[dict]:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work is not None else out / "adapt"
    results_file = out / "results.jsonl"
    write_atomic(out / "spec.json", json.dumps(asdict(spec), indent=1) + "\n")
    done = {r["key"]: r for r in read_results(results_file)}
    if results_file.exists() and len(results_file.read_text().splitlines()) != len(done):  # cut lines: drop them
        write_atomic(results_file, "".join(json.dumps(r) + "\n" for r in done.values()))
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
