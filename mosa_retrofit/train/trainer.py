"""Recipe-driven continued pretraining of a converted model, on accelerate.

``train(recipe)`` loads the original model (the teacher: frozen, no gradients, loaded once), converts a copy
(the student) as ``recipe.conversion`` says, and runs ``recipe.stages`` in order:
  * ``router_warmup``: the model runs without autograd; each router learns its layer's dense attention
    mass (warmup.py). With several processes the router gradients are averaged with ``accelerator.reduce``.
  * ``layer_distill``: each converted attention layer learns to reproduce the teacher's layer output on the
    teacher's inputs (distill.py); gradients averaged across processes the same way.
  * ``adaptation``: LM loss + optional KL distillation to the teacher's logits; the model is wrapped by
    ``accelerator.prepare`` (DDP with several processes; ``accelerate launch`` starts them).
Every step reads a global batch of micro × processes × accumulation blocks fixed by data.BlockSchedule.
Checkpoints (checkpoint.py) hold everything a step depends on, so ``resume=True`` continues bit-exactly.
Outputs in ``recipe.output_dir``: checkpoints, metrics.jsonl, TensorBoard events (when installed),
loss.png, summary.json / summary.md and the final converted model in ``final/`` (``mosa_retrofit.load``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..atomic import atomic_folder, output_lock, write_atomic
from ..convert.compat import enable_activation_checkpointing
from ..convert.config import MoSAConfig
from ..convert.costs import cost_ratios
from ..convert.families import mosa_layers
from ..convert.hub import load_tokenizer, read_config
from ..convert.layer_state import layer_state
from ..convert.serialization import load, rebuild_
from ..convert.surgery import convert_, meta_twin
from ..convert.thresholds import RoutingStatePool
from ..eval.long_context import answer_correct, context_documents, context_perplexity
from ..eval.perplexity import nll
from ..eval.plots import plot_losses
from ..text.assets import model_reference, resolve_model, shakespeare_plays
from ..text.data import BlockSchedule, as_blocks, load_corpus
from ..text.needles import needle_batch
from ..text.prompts import passkey_prompt
from ..text.protocol import PROTOCOL
from ..validate import positions_of, within_positions
from . import checkpoint as ckpt
from . import sharding
from .recipe import CONTROL_SUFFIX, Recipe, StageSpec
from .stages import STAGES
from .trainable import apply_lora, control_trainable, head_masks, merge_lora, remove_hooks, select_trainable


def lr_factor(step: int, steps: int, warmup_fraction: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine from 1 to ``min_ratio``."""
    warm = int(round(warmup_fraction * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(recipe: Recipe, resume: bool = False, progress: bool = True,
          interrupt: Callable[[str, int], None] | None = None) -> dict:
    """Run ``recipe``; returns the summary. ``interrupt(stage, step)`` is called mid-step (tests use it to
    simulate a crash after the backward pass and before the optimizer step). The main process holds
    output_dir's writer lock for the run: a second run into the same folder stops at once, in one line."""
    main = int(os.environ.get("RANK", "0")) == 0
    with output_lock(recipe.output_dir, "output_dir") if main else contextlib.nullcontext():
        return Trainer(recipe, resume=resume, progress=progress, interrupt=interrupt).run()

logger = logging.getLogger("mosa_retrofit")


@dataclass
class RunState:
    """Where a run is: saved as ``state.json`` in every checkpoint, read back on ``--resume``."""

    stage: int = 0  # index of the stage running (len(stages): done)
    step: int = 0  # optimizer steps taken in that stage
    samples: int = 0  # training sequences consumed by the whole run (the data position)
    global_step: int = 0  # optimizer steps over all stages
    elapsed: float = 0.0  # seconds of the run so far
    peft: bool = False  # LoRA adapters are on the model (a LoRA stage is running)
    stages: list = field(default_factory=list)  # [{"name", "kind"}] of the recipe that wrote the state
    evals: list = field(default_factory=list)  # [{"name", "ppl", "global_step", ...}] the summary's rows
    stage_log: dict = field(default_factory=dict)  # stage name -> {"tokens", "time"}
    mosa: dict | None = None  # the resolved conversion (config.mosa) of the student
    recipe: dict | None = None  # the recipe that started the run (a resume must not change its weights)
    processes: int = 1  # how many processes wrote the state (a resume may use another count, same global batch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"checkpoint state has unknown fields {unknown}: written by another mosa_retrofit?")
        return cls(**data)


RUN_MARKER = ".mosa_retrofit-run"
"""Written into output_dir when a run starts: the folder is the tool's (it may reuse it), not the user's."""


def check_output_dir(out: Path, resume: bool) -> None:
    """A fresh run writes into a new or empty folder, or one an earlier run of this tool started and left
    without a checkpoint; never a symlink or a folder of the user's files. A resumed run needs a checkpoint."""
    if out.is_symlink():
        raise ValueError(f"output_dir {out} is a symlink (to {out.resolve()}); give the folder itself")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; choose a folder")
    if resume or not out.exists():
        return
    if ckpt.checkpoints(out) or (out / "final").exists():
        raise ValueError(f"output_dir {out} already holds a run; resume it with --resume or choose another "
                         "output_dir")
    theirs = sorted(p.name for p in out.iterdir() if p.name != RUN_MARKER)
    if theirs and not (out / RUN_MARKER).exists():
        raise ValueError(f"output_dir {out} holds files this tool did not write ({', '.join(theirs[:3])}"
                         f"{', ...' if len(theirs) > 3 else ''}); choose a new or empty folder")


@dataclass
class _StageRun:
    """What one stage's steps work with (Trainer._stage_setup)."""
    model: nn.Module  # the student (with LoRA when the stage has it)
    net: nn.Module  # the model as the steps call it (DDP-wrapped unless local or sharded)
    kind: object  # the stage kind (stages.STAGES): its loss and context
    opt: torch.optim.Optimizer
    sched: object
    params: list  # every trainable parameter
    masked: list  # (parameter, rows) of MoSA slices: hooks removed at the stage's end
    masks: list  # sharded: (parameter, local rows) applied by hand
    batch: int  # blocks per optimizer step, all processes


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = False, progress: bool = True,
                 interrupt: Callable[[str, int], None] | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.recipe, self.progress, self.interrupt = recipe, progress, interrupt
        self.out = Path(recipe.output_dir)
        check_output_dir(self.out, resume)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        multi_cpu = world > 1 and not torch.cuda.is_available()  # accelerate runs CPU processes (gloo) only if told
        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") != recipe.training.mixed_precision and world == 1:
            AcceleratorState._reset_state()  # a second run in this process with another precision
        self.acc = Accelerator(mixed_precision=recipe.training.mixed_precision, cpu=multi_cpu)
        self.resume_from, damaged = ckpt.usable(self.out) if resume else (None, [])
        if resume and self.resume_from is None:
            raise ValueError(f"--resume: nothing to resume in {self.out} (no checkpoint"
                             f"{'; the run finished, its model is in final/' if (self.out / 'final').exists() else ''})"
                             "; run without --resume to start a new run")
        self.acc.wait_for_everyone()  # every process has chosen before the damaged ones are moved
        if damaged and self.acc.is_main_process:
            ckpt.set_aside(damaged)
        self.log_file = self.out / "metrics.jsonl"
        self.tb = None
        self.fsdp = recipe.training.distributed == "fsdp" and self.acc.num_processes > 1
        self.sharded = False  # FSDP: sharding starts at the first shardable stage (stages.py)
        # FSDP without layer-distillation stages shards before anything else: only the main process reads the
        # checkpoint, the others build on the meta device and receive their shards (one copy per node)
        self.lean = self.fsdp and not any(s.kind == "layer_distill" for s in recipe.stages)
        self.lora_on = False  # LoRA adapters are on the student
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------ plumbing

    def say(self, text: str) -> None:
        if self.acc.is_main_process and self.progress:
            from tqdm.auto import tqdm

            tqdm.write(text)

    def log(self, record: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "global_step"):
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, record["global_step"])

    def _open_logs(self, global_step: int) -> None:
        if not self.acc.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / RUN_MARKER).touch()
        for tmp in self.out.glob(".tmp-final-*"):  # a final/ half-written when an earlier run was SIGKILLed
            shutil.rmtree(tmp, ignore_errors=True)
        old = self.out / ".old-final"  # killed while replacing final/: the old one back, or away
        if old.exists():
            if (self.out / "final").exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, self.out / "final")
        if self.log_file.exists():  # drop records written after the checkpoint we resume from
            kept = [line for line in self.log_file.read_text().splitlines()
                    if line and json.loads(line)["global_step"] <= global_step]
            write_atomic(self.log_file, "".join(line + "\n" for line in kept))
        if self.recipe.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=global_step + 1)
            except ImportError:
                self.say("TensorBoard is not installed: logging to metrics.jsonl only")

    # ------------------------------------------------------------------------------------ models and data

    def _load_models(self):
        from transformers import AutoModelForCausalLM

        r = self.recipe
        dtype = getattr(torch, r.model.dtype)
        source = resolve_model(r.model.name_or_path)
        opts = dict(dtype=dtype, attn_implementation=r.model.attn_implementation)
        tokenizer = load_tokenizer(source)
        reads = not self.lean or self.acc.is_main_process  # (lean FSDP: the others build on the meta device)

        def base_model(path: str) -> nn.Module:
            if reads:
                return AutoModelForCausalLM.from_pretrained(path, **opts)
            with torch.device("meta"):  # (from_config may keep the config's own dtype: set the one asked for)
                return AutoModelForCausalLM.from_config(read_config(path), **opts).to(dtype)

        if r.conversion is None:  # an already converted model; its base is the teacher
            saved = getattr(read_config(source), "mosa", None) or {}
            base = saved.get("base_model_name_or_path")
            if base is None:
                raise ValueError(f"{r.model.name_or_path} has no base_model_name_or_path to use as teacher")
            teacher = base_model(resolve_model(base))
            student = load(source, **opts) if reads else rebuild_(copy.deepcopy(teacher), MoSAConfig.from_dict(saved))
        else:
            teacher = base_model(source)
            if getattr(teacher.config, "mosa", None):
                raise ValueError(f"{r.model.name_or_path} is already converted; set conversion: null to adapt it")
            student = None
        teacher.requires_grad_(False).eval()
        return tokenizer, teacher, student

    def _convert(self, teacher: nn.Module, corpus, mosa: MoSAConfig | None) -> nn.Module:
        """A converted copy of the teacher: with calibration (fresh run) or from a resolved structure (resume)."""

        student = copy.deepcopy(teacher).requires_grad_(True).train()
        if mosa is not None:
            return rebuild_(student, mosa)
        conv = self.recipe.conversion
        config = dataclasses.replace(conv.mosa, base_model_name_or_path=model_reference(self.recipe.model.name_or_path))
        calibration = None
        if config.uses_calibration:  # rows within the model's positions (the default 512 on a shorter model)
            length = min(conv.calibration_length, positions_of(teacher.config) or conv.calibration_length)
            if length < conv.calibration_length:
                self.say(f"calibration: rows of {length} tokens, the model's positions "
                         f"(conversion.calibration_length is {conv.calibration_length})")
            calibration = as_blocks(corpus.train[: conv.calibration_sequences * length], length).long()
        return convert_(student, config, calibration=calibration, progress=self.progress and self.acc.is_main_process,
                        tokenizer=getattr(self, "tokenizer", None))

    def _converted_on_main(self, teacher: nn.Module, corpus) -> nn.Module:
        """Lean FSDP: the main process converts (calibration and all), the others rebuild the structure it chose
        on the meta device."""
        import torch.distributed as dist

        student = self._convert(teacher, corpus, None) if self.acc.is_main_process else None
        chosen = [student.config.mosa if student is not None else None]
        dist.broadcast_object_list(chosen, src=0)
        return student if student is not None else self._convert(teacher, corpus, MoSAConfig.from_dict(chosen[0]))

    def _long_setup(self, tokenizer, positions: int | None) -> None:
        """The long-context checks' documents and prompts (the same for every model of the run)."""
        E = self.recipe.evaluation
        for name, values in (("evaluation.long_contexts", [L + SCORED for L in E.long_contexts]),
                             ("evaluation.passkey_lengths", E.passkey_lengths)):
            for L in values:
                within_positions(name, L, positions, self.recipe.model.name_or_path)
        self.long_docs, self.long_texts = [], []  # (the texts are never trained on: load_corpus excludes them)
        if E.long_contexts:
            for text in shakespeare_plays():  # the first plays long enough, in order
                docs = context_documents(tokenizer, [text], max(E.long_contexts), SCORED)
                if docs:
                    self.long_docs.append(docs[0])
                    self.long_texts.append(text)
                if len(self.long_docs) == E.long_documents:
                    break
            if not self.long_docs:
                raise ValueError(f"evaluation.long_contexts {E.long_contexts}: no play has {max(E.long_contexts) + SCORED} "
                                 "tokens; choose shorter contexts")
        depths = (0.25, 0.5, 0.75)
        self.passkeys = {(v, L): [passkey_prompt(tokenizer, L, depths[i % 3], random.Random(f"recipe-{v}-{L}-{i}"), v)
                                  for i in range(E.passkey_trials)]
                         for v in E.passkey_variants for L in E.passkey_lengths}

    def long_evaluate(self, model: nn.Module) -> dict:
        """{"long": {context: ppl}, "passkey": {variant: {length: keys found}}} of the recipe's long checks
        (every process runs them whole: a sharded model needs every process's forwards)."""
        E = self.recipe.evaluation
        if not E.long_checks:
            return {}
        from tqdm.auto import tqdm

        was = model.training
        show = self.progress and self.acc.is_main_process
        with self.acc.autocast():
            long = context_perplexity(model, self.long_docs, E.long_contexts, SCORED, progress=show) \
                if self.long_docs else {}
            found: dict = {}
            with tqdm(total=sum(map(len, self.passkeys.values())), desc="passkey", unit="key", disable=not show,
                      leave=False) as bar:
                for (v, L), prompts in self.passkeys.items():
                    hits = 0
                    for p in prompts:
                        hits += answer_correct(model, p)
                        bar.update(1)
                    found.setdefault(v, {})[str(L)] = hits
        model.train(was)
        return {"long": {str(L): v for L, v in long.items()}, "passkey": found}

    def evaluate(self, model: nn.Module) -> float:
        """Validation perplexity, the blocks sharded over processes."""

        world, rank, bs = self.acc.num_processes, self.acc.process_index, self.recipe.evaluation.batch_size
        mine = self.val_blocks[rank::world]
        with self.acc.autocast():
            total, count = nll(model, mine, bs)
            if sharding.is_sharded(model):  # as many forwards as the process with the most blocks
                most = -(-len(self.val_blocks) // world)
                sharding.idle_forwards(model, self.val_blocks[:1].to(self.acc.device).long(),
                                       -(-most // bs) - -(-len(mine) // bs))
        t = self.acc.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=self.acc.device), "sum")
        return math.exp(t[0].item() / t[1].item())

    # ------------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        """Load, read the data, start (or resume) the run state, then every stage; the summary."""
        from accelerate.utils import set_seed

        start = time.perf_counter()
        set_seed(self.recipe.seed)
        tokenizer, teacher, student = self._load_models()
        corpus = self._read_data(tokenizer, teacher)
        if not self.lean or self.acc.is_main_process:  # (lean FSDP: the others hold it on the meta device)
            teacher.to(self.acc.device)  # conversion runs where training does
        if self.resume_from is not None:
            state, student = self._resume(teacher, student, corpus)
        else:
            state, student = self._begin(teacher, student, corpus)
        self._ready(teacher, student, state)
        self.state.elapsed += time.perf_counter() - start
        for i in range(state.stage, len(self.recipe.stages)):
            self._run_stage(i, self.recipe.stages[i])
        return self._finish()

    def _read_data(self, tokenizer, teacher: nn.Module):
        """The long-context checks' texts (left out of training), the training blocks and their schedule, the
        held-out blocks; returns the corpus."""
        r, E = self.recipe, self.recipe.evaluation
        positions = positions_of(teacher.config)
        within_positions("data.block_size", r.data.block_size, positions, r.model.name_or_path)
        self.tokenizer = tokenizer
        self._long_setup(tokenizer, positions)
        corpus = load_corpus(r.data, tokenizer, progress=self.progress and self.acc.is_main_process,
                             exclude=self.long_texts)
        self.train_blocks = corpus.blocks("train", r.data.block_size)
        vb = E.block_size or min(PROTOCOL.block_size, positions or PROTOCOL.block_size, corpus.validation.numel())
        self.val_blocks = corpus.blocks("validation", vb)[: max((E.tokens or PROTOCOL.tokens) // vb, 1)]
        self.schedule = BlockSchedule(len(self.train_blocks), r.seed)
        self.protocol = (f"held-out perplexity: {self.val_blocks.numel():,} tokens of the last "
                         f"{corpus.validation_documents} documents of {r.data.source}, in blocks of {vb}")
        self.say(f"data: {len(self.train_blocks)} training blocks of {r.data.block_size} tokens "
                 f"({corpus.train_documents} documents"
                 + (f"; {corpus.excluded_documents} left out, the long-context checks score them"
                    if corpus.excluded_documents else "") + ")"
                 + (f"; {r.data.needles} keys and their questions inserted in every training block"
                    if r.data.needles else "") + f"; {self.protocol}")
        return corpus

    def _resume(self, teacher: nn.Module, student: nn.Module | None, corpus) -> tuple[RunState, nn.Module]:
        """The run state of ``resume_from`` (checked to continue that run) and the student holding its weights."""
        r, acc = self.recipe, self.acc
        state = RunState.from_dict(ckpt.read_state(self.resume_from))
        self._check_resumable(state)
        state.processes = acc.num_processes
        if student is None and r.control:
            student = copy.deepcopy(teacher).requires_grad_(True).train()
        elif student is None:
            student = self._convert(teacher, corpus, MoSAConfig.from_dict(state.mosa))
        if state.peft and not self.fsdp:  # (under FSDP: on the sharded model, at the stage's start)
            student = apply_lora(student, r.stages[state.stage].lora)
            self.lora_on = True
        if not ckpt.is_sharded(self.resume_from) and (not self.lean or acc.is_main_process):
            ckpt.load_model(self.resume_from, student)  # (sharded weights are read once the model is sharded)
        if self.lean:
            self._shard_and_fill(teacher, student)
        where = r.stages[state.stage].name if state.stage < len(r.stages) else "done"
        self.say(f"resuming from {self.resume_from} (stage {where}, step {state.step})")
        return state, student

    def _check_resumable(self, state: RunState) -> None:
        """The checkpoint's recipe must decide the weights as this one does (stages, what changes the weights,
        the global batch); otherwise one clear error."""
        r, acc = self.recipe, self.acc
        names = [s["name"] for s in state.stages]
        if names != [s.name for s in r.stages[: len(names)]] or len(names) != len(r.stages):
            raise ValueError(f"{self.resume_from} was written by a recipe with stages {names}; this recipe has "
                             f"{[s.name for s in r.stages]}")
        changed = r.changes(state.recipe) if state.recipe is not None else []
        if state.recipe is not None:
            t, tc = state.recipe["training"], r.training
            before = t["micro_batch_size"] * t["gradient_accumulation_steps"] * state.processes
            now = tc.micro_batch_size * tc.gradient_accumulation_steps * acc.num_processes
            if before != now:
                changed.append(f"global batch: {before} ({state.processes} processes x micro-batch "
                               f"{t['micro_batch_size']} x {t['gradient_accumulation_steps']} accumulation) -> "
                               f"{now} ({acc.num_processes} x {tc.micro_batch_size} x "
                               f"{tc.gradient_accumulation_steps}); keep processes x micro_batch_size x "
                               "gradient_accumulation_steps")
        if changed:
            raise ValueError(f"--resume: the recipe differs from the one that wrote {self.resume_from} in what "
                             f"decides the weights ({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}): "
                             "the resumed run would not continue that run; resume with the same recipe and "
                             "overrides, or start a new run in another output_dir (only output, logging, "
                             "evaluation and checkpointing may change)")

    def _begin(self, teacher: nn.Module, student: nn.Module | None, corpus) -> tuple[RunState, nn.Module]:
        """A new run: the original measured (when asked), the student converted (or, in a control run, a
        trainable copy of the original) and measured."""
        r, acc = self.recipe, self.acc
        if self.out.exists() and not ckpt.checkpoints(self.out):
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        state = RunState(stages=[{"name": s.name, "kind": s.kind} for s in r.stages], recipe=r.to_dict(),
                         processes=acc.num_processes)
        if self.lean:  # convert on the main process, then shard both and fill the others' shards
            if student is None:
                student = self._converted_on_main(teacher, corpus)
            self._shard_and_fill(teacher, student)
        if r.evaluation.before_conversion:
            self.say("measuring the original model ...")
            state.evals.append({"name": "original model", "ppl": self.evaluate(teacher), "global_step": 0,
                                **self.long_evaluate(teacher)})
        if r.control:
            self.say("control run: the original model trains, unconverted, on the blocks the converted run reads")
            return state, copy.deepcopy(teacher).requires_grad_(True).train()
        if student is None:
            student = self._convert(teacher, corpus, None)
        state.mosa = student.config.mosa
        if not self.lean:
            student.to(acc.device)
        self.say("measuring the converted model ...")
        state.evals.append({"name": "after conversion", "ppl": self.evaluate(student), "global_step": 0,
                            **self.long_evaluate(student)})
        return state, student

    def _ready(self, teacher: nn.Module, student: nn.Module, state: RunState) -> None:
        """The student on its device (activation checkpointing as asked), the teacher kept only while a stage
        distills, the logs opened with the measurements so far, and (a new run) the step-0 checkpoint."""
        r = self.recipe
        if not self.lean:
            student.to(self.acc.device)
        if r.training.gradient_checkpointing:
            enable_activation_checkpointing(student, {"use_reentrant": False})
        if not any(s.kd_weight > 0 or s.kind == "layer_distill" for s in r.stages[state.stage:]):
            teacher = None  # no longer needed: free it
        self.teacher, self.student, self.state = teacher, student, state
        self._open_logs(state.global_step)
        if self.resume_from is None:
            for e in state.evals:
                self.log({"split": "validation", "stage": e["name"], "step": 0, "global_step": 0,
                          "loss": math.log(e["ppl"]), "ppl": e["ppl"], "tokens": 0,
                          **{k: e[k] for k in ("long", "passkey") if k in e}})
        for e in state.evals:
            self.say(f"perplexity {e['name']}: {e['ppl']:.2f}" + (f"; {_long_line(e)}" if "long" in e else ""))
        if self.resume_from is None:
            self._save(None, None)

    def _cost_model(self) -> nn.Module:
        """The student as the cost tables read it: itself, or (sharded) its structure on the meta device."""
        model = self.acc.unwrap_model(self.student)
        return meta_twin(model) if self.sharded else model

    def _keep_head_masks(self, student: nn.Module) -> None:
        """Before sharding: the MoSA heads' rows of q/k/v/o, for ``trainable: mosa`` (read off whole parameters;
        on the meta device, off an empty copy of each attention module)."""
        if any(st.trainable == "mosa" for st in self.recipe.stages):
            for m in mosa_layers(student).values():
                whole = m if not any(p.is_meta for p in m.parameters()) else \
                    copy.deepcopy(m).to_empty(device="cpu")
                layer_state(m).head_masks = head_masks(whole)

    def _shard_and_fill(self, teacher: nn.Module, student: nn.Module) -> None:
        """Lean FSDP: shard student and teacher before anything else. The main process holds them whole (it read
        the checkpoint and converted), the others on the meta device; every process's shards and buffers are
        then filled from the main process's copy, which is freed: one whole copy per node, not per process."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        acc, main = self.acc, self.acc.is_main_process
        self._keep_head_masks(student)
        models = [student] + ([teacher] if teacher is not None else [])
        wholes, buffers = [], []
        for m in models:
            wholes.append(m.state_dict() if main else {})
            buffers.append({n: b.detach().clone() for n, b in m.named_buffers()} if main else {})  # non-persistent too
            if main:
                m.to("meta")  # the state dict above still holds the weights, until they are sent
                m.tie_weights()  # (moving to meta unties shared parameters; the others' models are tied)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for m, whole, bufs in zip(models, wholes, buffers):
            sharding.shard_(m)
            m.to_empty(device=acc.device)
            set_model_state_dict(m, whole, options=opts)
            with torch.no_grad():
                for name, b in m.named_buffers():
                    if main:
                        b.copy_(bufs[name])
                    dist.broadcast(b, src=0)
            whole.clear()
        # the main process drew random numbers reading and converting that the others skipped: from here on
        # every process draws as before (the same LoRA initialisation everywhere, as one process would)
        state = [ckpt.rng_state() if main else None]
        dist.broadcast_object_list(state, src=0)
        ckpt.set_rng_state(state[0])
        self.sharded = True
        self.say(f"FSDP: student{' and teacher' if teacher is not None else ''} read once, sharded over "
                 f"{acc.num_processes} processes per decoder layer")

    def _shard(self) -> None:
        """FSDP: shard student and teacher, once (a sharded checkpoint is read into them by ``load_training``)."""
        if self.fsdp and not self.sharded:
            self._keep_head_masks(self.student)
            sharding.shard_(self.student)
            if self.teacher is not None:
                sharding.shard_(self.teacher)
            self.sharded = True
            self.say(f"FSDP: student{' and teacher' if self.teacher is not None else ''} sharded over "
                     f"{self.acc.num_processes} processes, per decoder layer")

    def _save(self, optimizer, scheduler) -> None:
        s = self.state
        ckpt.save(self.acc, self.out, s.global_step, self.student, optimizer, scheduler, s.to_dict(),
                  self.recipe.checkpointing.keep_last)

    def _run_stage(self, i: int, stage: StageSpec) -> None:
        """One stage: its trainable parameters and optimizer, then steps (accumulate, sync, guard, apply) with the
        log / evaluation / checkpoint schedule after each, then the stage's end (LoRA merged, evaluated, saved)."""
        from tqdm.auto import tqdm

        r, s = self.recipe, self.state
        start_step = s.step if s.stage == i else 0
        s.stage, s.step = i, start_step
        if start_step >= stage.steps:  # the checkpoint was written at the end of this stage
            s.stage, s.step = i + 1, 0
            return
        if r.control and (STAGES[stage.kind].converted_only or (
                stage.lora is None and not control_trainable(self.student, stage.trainable))):
            self._pass_over(i, stage, start_step)
            return
        t_stage = time.perf_counter()
        live = self._stage_setup(stage, start_step)
        bar = tqdm(total=stage.steps, initial=start_step, desc=stage.name, unit="step",
                   disable=not (self.progress and self.acc.is_main_process), dynamic_ncols=True)
        live.net.train()
        with live.kind.context(), RoutingStatePool(live.model) as routing_state:
            for step in range(start_step, stage.steps):
                record = self._step(live, stage, step, routing_state)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                for callback in (self._log_every, self._evaluate_every, self._checkpoint_every):
                    callback(stage, step, start_step, record, live.opt, live.sched)
        bar.close()
        remove_hooks(live.masked)
        if stage.lora is not None:
            self.student = merge_lora(self.student)
            s.peft = self.lora_on = False
        self.student.requires_grad_(True)
        s.step = stage.steps
        self._eval_record(stage.name, stage.steps, f"after {stage.name}", long=self._long_at_end(i))
        self._save(None, None)
        self.say(f"stage {stage.name} done in {time.perf_counter() - t_stage:.0f} s")
        s.stage, s.step = i + 1, 0

    def _stage_setup(self, stage: StageSpec, start_step: int) -> _StageRun:
        """Sharding and LoRA as the stage needs, its trainable parameters, optimizer and schedule (restored
        mid-stage on resume), the stage kind's loss and the (wrapped) network."""
        r, acc, s = self.recipe, self.acc, self.state
        if STAGES[stage.kind].shardable:
            self._shard()  # before LoRA: the adapters stay whole on every process, their gradients averaged by hand
        if stage.lora is not None and not self.lora_on:
            self.student = apply_lora(self.student, stage.lora)
            s.peft = self.lora_on = True
        model = self.student
        if r.control:
            plain, masked = control_trainable(model, stage.trainable, lora=stage.lora is not None), []
        else:
            plain, masked = select_trainable(model, stage.trainable, lora=stage.lora is not None,
                                             hooks=not self.sharded)
        masks = [(p, sharding.local_mask(p, m)) for p, m in masked] if self.sharded else []  # applied by hand
        opt, sched, peak = self._optimizer(stage, plain, [p for p, _ in masked])
        kind = STAGES[stage.kind](stage, model, self.teacher, acc)
        net = model if (kind.local or self.sharded) else acc.prepare_model(model)
        if not self.sharded:
            opt = acc.prepare_optimizer(opt)
        if self.resume_from is not None:  # optimizer/scheduler mid-stage; RNG of every process
            ckpt.load_training(self.resume_from, opt if start_step > 0 else None, sched, acc.process_index, model)
            self.resume_from = None
        tc = r.training
        batch = tc.micro_batch_size * acc.num_processes * tc.gradient_accumulation_steps
        n_trainable = sum(int(p.numel()) for p in plain) + sum(int(m.sum()) for _, m in masked)
        s.stage_log.setdefault(stage.name, {"tokens": 0, "time": 0.0})["trainable"] = n_trainable
        self.say(f"stage {stage.name} ({stage.kind}): {stage.steps} steps, global batch {batch} x "
                 f"{r.data.block_size} tokens, {n_trainable:,} trainable parameters, peak lr {peak:g}")
        return _StageRun(model, net, kind, opt, sched, plain + [p for p, _ in masked], masked, masks, batch)

    def _step(self, live: _StageRun, stage: StageSpec, step: int, routing_state) -> dict:
        """One optimizer step of the stage; returns its training record."""
        s, tokens = self.state, live.batch * self.recipe.data.block_size
        t0 = time.perf_counter()
        totals = self._accumulate(live.net, live.kind)
        self._sync_gradients(live.params, live.masks, live.kind.local)
        if self.interrupt is not None:
            self.interrupt(stage.name, step)
        values, grad_norm = self._clip_and_guard(live.params, totals, stage, step)
        routing_state.commit(self._gather_rows if self.acc.num_processes > 1 else None)  # the global batch's
        lr = live.sched.get_last_lr()[0]
        live.opt.step()
        live.sched.step()
        live.opt.zero_grad(set_to_none=True)
        s.samples += live.batch
        s.step = step + 1
        s.global_step += 1
        dt = time.perf_counter() - t0
        s.elapsed += dt
        log = s.stage_log.setdefault(stage.name, {"tokens": 0, "time": 0.0})
        log["tokens"] += tokens
        log["time"] += dt
        return {"split": "train", "stage": stage.name, "step": step + 1, "global_step": s.global_step,
                **values, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / dt,
                "tokens": s.samples * self.recipe.data.block_size, "elapsed": s.elapsed}

    def _pass_over(self, i: int, stage: StageSpec, start_step: int) -> None:
        """Control run, a stage with nothing to train in the original: its steps' blocks are consumed without a
        step, so that every later stage reads the blocks the converted run reads, at the same global steps."""
        s, tc = self.state, self.recipe.training
        batch = tc.micro_batch_size * self.acc.num_processes * tc.gradient_accumulation_steps
        steps = stage.steps - start_step
        s.samples += batch * steps
        s.global_step += steps
        s.stage_log.setdefault(stage.name, {"tokens": 0, "time": 0.0})
        self.say(f"control: stage {stage.name} ({stage.kind}, trainable {stage.trainable}) trains nothing in the "
                 f"original model; its {steps} steps' {batch * steps} blocks are passed over")
        s.step = stage.steps
        self._eval_record(stage.name, stage.steps, f"after {stage.name}", long=self._long_at_end(i))
        self._save(None, None)
        s.stage, s.step = i + 1, 0

    def _long_at_end(self, i: int) -> bool:
        """The long-context checks close the last stage, and every stage when a learning curve is asked for."""
        return i == len(self.recipe.stages) - 1 or bool(self.recipe.evaluation.long_every)

    def _optimizer(self, stage: StageSpec, plain: list, masked: list):
        """AdamW over the stage's parameters (no weight decay on MoSA slices) and its warm-up + cosine schedule."""
        r = self.recipe
        groups = [{"params": plain, "weight_decay": r.optimizer.weight_decay}, {"params": masked, "weight_decay": 0.0}]
        peak = stage.lr if stage.lr is not None else r.optimizer.lr
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=peak, betas=tuple(r.optimizer.betas),
                                eps=r.optimizer.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: lr_factor(k, stage.steps, r.schedule.warmup_fraction, r.schedule.min_lr_ratio))
        return opt, sched, peak

    def _accumulate(self, net, kind) -> dict[str, Tensor]:
        """Forward and backward of one optimizer step's micro-batches (gradients accumulate; DDP syncs on the
        last); returns the loss parts averaged over them."""
        tc, acc, s = self.recipe.training, self.acc, self.state
        totals: dict[str, Tensor] = {}
        for m in range(tc.gradient_accumulation_steps):
            where = (s.samples, tc.micro_batch_size, m, acc.process_index, acc.num_processes)
            ids = self.train_blocks[self.schedule.micro_batch(*where)]
            ids, answers = needle_batch(ids, self.schedule.positions(*where), self.tokenizer,
                                        self.recipe.data.needles, self.recipe.seed)
            ids = ids.to(acc.device).long()
            answers = answers.to(acc.device) if answers is not None else None
            last = m == tc.gradient_accumulation_steps - 1
            if self.sharded:
                net.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if (kind.local or last or self.sharded) else acc.no_sync(net)
            with sync:
                loss, parts = kind.loss(net, ids, answers)
                acc.backward(loss / tc.gradient_accumulation_steps)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0) + v / tc.gradient_accumulation_steps
        return totals

    def _sync_gradients(self, params: list, masks: list, local: bool) -> None:
        """Gradients the wrappers do not average: layer-local losses on several processes and the whole (not
        sharded) parameters under FSDP, averaged here; then the frozen rows of MoSA slices zeroed."""
        acc, world = self.acc, self.acc.num_processes
        if (local and world > 1) or self.sharded:
            for p in params:
                if p.grad is None:
                    continue
                if not sharding.is_dtensor(p):
                    p.grad = acc.reduce(p.grad, "mean")
                elif local:  # a local loss gathered the shard: it holds the sum over processes
                    p.grad.div_(world)  # (in other stages FSDP's reduce-scatter averaged it)
        for p, mask in masks:
            if p.grad is not None:
                p.grad.mul_(mask)

    def _gather_rows(self, rows: Tensor) -> Tensor:
        """Every process's ``rows`` (n_p, E), concatenated (n_p may differ: padded for the collective)."""
        acc, world = self.acc, self.acc.num_processes
        sizes = acc.gather(torch.tensor([rows.shape[0]], device=rows.device)).tolist()
        longest = max(sizes)
        padded = torch.cat([rows, rows.new_zeros(longest - rows.shape[0], rows.shape[1])])
        every = acc.gather(padded.contiguous())  # (world · longest, E)
        return torch.cat([every[p * longest: p * longest + sizes[p]] for p in range(world)])

    def _clip_and_guard(self, params: list, totals: dict, stage: StageSpec, step: int) -> tuple[dict, Tensor]:
        """Clip the gradient norm; stop before anything is applied if the loss or the norm is not finite."""
        r, acc = self.recipe, self.acc
        if r.optimizer.grad_clip is not None and self.sharded:
            grad_norm = torch.tensor(sharding.clip_grad_norm_(params, r.optimizer.grad_clip))
        elif r.optimizer.grad_clip is not None:
            grad_norm = acc.clip_grad_norm_(params, r.optimizer.grad_clip)
        else:
            grad_norm = torch.tensor(float("nan"))
        values = {k: acc.reduce(v.detach(), "mean").item() for k, v in totals.items()}
        if not all(math.isfinite(v) for v in values.values()) or (
                r.optimizer.grad_clip is not None and not math.isfinite(float(grad_norm))):
            raise ValueError(
                f"training diverged in stage {stage.name} at step {step + 1}: loss {values['loss']}, gradient "
                f"norm {float(grad_norm)}; nothing from this step was applied or saved (lower the learning "
                f"rate, then --resume from the last checkpoint)")
        return values, grad_norm

    # -- after each step: the schedule, one small callback each
    def _log_every(self, stage: StageSpec, step: int, start_step: int, record: dict, opt, sched) -> None:
        if (step + 1) % self.recipe.logging.every == 0 or step == start_step or step + 1 == stage.steps:
            self.log(record)

    def _evaluate_every(self, stage: StageSpec, step: int, start_step: int, record: dict, opt, sched) -> None:
        E = self.recipe.evaluation
        long = bool(E.long_every) and (step + 1) % E.long_every == 0
        if ((E.every and (step + 1) % E.every == 0) or long) and step + 1 < stage.steps:
            self._eval_record(stage.name, step + 1, None, long=long)

    def _checkpoint_every(self, stage: StageSpec, step: int, start_step: int, record: dict, opt, sched) -> None:
        if self.state.global_step % self.recipe.checkpointing.every == 0 and step + 1 < stage.steps:
            self._save(opt, sched)

    def _eval_record(self, stage: str, step: int, name: str | None, long: bool = False) -> None:
        """Validation perplexity (and with ``long`` the long-context checks) logged; with a ``name``, also a row
        of the summary."""
        s = self.state
        ppl = self.evaluate(self.student)
        extra = self.long_evaluate(self.student) if long else {}
        self.log({"split": "validation", "stage": stage, "step": step, "global_step": s.global_step,
                  "loss": math.log(ppl), "ppl": ppl, "tokens": s.samples * self.recipe.data.block_size, **extra})
        if name is not None:
            s.evals.append({"name": name, "ppl": ppl, "global_step": s.global_step,
                            "tokens": s.stage_log.get(stage, {}).get("tokens", 0),
                            "time": s.stage_log.get(stage, {}).get("time", 0.0), **extra})
        self.say(f"validation perplexity ({stage}, step {step}): {ppl:.2f}"
                 + (f"; {_long_line(extra)}" if extra else ""))

    # ------------------------------------------------------------------------------------ the end

    def _finish(self) -> dict:
        acc, s, r = self.acc, self.state, self.recipe
        acc.wait_for_everyone()
        try:
            import resource  # (Unix: the peak resident memory of this process, KiB on Linux)

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        except ImportError:
            rss = float("nan")
        peak = torch.tensor([rss], device=acc.device)
        summary = {"output_dir": str(self.out), "evals": s.evals, "elapsed_s": s.elapsed,
                   "wall_s": time.perf_counter() - self.started,
                   "tokens": s.samples * r.data.block_size,  # read (a control passes some over untrained)
                   "trained_tokens": sum(v["tokens"] for v in s.stage_log.values()), "processes": acc.num_processes,
                   "evaluation": self.protocol, "control": r.control,
                   "peak_host_memory_mib": [round(float(v), 1) for v in acc.gather(peak).cpu()]}  # per process
        converted = next((e for e in s.evals if e["name"] == "after conversion"), None)
        if converted is not None and s.evals[-1] is not converted and s.evals[-1]["ppl"] > converted["ppl"]:
            summary["warning"] = (f"validation perplexity ended at {s.evals[-1]['ppl']:.2f}, worse than right after "
                                  f"conversion ({converted['ppl']:.2f}): training made the model worse (lower the "
                                  "learning rate?)")
            if acc.is_main_process:
                logger.warning("mosa_retrofit: %s", summary["warning"])
        if s.mosa is not None:
            cost = cost_ratios(self._cost_model(), COST_LENGTH)
            summary["costs"] = {"length": COST_LENGTH, "flops": cost.flops, "kv_bytes": cost.kv_bytes}
        if r.evaluation.long_checks:
            E = r.evaluation
            summary["long_protocol"] = (f"long: the final {SCORED} tokens of {len(self.long_docs)} Shakespeare play(s) given "
                                        f"the context before them; passkey: {E.passkey_trials} keys per length "
                                        "(depths 25/50/75 %), teacher forced")
        if self.resume_from is not None and ckpt.is_sharded(self.resume_from):  # resumed after the last stage
            self._shard()
            ckpt.load_training(self.resume_from, None, None, acc.process_index, self.student)
        full = sharding.full_state_dict(self.student) if self.sharded else None  # collective
        if acc.is_main_process:
            final = self.out / "final"
            with atomic_folder(final, prefix=".tmp-final-") as tmp:  # final/ is the old model or the new one
                model = acc.unwrap_model(self.student)
                model.save_pretrained(tmp, **({"state_dict": full} if full is not None else {}))
                self.tokenizer.save_pretrained(tmp)
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=1))
            table = summary_table(summary, sibling_summary(self.out, r.control))
            write_atomic(self.out / "summary.md", table + "\n")
            if r.logging.plot:
                plot_losses(self.log_file, self.out / "loss.png")
            if self.tb is not None:
                self.tb.close()
            self.say("\n" + table + f"\n\nfinal model: {final} (load with mosa_retrofit.load)")
        acc.wait_for_everyone()
        return summary


COST_LENGTH = 8192
"""The sequence length at which a run's summary states the converted model's attention FLOPs and KV bytes."""

SCORED = 256
"""Long-document perplexity scores each play's final SCORED tokens, given ``evaluation.long_contexts`` before them."""

def sibling_summary(out: Path, control: bool) -> dict | None:
    """The other half of a converted run and its control (output_dir and output_dir + '-control'), if written."""
    other = Path(str(out).removesuffix(CONTROL_SUFFIX)) if control else Path(str(out) + CONTROL_SUFFIX)
    try:
        return json.loads((other / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _long_line(e: dict) -> str:
    parts = [f"long {L} ppl {v:.2f}" for L, v in e.get("long", {}).items()]
    parts += [f"passkey {v} " + " · ".join(str(n) for n in found.values()) for v, found in e.get("passkey", {}).items()]
    return ", ".join(parts)


def summary_rows(summary: dict, sibling: dict | None = None) -> list[dict]:
    """The summary's rows, then the sibling run's last row (the control beside the converted run, or the
    converted run beside its control), renamed to say which run it is."""
    rows = list(summary["evals"])
    if sibling is not None and sibling.get("evals"):
        last = dict(sibling["evals"][-1])
        if sibling.get("control"):
            last["name"] = f"control: original, {last['name']}"
        else:
            last["name"] = f"converted, {last['name']}"
        rows.append(last)
    return rows


def summary_table(summary: dict, sibling: dict | None = None) -> str:
    """Markdown: every row's held-out perplexity, long-context checks (each × the original's where measured),
    training tokens and wall time; then the converted model's costs, the run's tokens and wall time."""
    rows = summary_rows(summary, sibling)
    base = next((e for e in rows if e["name"] == "original model"), None)
    contexts = sorted({L for e in rows for L in e.get("long", {})}, key=int)
    variants = {v: sorted({L for e in rows for L in e.get("passkey", {}).get(v, {})}, key=int)
                for e in rows for v in e.get("passkey", {})}

    def ratio(value: float, ref: float | None) -> str:
        return f"{value:.2f} ({value / ref:.3f}x)" if ref else f"{value:.2f}"

    head = ["model", "held-out ppl"] + [f"long {L} ppl" for L in contexts] + [
        f"passkey {v} ({' · '.join(f'{int(L) // 1024}k' if int(L) % 1024 == 0 else L for L in Ls)})"
        for v, Ls in variants.items()] + ["training tokens", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in rows:
        cells = [e["name"], ratio(e["ppl"], base and base["ppl"])]
        for L in contexts:
            v = e.get("long", {}).get(L)
            cells.append("-" if v is None else ratio(v, base and base.get("long", {}).get(L)))
        for v, Ls in variants.items():
            found = e.get("passkey", {}).get(v)
            cells.append("-" if found is None else " · ".join(str(found.get(L, "-")) for L in Ls))
        cells.append(f"{e['tokens']:,}" if e.get("tokens") else "-")
        cells.append(f"{e['time']:.0f} s" if e.get("time") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for s in (summary, sibling):
        if s is not None and s.get("costs"):
            c = s["costs"]
            notes.append(f"converted model: attention FLOPs {c['flops']:.3f}x and KV bytes {c['kv_bytes']:.3f}x the "
                         f"original's at {c['length']:,} tokens")
            break
    if summary.get("wall_s") is not None:
        trained = summary.get("trained_tokens", summary["tokens"])
        passed = f" ({summary['tokens'] - trained:,} more read and passed over)" if trained < summary["tokens"] else ""
        notes.append(f"this run: {trained:,} training tokens{passed}, {summary['wall_s'] / 60:.1f} min end to end "
                     f"(loading, conversion, evaluation and training; {summary['elapsed_s']:.0f} s in training steps"
                     " and setup)")
    for key in ("evaluation", "long_protocol"):
        if summary.get(key):
            notes.append(summary[key])
    if notes:
        lines.append("")
        lines += [f"({n})" for n in notes]
    return "\n".join(lines)
