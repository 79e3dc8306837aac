"""What the retrofit study sweeps and how it measures: points and the study's spec (goal thresholds included)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..convert.config import FILLS, ROUTER_INITS, ROUTINGS, MoSAConfig
from ..convert.costs import equal_compute_window
from ..text.protocol import PROTOCOL

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
            parts = [self.dense, format_number(self.sparsity), self.routing, self.init, self.fill]
        elif self.method == "pruned":
            parts = [self.dense, format_number(self.sparsity), self.fill]
        else:
            parts = [self.dense, format_number(self.sparsity)]
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
                      dense_head_ids=dense_head_ids or {}, router_granularity="head", threshold_length=None,
                      dense_scope="layer")
        if self.method == "mosa":  # the paper's head form
            return MoSAConfig(**common, sparse_heads="mosa", routing=self.routing, router_init=self.init, fill=self.fill,
                              router_score="straight_through")
        if self.method == "local":
            return MoSAConfig(**common, sparse_heads="local",
                              local_window=equal_compute_window(eval_length, self.sparsity))
        return MoSAConfig(**common, sparse_heads="pruned", fill=self.fill)


def format_number(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class StudySpec:
    """What the study sweeps and how it measures (defaults: the committed SmolLM2 study)."""

    model: str = "smollm2-135m"
    """The model converted: 'smollm2-135m' (embedded), a folder or a hub id."""
    dense_heads: tuple[int, ...] = (1, 3, 6)
    """Dense heads kept per layer (every method keeps the same ones: highest output energy)."""
    sparsity: tuple[float, ...] = (2, 4, 8, 16)
    """A MoSA head attends T / sparsity tokens; the baselines get the same compute."""
    routing: tuple[str, ...] = ROUTINGS
    """'expert_choice' (paper: top-k of the whole sequence) and/or 'causal' (thresholds: decodable)."""
    router_init: tuple[str, ...] = ROUTER_INITS
    """'random' (paper) and/or 'calibrated' (routers fitted to what each head needs)."""
    fill: tuple[str, ...] = ("mean",)
    """What MoSA and pruned heads write at tokens they skip (MoSAConfig.fill): 'zero' (the paper), 'mean'."""
    baselines: tuple[str, ...] = ("local", "pruned")
    """Baselines at equal compute: 'local' (sliding-window heads) and/or 'pruned' (heads removed); '' for none."""
    data: str = PROTOCOL.data
    """In-domain text: training / calibration documents, and the last ``validation_documents`` held out."""
    validation_documents: int = PROTOCOL.validation_documents
    """Documents of ``data`` held out for perplexity."""
    ood_data: str | None = "shakespeare-offline"
    """Out-of-domain check (none: skip): its last ``ood_documents`` documents."""
    ood_documents: int = 2
    """Documents of ``ood_data`` scored."""
    eval_length: int = PROTOCOL.block_size
    """Tokens per evaluation block (and per training sequence when adapting); the defaults of ``data``,
    ``validation_documents``, ``eval_length`` and ``eval_tokens`` are the evaluation protocol's."""
    eval_tokens: int = PROTOCOL.tokens
    """Held-out in-domain tokens scored."""
    ood_tokens: int = 2048
    """Out-of-domain tokens scored."""
    calibration_sequences: int = 8
    """Training-split sequences read once to score heads, fit routers, fills and thresholds."""
    calibration_length: int = 512
    """Tokens per calibration sequence."""
    cost_lengths: tuple[int, ...] = (2048, 8192)
    """Sequence lengths T at which FLOPs and KV-cache ratios are counted."""
    time_length: int = 2048
    """Sequence length of the forward+backward timing of one attention layer (1 thread)."""
    time_repeats: int = 3
    """Timings per point (the median is kept)."""
    adapt: tuple[str, ...] = ()
    """Point keys (``Point.key`` without '@') adapted by the recipe trainer: ``adapt_distill_steps`` steps of
    layer distillation (attention weights, routers, fills), then ``adapt_steps`` end-to-end steps (LM +
    distillation to the original's logits, attention weights)."""
    adapt_distill_steps: int = 0
    """Layer-distillation steps per adapted point (each attention layer learns the original's output)."""
    adapt_distill_lr: float = 1e-3
    """Peak learning rate of layer distillation."""
    adapt_steps: int = 0
    """End-to-end steps per adapted point (LM + distillation to the original's logits)."""
    adapt_lr: float = 1e-3
    """Peak learning rate of the end-to-end steps (cosine)."""
    adapt_trainable: str = "attention"
    """What the end-to-end steps train: 'attention' (converted layers' weights, routers, fills) or 'all'."""
    adapt_batch: int = 2
    """Sequences of ``eval_length`` tokens per optimizer step."""
    seed: int = 0
    """Seed of random routers and of adaptation."""
    batch_size: int = 4
    """Blocks per forward when scoring perplexity."""
    goal_ppl_ratio: float = 1.05
    """The goal: perplexity at most this times the original's ..."""
    goal_flops: float = 1 / 3
    """... at most this fraction of the original's attention FLOPs at the longest cost length ..."""
    goal_kv: float = 0.5
    """... and at most this fraction of its KV-cache entries there."""

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
        for name in ("adapt_lr", "adapt_distill_lr", "goal_ppl_ratio", "goal_flops", "goal_kv"):
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
