"""The model card (README.md) a converted model's folder gets: the Hub's YAML front matter and what a reader wants
to know (how it was converted, the convert-time check, its costs, how to load it both ways).

A README.md already in the folder that this module did not write (no ``MARK`` line) is the user's and is kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from .. import __version__
from ..atomic import write_atomic
from ..kinds import kinds
from ..text.assets import EMBEDDED, is_hub_id
from ..validate import positions_of
from .costs import attention_costs, ratios
from .families import attention_layers
from .hub import REQUIRES

MARK = "<!-- written by mosa_retrofit on save; remove this line to keep your own edits of this card -->"
COST_LENGTHS = (4096, 8192, 32768, 131072)


def write_card(folder: Path, model: nn.Module, adapter: bool = False) -> None:
    path = Path(folder) / "README.md"
    if path.exists() and MARK not in path.read_text(errors="replace"):
        return
    write_atomic(path, card_text(model, adapter))


def base_license(reference: str | None) -> str | None:
    """The base's license where it is known offline: an embedded model's, or a base folder's card."""
    if reference in EMBEDDED:
        return EMBEDDED[reference].license
    if reference and (Path(reference) / "README.md").is_file():
        m = re.search(r"^---\n(.*?)\n---", (Path(reference) / "README.md").read_text(errors="replace"), re.S)
        if m:
            lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M)
            return lic.group(1) if lic else None
    return None


def hub_base(reference: str | None) -> str | None:
    """The base as a Hub id (``base_model`` must be one), if it is one."""
    if reference in EMBEDDED:
        return EMBEDDED[reference].hub_id
    if reference and not Path(reference).is_absolute() and is_hub_id(reference):
        return reference
    return None


def _front_matter(reference: str | None, adapter: bool) -> list[str]:
    """The card's YAML header: library, tags, the hub base (and how this model relates to it), its license."""
    hub_id, lic = hub_base(reference), base_license(reference)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- mosa", "- mosa_retrofit", "- sparse-attention"]
    if hub_id:
        front += [f"base_model: {hub_id}", "base_model_relation: adapter" if adapter else "base_model_relation: finetune"]
    if lic:
        front.append(f"license: {lic}")
    return front + ["---"]


def card_text(model: nn.Module, adapter: bool = False) -> str:
    cfg = model.config
    mosa = cfg.mosa
    base = getattr(cfg, "mosa_base", None) or {}
    reference = base.get("name_or_path") or mosa.get("base_model_name_or_path")
    front = _front_matter(reference, adapter)
    costs = attention_costs(model, 1024)
    heads = sum(c.dense + c.local + c.mosa + c.pruned for c in costs)
    dense = sum(c.dense for c in costs)
    layers = attention_layers(model)
    H, KV = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    groups = ""
    if H and KV and H != KV:  # KV groups whose every query head stays dense (what shrinks the cache)
        G = H // KV
        whole = sum(sum(all(h in set(ids) for h in range(g * G, (g + 1) * G)) for g in range(KV))
                    for ids in (mosa.get("dense_head_ids") or {}).values())
        groups = f" ({whole} of {len(layers) * KV} KV groups whole)"
    kind = mosa.get("sparse_heads")
    window = (f", a {mosa.get('local_window')}-token window and {mosa.get('sink_tokens')} sink tokens"
              if kind in kinds(windowed=True) else "")
    name = reference or "its base"
    revision = f" (revision {base['revision'][:12]})" if base.get("revision") else ""
    lines = front + ["", MARK, "", f"# {Path(str(name)).name} with Mixture of Sparse Attention", "",
                     f"{'An adapter (routers, thresholds, fills) over' if adapter else 'A conversion of'} "
                     f"`{name}`{revision} to Mixture of "
                     f"Sparse Attention (MoSA, arXiv 2505.00315) by [mosa_retrofit](https://pypi.org/project/mosa-retrofit/) "
                     f"{__version__}.", "",
                     "## Conversion", "",
                     f"- dense heads: {dense} of {heads} query heads{groups}, chosen by `{mosa.get('head_choice')}`",
                     f"- the other heads: `{kind}`: 1 token in {mosa.get('sparsity'):g} routed{window}; routing "
                     f"`{mosa.get('routing')}`, one router per {mosa.get('router_granularity', 'head').replace('_', ' ')}, "
                     f"router init `{mosa.get('router_init')}`",
                     f"- layers converted: {len(mosa.get('layers') or [])} of {len(layers)}"]
    check = getattr(cfg, "mosa_check", None)
    if check:
        lines += ["", "## Convert-time check", "",
                  f"{check.get('protocol', 'held-out perplexity')}: original {check['original']:.2f}, converted "
                  f"{check['converted']:.2f} ({check['converted'] / check['original']:.3f}x the original)."]
    positions = positions_of(cfg)
    lengths = [T for T in COST_LENGTHS if positions is None or T <= positions] or [positions]
    lines += ["", "## Costs against the original", "",
              "Attention FLOPs (causal half, projections included) and KV-cache bytes, computed from the structure:",
              "", "| tokens | attention FLOPs | KV bytes |", "|---|---|---|"]
    for T in lengths:
        r = ratios(attention_costs(model, T))
        lines.append(f"| {T:,} | {r.flops:.3f}x | {r.kv_bytes:.3f}x |")
    lines += ["", "## Load", "", f"Needs `pip install 'mosa_retrofit>={REQUIRES}'`.", "", "```python",
              "import mosa_retrofit", 'model = mosa_retrofit.load("PATH_OR_HUB_ID")', "",
              "# or with stock transformers (the folder's modeling_mosa.py asks mosa_retrofit for the classes)",
              "from transformers import AutoModelForCausalLM",
              'model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)', "```", "",
              "Without `trust_remote_code=True` transformers refuses the folder rather than run it dense."]
    if adapter:
        lines += ["", f"The base is read from `{name}` and its weights are checked against the fingerprint "
                  f"`{base.get('fingerprint')}` ({base.get('dtype')}); a different base is refused."]
    return "\n".join(lines) + "\n"
