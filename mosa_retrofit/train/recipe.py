"""Recipes: a YAML file that maps one-to-one onto the frozen dataclasses below.

Every section of the YAML is one dataclass, every key one field; unknown keys and bad values are rejected
with the dotted path of the key (``stages[1].lr``) and what would be valid. ``key=value`` overrides use the
same dotted paths (``stages.adaptation.steps=50``, ``conversion.mosa.sparsity=4``; a stage can be named by
its index or its name). ``Recipe.to_yaml`` writes a recipe that loads back to an equal object.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..convert.config import MoSAConfig
from ..kinds import kinds
from ..text.data import DataSpec
from ..text.prompts import VARIANTS
from ..validate import DTYPES, positive_int, require

STAGE_KINDS = ("router_warmup", "layer_distill", "adaptation")
TRAINABLE = ("routers", "mosa", "attention", "all")
PRECISIONS = ("no", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass(frozen=True)
class ModelSpec:
    name_or_path: str = "smollm2-135m"
    """A local folder, a hub id or 'smollm2-135m' (the embedded default). Give the *original* model when the
    recipe has a ``conversion`` section; an already converted folder (conversion: null) is adapted as is and
    its ``base_model_name_or_path`` is the teacher."""
    dtype: str = "float32"
    """Weights dtype of student and teacher: float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """Backend of the dense heads: sdpa, eager, flash_attention_2, ..."""

    def __post_init__(self):
        require(isinstance(self.name_or_path, str) and bool(self.name_or_path), "name_or_path", self.name_or_path,
               "a non-empty string")
        require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")


@dataclass(frozen=True)
class ConversionSpec:
    mosa: MoSAConfig = field(default_factory=MoSAConfig)
    """The surgery (see MoSAConfig): sparsity, dense heads, head choice, router init, ..."""
    calibration_sequences: int = 16
    """Training-split sequences used by head_choice='scored' / router_init='calibrated'."""
    calibration_length: int = 512
    """Tokens per calibration sequence."""

    def __post_init__(self):
        positive_int("calibration_sequences", self.calibration_sequences)
        positive_int("calibration_length", self.calibration_length, 2)


@dataclass(frozen=True)
class LoRASpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (peft's target_modules); attention projections and MLP layers both work."""

    def __post_init__(self):
        positive_int("r", self.r)
        require(self.alpha > 0, "alpha", self.alpha, "> 0")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        require(isinstance(self.target_modules, list) and bool(self.target_modules)
               and all(isinstance(t, str) for t in self.target_modules), "target_modules", self.target_modules,
               "a non-empty list of module names")


@dataclass(frozen=True)
class StageSpec:
    name: str
    """Unique name; checkpoints, logs and overrides refer to it."""
    kind: str
    """'router_warmup': only routers train, to match each head's dense attention mass (KL);
    'layer_distill': every converted attention layer learns to reproduce the original layer's output on the
    original model's inputs (relative squared error; cheap: no backward through MLPs or the LM head);
    'adaptation': LM loss + optional KL distillation to the original model's logits."""
    steps: int
    """Optimizer steps of this stage."""
    lr: float | None = None
    """Peak learning rate (None: optimizer.lr)."""
    trainable: str = "routers"
    """Full-weight parameters that train: 'routers', 'mosa' (routers + the MoSA heads' own weight slices),
    'attention' (routers + every weight of converted attention layers) or 'all'."""
    lora: LoRASpec | None = None
    """Add LoRA adapters (peft) on these modules; merged into the weights at the end of the stage."""
    lm_weight: float = 1.0
    """Weight of the next-token loss (adaptation)."""
    kd_weight: float = 0.0
    """Weight of KL(teacher || student) on the logits (adaptation); the teacher is the unconverted model."""
    kd_temperature: float = 1.0
    answer_weight: float = 0.0
    """With ``data.needles``: adaptation adds to each loss term this times its mean over the tokens that answer
    the blocks' questions; router warm-up adds this times the KL toward the far attention of the queries that
    predict those answers (0: every token, every query weighs the same)."""

    def __post_init__(self):
        require(isinstance(self.name, str) and self.name.isidentifier(), "name", self.name,
               "an identifier such as 'router_warmup'")
        require(self.kind in STAGE_KINDS, "kind", self.kind, f"one of {STAGE_KINDS}")
        positive_int("steps", self.steps)
        if self.lr is not None:
            require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        require(self.trainable in TRAINABLE, "trainable", self.trainable, f"one of {TRAINABLE}")
        for name in ("lm_weight", "kd_weight"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        require(self.kd_temperature > 0, "kd_temperature", self.kd_temperature, "> 0")
        require(isinstance(self.answer_weight, (int, float)) and not isinstance(self.answer_weight, bool)
                and 0 <= self.answer_weight < math.inf, "answer_weight", self.answer_weight, "a finite number >= 0")
        if self.kind == "layer_distill":
            require(self.answer_weight == 0, "answer_weight", self.answer_weight, "0 in a layer_distill stage")
        if self.kind == "router_warmup":
            require(self.trainable == "routers", "trainable", self.trainable, "'routers' in a router_warmup stage")
            require(self.lora is None, "lora", self.lora, "null in a router_warmup stage")
            require(self.kd_weight == 0, "kd_weight", self.kd_weight, "0 in a router_warmup stage")
        elif self.kind == "layer_distill":
            require(self.lora is None, "lora", self.lora, "null in a layer_distill stage")
            require(self.trainable in ("routers", "mosa", "attention"), "trainable", self.trainable,
                   "'routers', 'mosa' or 'attention' in a layer_distill stage (only attention layers run)")
        else:
            require(self.lm_weight + self.kd_weight > 0, "lm_weight + kd_weight", self.lm_weight + self.kd_weight,
                   "> 0")
        if self.lora is not None:
            require(self.trainable == "routers", "trainable", self.trainable,
                   "'routers' when lora is set (LoRA trains the adapters, plus the routers)")


@dataclass(frozen=True)
class OptimizerSpec:
    lr: float = 3e-4
    """Default peak learning rate of every stage (AdamW)."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to partially trainable tensors (their frozen slices stay exact)."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    """Clip the global gradient norm (None: no clipping)."""

    def __post_init__(self):
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require(isinstance(self.betas, list) and len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "betas", self.betas, "two numbers in [0, 1)")
        require(self.eps > 0, "eps", self.eps, "> 0")
        if self.grad_clip is not None:
            require(self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or null")


@dataclass(frozen=True)
class ScheduleSpec:
    warmup_fraction: float = 0.1
    """Linear LR warm-up over this fraction of each stage's steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine ends at min_lr_ratio × peak."""

    def __post_init__(self):
        require(0 <= self.warmup_fraction < 1, "warmup_fraction", self.warmup_fraction, "in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")


@dataclass(frozen=True)
class TrainingSpec:
    micro_batch_size: int = 4
    """Sequences per process per forward."""
    gradient_accumulation_steps: int = 1
    """Global batch = micro_batch_size × processes × gradient_accumulation_steps sequences."""
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16' (accelerate autocast)."""
    gradient_checkpointing: bool = False
    distributed: str = "ddp"
    """With several processes: 'ddp' (every process holds the whole model) or 'fsdp' (PyTorch FSDP2: student and
    teacher sharded per decoder layer, sharded checkpoints, LoRA adapters whole on every process; layer
    distillation stages run first, on whole models)."""

    def __post_init__(self):
        positive_int("micro_batch_size", self.micro_batch_size)
        positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        require(self.mixed_precision in PRECISIONS, "mixed_precision", self.mixed_precision, f"one of {PRECISIONS}")
        require(self.distributed in DISTRIBUTED, "distributed", self.distributed, f"one of {DISTRIBUTED}")


@dataclass(frozen=True)
class CheckpointSpec:
    every: int = 100
    """Write a checkpoint every N optimizer steps (and at the end of every stage)."""
    keep_last: int = 2
    """Keep the newest K checkpoints."""

    def __post_init__(self):
        positive_int("every", self.every)
        positive_int("keep_last", self.keep_last)


@dataclass(frozen=True)
class LoggingSpec:
    every: int = 10
    """Write a metrics record every N steps (metrics.jsonl, TensorBoard when installed)."""
    tensorboard: bool = True
    plot: bool = True
    """Draw loss.png (training and validation loss) at the end."""

    def __post_init__(self):
        positive_int("every", self.every)


@dataclass(frozen=True)
class EvaluationSpec:
    every: int = 0
    """Validation perplexity every N steps (0: only before conversion, after conversion and after each stage)."""
    batch_size: int = 4
    before_conversion: bool = True
    """Also measure the original (unconverted) model."""
    block_size: int | None = None
    """Tokens per validation block (None: the evaluation protocol's 1024, capped by the model's positions)."""
    tokens: int | None = None
    """Validation tokens scored (None: the evaluation protocol's 4096), from the held-out documents of ``data``."""
    long_contexts: list = field(default_factory=list)
    """Long-document perplexity: the final 256 tokens of Shakespeare's plays given each of these many tokens of
    context before them ([]: none). Measured on the original, after conversion and after the last stage."""
    long_documents: int = 1
    """Plays scored for ``long_contexts`` (those long enough, in file order)."""
    passkey_lengths: list = field(default_factory=list)
    """Passkey retrieval (teacher forced) at these prompt lengths in tokens ([]: none)."""
    passkey_trials: int = 6
    """Keys per length and variant, spread over depths 25 %, 50 % and 75 %."""
    passkey_variants: list = field(default_factory=lambda: ["single"])
    """'single' (one key in filler) and/or 'multi' (the key among distractor keys)."""
    long_every: int = 0
    """Also run the long-context checks every N steps of a stage and at every stage's end (a learning curve; 0:
    only at the three points above)."""

    def __post_init__(self):
        positive_int("every", self.every, 0)
        positive_int("batch_size", self.batch_size)
        for name in ("block_size", "tokens"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name), 2)
        for name in ("long_contexts", "passkey_lengths"):
            values = getattr(self, name)
            require(isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 64
                                                     for v in values), name, values,
                    "a list of token counts, each an integer >= 64")
        positive_int("long_documents", self.long_documents)
        positive_int("passkey_trials", self.passkey_trials)
        positive_int("long_every", self.long_every, 0)
        require(isinstance(self.passkey_variants, list) and bool(self.passkey_variants)
                and all(v in VARIANTS for v in self.passkey_variants), "passkey_variants", self.passkey_variants,
                f"a non-empty list of {list(VARIANTS)}")

    @property
    def long_checks(self) -> bool:
        return bool(self.long_contexts or self.passkey_lengths)


CONTROL_SUFFIX = "-control"
"""A control run writes into the converted run's output_dir + this."""

RESUMABLE_CHANGES = ("output_dir", "logging", "evaluation", "checkpointing")
"""The recipe sections a resumed run may change: they decide what is written and when, not the weights."""
BATCH_SPLIT = ("micro_batch_size", "gradient_accumulation_steps")
"""How the global batch is split (with the number of processes): a resumed run may split it otherwise."""


@dataclass(frozen=True)
class Recipe:
    output_dir: str
    """Checkpoints, metrics.jsonl, loss.png, summary.json and the final model (output_dir/final)."""
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    conversion: ConversionSpec | None = field(default_factory=ConversionSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stages: list = field(default_factory=list)
    """StageSpec list, run in order."""
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    checkpointing: CheckpointSpec = field(default_factory=CheckpointSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    control: bool = False
    """The honest control: train the *original* model (no conversion) the same way, on the same blocks in the
    same order, with the same steps and learning rates; stages with nothing to train in it (router warm-up,
    layer distillation, ``trainable: routers``) pass over their data without a step. ``trainable: mosa`` trains
    the original's attention. (``mosa-retrofit train RECIPE --control`` sets it and output_dir += '-control'.)"""

    def __post_init__(self):
        require(isinstance(self.output_dir, str) and bool(self.output_dir), "output_dir", self.output_dir,
               "a non-empty path")
        positive_int("seed", self.seed, 0)
        require(isinstance(self.stages, list) and all(isinstance(s, StageSpec) for s in self.stages), "stages",
               self.stages, "a list of stages")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "stages", dup, "uniquely named (duplicate names)")
        warm = [s.name for s in self.stages if s.kind == "router_warmup"]
        if warm and self.conversion is not None and not self.conversion.mosa.routed:
            raise ValueError(f"stages {warm} (router_warmup) train routers, but conversion.mosa.sparse_heads="
                             f"{self.conversion.mosa.sparse_heads!r} has none; use one of {kinds(routed=True)}, or "
                             "drop the stage")
        weighted = [s.name for s in self.stages if s.answer_weight > 0]
        if weighted and self.data.needles == 0:
            raise ValueError(f"stages {weighted} weigh the answers of data.needles (answer_weight > 0), but "
                             "data.needles is 0: set data.needles (1 to 16) or answer_weight: 0")
        require(isinstance(self.control, bool), "control", self.control, "true or false")
        if self.control:
            require(self.conversion is not None, "control", self.control,
                    "false for a recipe that adapts an already converted model (conversion: null): its original "
                    "is not what it loads")
        if self.training.distributed == "fsdp":
            first = next((i for i, s in enumerate(self.stages) if s.kind != "layer_distill"), len(self.stages))
            late = [s.name for s in self.stages[first:] if s.kind == "layer_distill"]
            if late:
                raise ValueError(f"stages {late}: with training.distributed=fsdp, layer_distill stages come "
                                 "first (they run on whole models; sharding starts at the first other stage)")


    def changes(self, saved: dict) -> list[str]:
        """What in this recipe differs from ``saved`` (a recipe's ``to_dict``) in a way that changes the weights a
        run ends with (data, conversion, stages, optimizer, schedule, training, seed, model), as
        'path: saved -> now' lines; output, logging, evaluation and checkpointing may change on resume."""
        out: list[str] = []

        def walk(a: Any, b: Any, path: str) -> None:
            if isinstance(a, dict) and isinstance(b, dict):
                for key in sorted(set(a) | set(b), key=str):
                    walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                for i, (x, y) in enumerate(zip(a, b)):
                    walk(x, y, f"{path}[{i}]")
            elif a != b:
                out.append(f"{path}: {a!r} -> {b!r}")

        now, saved = self.to_dict(), dict(saved)
        for d in (now, saved):  # the split of the global batch may change (the trainer compares the batch)
            d["training"] = {k: v for k, v in (d.get("training") or {}).items() if k not in BATCH_SPLIT}
            mosa = ((d.get("conversion") or {}).get("mosa") or {})
            if isinstance(mosa, dict):  # every attention backend computes the same attention (a kernel choice)
                d["conversion"] = {**d["conversion"], "mosa": {k: v for k, v in mosa.items() if k != "attn_backend"}}
        for key in sorted(set(now) | set(saved)):
            if key not in RESUMABLE_CHANGES:
                walk(saved.get(key), now.get(key), key)
        return out

    # ------------------------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] = ()) -> Recipe:
        data = apply_overrides(data, overrides)
        return _build(cls, data, "recipe")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> Recipe:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"recipe {path} is a folder; give a recipe's .yaml file (recipes/ has some)")
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        try:
            data = yaml.load(path.read_text(), Loader=_StrictLoader)
        except DuplicateKey as e:
            raise ValueError(f"recipe {path}: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data, overrides)


class DuplicateKey(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML lets the last one win, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise DuplicateKey(f"key {key!r} is given twice in one mapping (lines {seen[key] + 1} and "
                                   f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# ---------------------------------------------------------------------------------------- building

def _build(tp: Any, value: Any, path: str) -> Any:
    """Turn plain YAML data into ``tp`` (dataclasses, lists, optionals, scalars), naming ``path`` on errors."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, path)
    if tp is MoSAConfig and isinstance(value, dict):
        try:
            return MoSAConfig.from_dict(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {str(e).removeprefix('MoSAConfig.')}") from None
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build_dataclass(tp, value, path)
    return _build_scalar(tp, value, path)


def _build_dataclass(tp: Any, value: Any, path: str) -> Any:
    """A recipe section from its mapping: unknown and missing keys named, every field built by its type."""
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be a mapping, got {value!r}")
    hints = typing.get_type_hints(tp)
    known = [f.name for f in fields(tp) if f.init]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown key {path}.{unknown[0]}; valid keys of {path}: {known}")
    kwargs = {}
    for name in (n for n in known if n in value):
        sub = f"{path}.{name}"
        if tp is Recipe and name == "stages":
            if not isinstance(value[name], list):
                raise ValueError(f"{sub} must be a list of stages, got {value[name]!r}")
            kwargs[name] = [_build(StageSpec, s, f"{sub}[{i}]") for i, s in enumerate(value[name])]
        else:
            kwargs[name] = _build(hints[name], value[name], sub)
    missing = [f.name for f in fields(tp) if f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ValueError(f"{path}.{missing[0]} is required")
    try:
        return tp(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}.{e}") from None


def _build_scalar(tp: Any, value: Any, path: str) -> Any:
    """A number, flag or string checked against its type (YAML 1.1's "1e-3" read as the float it means)."""
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    return value  # list / dict / Any: validated by the dataclass itself


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a copy of ``data``."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ValueError(f"override {item!r}: its value is not valid YAML ({problem})") from None
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                idx = _list_index(node, part, where)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            else:
                if not isinstance(node, dict):
                    raise ValueError(f"override {key}: {'.'.join(parts[:i])} is not a section")
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
    return data


def _list_index(node: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item.get("name") for item in node if isinstance(item, dict)]
    raise ValueError(f"override {where}: no stage {part!r}; stages are {names} (or indices 0..{len(node) - 1})")
