"""What to convert: ``MoSAConfig``, a frozen, validated dataclass that round-trips to JSON.

Which heads stay dense, per layer (first match wins):
  1. ``dense_head_ids[str(layer)]``: an explicit list of head indices;
  2. ``dense_heads_pattern``: ``{"3": n, "0-5": n, "re:<regex on the layer index>": n}`` overrides the count;
  3. ``dense_heads``: the count for every other layer, an int or a fraction of the layer's heads.
A count is turned into indices by ``head_choice``: ``first`` (heads 0..n-1), ``last``, ``scored``
(calibration keeps dense the heads, or KV groups, whose replacement would change the layer output most; see
calibration.py) or ``retrieval`` (those that read a hidden key back on passkey prompts; retrieval.py). With
``dense_scope="model"`` a fraction counts over the whole model and the highest scores win wherever they are. With ``router_granularity="kv_group"`` (the default) a count on a GQA model is rounded up to
whole KV groups, so the dense heads cache each K/V row once and each MoSA unit (one KV group) one copy of its
selected rows: the cache shrinks in bytes, not only in entries.

Defaults are the best retrofit of a pretrained model we know: a quarter of the KV groups stay dense, those that
read hidden keys back (retrieval score, wherever they are in the model); the others become key-selection MoSA
heads (sinks + a 256-token window + the tokens a calibrated causal router passes, 1/64 of them). Layers whose
own sliding window is short (Gemma 3's 512-token local layers) stay as they are: the quarter counts the other
layers' KV groups, and a group that alone carries a fifth of the retrieval score stays dense too. On SmolLM2-135M it keeps the original's short- and long-context quality and passkey retrieval at about a quarter
of the KV bytes. ``MoSAConfig.paper()`` is the conversion of the MoSA paper, for reproduction.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from numbers import Real
from typing import Any

from ..kinds import ROUTER_SCORES, declared, kinds

CONFIG_VERSION = 4
"""2: the defaults became the calibrated retrofit; 3: they keep long context (retrieval-scored dense KV groups over
the whole model, key-selection MoSA heads with sinks and a recent window); 4: layers with a short sliding window
of their own stay as they are (``keep_sliding``). A dict of an older version fills the keys it lacks from that
version's defaults (OLD_DEFAULTS)."""
ROUTER_INITS = ("random", "calibrated")
GRANULARITIES = ("head", "kv_group")
HEAD_CHOICES = ("first", "last", "scored", "retrieval")
DENSE_SCOPES = ("layer", "model")
ROUTINGS = ("expert_choice", "causal")
FILLS = ("zero", "mean")
ATTN_BACKENDS = ("auto", "flash", "flex", "math")
CHOICES = {"head_choice": HEAD_CHOICES, "dense_scope": DENSE_SCOPES, "router_score": ROUTER_SCORES,
           "router_init": ROUTER_INITS, "router_granularity": GRANULARITIES, "routing": ROUTINGS, "fill": FILLS,
           "attn_backend": ATTN_BACKENDS}
"""The fields that take one of a few fixed words, and the words."""


def field_choices() -> dict[str, tuple[str, ...]]:
    """Every field that takes one of a few words, with the words: ``CHOICES`` and the head kinds (built-in and
    registered now) that declare they may keep (kept_heads) or replace (sparse_heads) heads (kinds.py)."""
    return {**CHOICES, "kept_heads": kinds(keeps=True), "sparse_heads": kinds(replaces=True)}


# What a config of an older version meant by a key it does not carry (the defaults of that version).
V3_DEFAULTS = dict(keep_sliding=0, dense_share=0.0)
V2_DEFAULTS = dict(V3_DEFAULTS, sparsity=8, dense_heads=0.25, head_choice="scored", dense_scope="layer", sparse_heads="mosa",
                   local_window=256, sink_tokens=4, router_init="calibrated", fill="mean", router_granularity="kv_group",
                   routing="causal", router_score="straight_through", include_first=True, threshold_length=1024)
V1_DEFAULTS = dict(V2_DEFAULTS, head_choice="first", router_init="random", fill="zero", router_granularity="head",
                   routing="expert_choice", threshold_length=None)
OLD_DEFAULTS = {1: V1_DEFAULTS, 2: V2_DEFAULTS, 3: V3_DEFAULTS}

# The MoSA paper's conversion (arXiv 2505.00315): 4 dense heads first, random sigmoid routers that scale each
# selected output row, expert-choice top-k, nothing written at skipped tokens, one router per head; the
# IsoFLOP runs always include the first token.
PAPER = dict(sparsity=8, dense_heads=4, head_choice="first", router_init="random", fill="zero",
             router_granularity="head", routing="expert_choice", router_score="sigmoid", include_first=True,
             kept_heads="dense", sparse_heads="mosa", dense_scope="layer")


def _fail(name: str, value: Any, valid: str) -> None:
    raise ValueError(f"MoSAConfig.{name} must be {valid}, got {value!r}")


def _is_count(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, Real) and v >= 0 and (float(v).is_integer() or v < 1)


@dataclass(frozen=True)
class MoSAConfig:
    """Conversion of a model's attention into hybrid MoSA layers.

    The defaults are the best retrofit of a pretrained model we know; they need calibration text (``convert_``
    takes the embedded Wikipedia text when none is given). ``MoSAConfig.paper()`` is the paper's conversion.

    Example:
        >>> MoSAConfig()                                               # the default: see the module docstring
        >>> MoSAConfig(sparsity=8, dense_heads=3, sparse_heads="mosa", head_choice="scored", dense_scope="layer")
        >>> MoSAConfig.paper(sparsity=16)                              # the paper's conversion, for reproduction
        >>> MoSAConfig(sparsity=16, dense_heads=0.25, layers=[4, 5, 6], kept_heads="local", local_window=128)
    """

    sparsity: float = 64
    """Each MoSA unit routes k = min(max(T // sparsity, 2), T) tokens (paper-form heads attend among them;
    key-selection heads attend them besides their sinks and window: 128 routed tokens at 8,192 by default)."""
    dense_heads: float = 0.25
    """Heads kept dense (or local) per layer: an int, or a fraction in [0, 1) of the layer's query heads. With
    ``router_granularity='kv_group'`` on a GQA model the count is rounded up to whole KV groups."""
    dense_heads_pattern: dict = field(default_factory=dict)
    """Per-layer overrides of ``dense_heads``: keys "3", "0-5" or "re:<regex on the layer index>"."""
    dense_head_ids: dict = field(default_factory=dict)
    """Explicit dense head indices per layer, e.g. {"0": [0, 4]}; wins over counts."""
    head_choice: str = "retrieval"
    """Which heads a count keeps dense: 'scored' (those whose replacement would change the layer output most,
    per KV group with ``router_granularity='kv_group'``; needs calibration text), 'retrieval' (those that read
    a hidden key back when asked for it: attention mass from the answer onto the key, on synthetic multi-key
    prompts in calibration text; retrieval.py), 'first' (paper) or 'last'."""
    dense_scope: str = "model"
    """'layer': ``dense_heads`` is the count in every layer; 'model': ``dense_heads`` (a fraction, or a count
    per layer, raised by ``dense_share``) sets the model's total, placed on the highest-scoring heads or KV groups wherever they are (some
    layers keep several, others none). Scores come from head_choice 'scored' or 'retrieval'; with 'first' or
    'last' there is nothing to rank, and every layer keeps its own count."""
    dense_share: float = 0.2
    """With dense_scope='model' and ranked heads ('retrieval', 'scored'): a unit (KV group, or head) whose score
    alone is at least this share of the converted layers' total also stays dense, beyond the ``dense_heads``
    count (one unit is always converted). Where retrieval is spread over many groups (SmolLM2: the best of 90
    carries 14 %) the count decides; where a few carry it (Gemma-3-270M: one KV group in each of 3 global
    layers, carrying 65 %, 28 % and 7 %) this keeps them. 0 turns it off (version 3)."""
    layers: Any = "all"
    """Layers converted: 'all', a list of layer indices, or 're:<regex on the layer index>'."""
    keep_sliding: int = 1024
    """Layers with a sliding window of their own of at most this many tokens (Gemma 3's local layers: 512) stay
    as they are, whatever ``layers`` says: their cache is already bounded by that window, which a sparse head
    (``local_window`` + sinks + routed tokens within the same window) would shrink by little and at a cost in
    quality. Longer windows (Mistral's 4,096) are converted. 0 converts every layer ``layers`` names."""
    kept_heads: str = "dense"
    """Kept heads are 'dense' (full causal attention) or 'local' (sliding window of ``local_window``)."""
    local_window: int = 256
    """Window of local, streaming and mosa_keys heads: query t sees keys t-local_window+1 .. t."""
    sink_tokens: int = 4
    """Streaming and mosa_keys heads: the first tokens every query also sees (attention sinks, StreamingLLM)."""
    sparse_heads: str = "mosa_keys"
    """What the non-kept heads become: 'mosa' (the paper's head: routed tokens attend routed tokens, output at
    those tokens only), 'mosa_keys' (key selection, a departure from the paper: every query attends the
    ``sink_tokens`` first tokens, its last ``local_window`` tokens and the routed tokens before them; output at
    every token), or a baseline for studies: 'local' (sliding-window heads of ``local_window`` tokens),
    'streaming' (sinks + window, DuoAttention's streaming heads) or 'pruned' (removed: they contribute nothing,
    or their mean with fill='mean'). Baselines have no routers: the router fields and ``routing`` do not apply to
    them, nor ``fill`` to heads that write at every token (local, streaming, mosa_keys)."""
    include_first: bool = True
    """Every MoSA head always selects the first token (attention sinks live there)."""
    fill: str = "mean"
    """What a MoSA (or pruned) head writes at tokens it does not select: 'zero' (the paper: nothing) or 'mean'
    (a learned vector ``mosa_fill``, initialised to the head's mean output on calibration text; a selected token
    gets fill + gate·(attention − fill), so with every token selected the head is unchanged). 'mean' turns the
    head's absence at a token from a zero-ablation into a mean-ablation, which a pretrained model tolerates far
    better; it costs one extra vector per layer."""
    router_score: str = "straight_through"
    """'sigmoid' (paper: outputs scaled by σ(score)) or 'straight_through' (forward ×1, gradient of σ)."""
    router_init: str = "calibrated"
    """'calibrated' (fit to the tokens each head needs, on calibration text) or 'random' (paper)."""
    router_granularity: str = "kv_group"
    """'kv_group': the MoSA heads of a GQA group share one selection and one K/V copy (the cache shrinks in
    bytes); 'head' (paper): every MoSA head routes its own tokens and caches its own K/V."""
    routing: str = "causal"
    """'expert_choice' (paper: top-k over the whole sequence, exact budget, sees future tokens) or 'causal'
    (token t is selected iff its router logit exceeds the unit's threshold: depends on t alone, so the model
    generates token by token with a sparse KV cache; the selection rate is 1/sparsity on average)."""
    threshold_length: int | None = 1024
    """Causal routing: the thresholds are set on the calibration tokens regrouped into rows of this many tokens
    (capped by the model's positions; None: the rows as given). A unit's logits drift with position, so rows as
    long as the model will run at pass the intended fraction there (on SmolLM2, 512-token rows passed 11 % at
    2,048 tokens instead of 12.5 %)."""
    threshold_momentum: float = 0.05
    """Causal routing: in training, each unit's threshold moves this fraction of the way to the batch's
    (1 - 1/sparsity) quantile of its router logits after every forward."""
    attn_backend: str = "auto"
    """Kernel of the windowed heads (mosa_keys, streaming, local): 'flash' (PyTorch's fused CPU kernel on the
    exact band, far keys merged by log-sum-exp), 'flex' (FlexAttention, compiled; CUDA and CPU), 'math' (plain
    PyTorch, any device), or 'auto' (flex on CUDA, flash on CPU, math where neither applies). All compute the
    same attention; change it on a loaded model with ``mosa_retrofit.set_attn_backend``."""
    base_model_name_or_path: str | None = None
    """Provenance: the checkpoint that was converted (filled in by the CLI / loader)."""
    version: int = CONFIG_VERSION
    """Format version of this config."""

    def __post_init__(self) -> None:
        if (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, Real) or not self.sparsity >= 1
                or not math.isfinite(self.sparsity)):
            _fail("sparsity", self.sparsity, "a finite number >= 1")
        if not _is_count(self.dense_heads):
            _fail("dense_heads", self.dense_heads, "an integer >= 0 or a fraction in [0, 1)")
        if not isinstance(self.dense_heads_pattern, dict):
            _fail("dense_heads_pattern", self.dense_heads_pattern, "a dict {layer key: count}")
        for key, v in self.dense_heads_pattern.items():
            _layer_key_matcher(str(key), "dense_heads_pattern")
            if not _is_count(v):
                _fail(f"dense_heads_pattern[{key!r}]", v, "an integer >= 0 or a fraction in [0, 1)")
        if not isinstance(self.dense_head_ids, dict):
            _fail("dense_head_ids", self.dense_head_ids, "a dict {layer index: [head indices]}")
        for key, ids in self.dense_head_ids.items():
            if not str(key).isdigit():
                _fail("dense_head_ids", key, "keyed by layer indices like '0'")
            if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                _fail(f"dense_head_ids[{key!r}]", ids, "a list of head indices >= 0")
        for name, valid in field_choices().items():
            if getattr(self, name) not in valid:
                _fail(name, getattr(self, name), f"one of {valid}")
        if self.layers != "all":
            if isinstance(self.layers, str):
                _layer_key_matcher(self.layers, "layers")
            elif not isinstance(self.layers, (list, tuple)) or any(
                    isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                _fail("layers", self.layers, "'all', a list of layer indices or 're:<regex>'")
        if isinstance(self.local_window, bool) or not isinstance(self.local_window, int) or self.local_window < 1:
            _fail("local_window", self.local_window, "an integer >= 1")
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            _fail("sink_tokens", self.sink_tokens, "an integer >= 0")
        share = self.dense_share
        if isinstance(share, bool) or not isinstance(share, Real) or not 0 <= share <= 1:
            _fail("dense_share", self.dense_share, "a number in [0, 1] (0: off)")
        if isinstance(self.keep_sliding, bool) or not isinstance(self.keep_sliding, int) or self.keep_sliding < 0:
            _fail("keep_sliding", self.keep_sliding, "an integer >= 0 (0: convert sliding-window layers too)")
        sparse, kept = declared(self.sparse_heads), declared(self.kept_heads)
        if sparse.windowed and not sparse.routed and kept.windowed:
            allowed = [k for k in kinds(replaces=True) if not (declared(k).windowed and not declared(k).routed)]
            _fail("sparse_heads", self.sparse_heads, f"one of {allowed} when kept_heads={self.kept_heads!r} "
                  "(every head would attend a plain window)")
        if isinstance(self.threshold_momentum, bool) or not isinstance(self.threshold_momentum, Real) or not (
                0 <= self.threshold_momentum <= 1):
            _fail("threshold_momentum", self.threshold_momentum, "a number in [0, 1]")
        if self.threshold_length is not None and (isinstance(self.threshold_length, bool) or not isinstance(
                self.threshold_length, int) or self.threshold_length < 2):
            _fail("threshold_length", self.threshold_length, "an integer >= 2 or null")
        if not isinstance(self.include_first, bool):
            _fail("include_first", self.include_first, "true or false")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            _fail("version", self.version, f"an integer in 1..{CONFIG_VERSION}")
        if self.version > CONFIG_VERSION:
            _fail("version", self.version, f"<= {CONFIG_VERSION} (this mosa_retrofit is older than the config)")
        if isinstance(self.layers, tuple):  # keep JSON-friendly, comparable values
            object.__setattr__(self, "layers", list(self.layers))

    @classmethod
    def paper(cls, **overrides) -> MoSAConfig:
        """The MoSA paper's conversion (see ``PAPER``), with ``overrides``; needs no calibration text.

        >>> MoSAConfig.paper(sparsity=1, dense_heads=1, router_score="straight_through")  # identity check
        """
        return cls(**{**PAPER, **overrides})

    @property
    def needs_calibration(self) -> bool:
        """Whether converting needs calibration text: scored heads, calibrated routers or a mean fill. (Causal
        thresholds use calibration text when given, else the normal quantile of unit-RMS logits.)"""
        return (self.head_choice in ("scored", "retrieval") or (self.routed and self.router_init == "calibrated")
                or (self.fill == "mean" and self.fills))

    @property
    def uses_calibration(self) -> bool:
        """Whether calibration text, when given, is used: ``needs_calibration`` or causal thresholds."""
        return self.needs_calibration or (self.routed and self.routing == "causal")

    @property
    def calibration_floor(self) -> int:
        """The shortest calibration sequence that can fit what this config calibrates: two tokens (attention
        from one to another), and for routed kinds one routed token per sequence (``sparsity`` tokens)."""
        return max(2, math.ceil(self.sparsity)) if declared(self.sparse_heads).routed else 2

    @property
    def routed(self) -> bool:
        """Whether the sparse heads have routers (their kind declares it: MoSA heads, in either form)."""
        return declared(self.sparse_heads).routed

    @property
    def fills(self) -> bool:
        """Whether the sparse heads write a fill where they have no output (paper-form MoSA heads, pruned)."""
        return declared(self.sparse_heads).fills

    # ------------------------------------------------------------------------------------ per layer

    def converts_layer(self, layer: int, reach: int | None = None) -> bool:
        """Whether layer ``layer`` (with a sliding window of ``reach`` tokens of its own, if any) is converted."""
        if reach is not None and reach <= self.keep_sliding:
            return False
        if self.layers == "all":
            return True
        if isinstance(self.layers, str):
            return _layer_key_matcher(self.layers, "layers")(layer)
        return layer in self.layers

    def dense_count(self, layer: int, num_heads: int) -> int:
        """Number of dense heads in ``layer`` of ``num_heads`` query heads (with dense_scope='model': its share
        of the model's total)."""
        if str(layer) in self.dense_head_ids:
            return len(self.dense_head_ids[str(layer)])
        value = self.dense_heads
        for key, v in self.dense_heads_pattern.items():
            if _layer_key_matcher(str(key), "dense_heads_pattern")(layer):
                value = v
                break
        return int(round(value * num_heads)) if value < 1 and value != 0 else int(value)

    # ------------------------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoSAConfig:
        """A config from a dict; a dict of an older ``version`` means the defaults of that version."""
        if not isinstance(data, dict):
            raise ValueError(f"a MoSAConfig must be a JSON object of fields, got {type(data).__name__}: {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoSAConfig keys {unknown}; valid keys: {sorted(known)}")
        version = data.get("version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            _fail("version", version, f"an integer in 1..{CONFIG_VERSION}")
        if version in OLD_DEFAULTS:
            data = {**OLD_DEFAULTS[version], **data}
        return cls(**data)

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> MoSAConfig:
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))


def _layer_key_matcher(key: str, name: str):
    """'3' -> layer 3; '0-5' -> layers 0..5; 're:<regex>' -> layers whose index fullmatches."""
    if key.startswith("re:"):
        try:
            rx = re.compile(key[3:])
        except re.error as e:
            raise ValueError(f"MoSAConfig.{name}: bad regex {key!r}: {e}") from None
        return lambda layer: rx.fullmatch(str(layer)) is not None
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", key)
    if not m:
        _fail(name, key, "keyed by '3', '0-5' or 're:<regex>'")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    return lambda layer: lo <= layer <= hi
