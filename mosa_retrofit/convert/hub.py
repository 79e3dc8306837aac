"""A converted folder is a Hugging Face model: what its config.json declares and the code that travels with it.

A converted model's ``save_pretrained`` writes, beside the stock files:

- config.json with ``model_type: "mosa_<base>"`` (a type transformers does not know, so no stock loader reads the
  folder as its base model and runs it dense), ``mosa_base_model_type: "<base>"`` and an ``auto_map`` that names
  the classes of ``modeling_mosa.py``;
- ``modeling_mosa.py``: a few lines that import the installed mosa_retrofit and ask it for those classes
  (``remote_classes``); when mosa_retrofit is missing or too old it says in one line what to install.

So ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (and ``pipeline``, lm-eval's ``hf``
model) returns exactly what ``mosa_retrofit.load(path)`` returns, and without ``trust_remote_code`` every stock
entry point refuses the folder instead of loading it dense. In memory a converted model keeps its base's config
class and ``model_type``: only the files on disk carry the declaration (``declare``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..atomic import write_atomic

PREFIX = "mosa_"  # model_type on disk: PREFIX + the base's model_type
CODE_FILE = "modeling_mosa.py"
CODE_VERSION = 1  # what a folder's modeling_mosa.py asks of the installed package (remote_classes)
OLDEST_CODE = 1  # the oldest such file this package still serves
REQUIRES = "0.2.0"  # the first mosa_retrofit that serves CODE_VERSION 1
AUTO_MAP = {"AutoConfig": "modeling_mosa.MoSAConfig", "AutoModelForCausalLM": "modeling_mosa.MoSAForCausalLM",
            "AutoModel": "modeling_mosa.MoSAModel"}
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")

_CODE = '''"""MoSA (Mixture of Sparse Attention) conversion of a {base} model, for transformers' ``trust_remote_code``.

Written by mosa_retrofit {version}. It holds no model code: the installed mosa_retrofit builds the classes, so
this folder loads exactly as ``mosa_retrofit.load(folder)`` does.
"""

REQUIRES = "mosa_retrofit>={requires}"
BASE_MODEL_TYPE = "{base}"
CODE_VERSION = {code}
WRITTEN_BY = "{version}"

try:
    from mosa_retrofit.convert.serialization import remote_classes
except ImportError as error:
    raise ImportError(f"this model was converted to MoSA by mosa_retrofit, which is not installed (or older "
                      f"than {{REQUIRES}}): pip install '{{REQUIRES}}'") from error

MoSAConfig, MoSAForCausalLM, MoSAModel = remote_classes(BASE_MODEL_TYPE, CODE_VERSION, WRITTEN_BY)
'''


def package_version() -> str:
    return __version__


def _version(text: str):
    from packaging.version import Version

    return Version(text)


def declared(d: dict) -> dict:
    """A converted model's config dict as its folder declares it (see the module docstring)."""
    base = d.get("mosa_base_model_type") or d["model_type"]
    if base.startswith(PREFIX):
        raise ValueError(f"model_type {base!r} is already a declared MoSA type")
    return {**d, "model_type": PREFIX + base, "mosa_base_model_type": base,
            "auto_map": {**(d.get("auto_map") or {}), **AUTO_MAP}}


def undeclared(d: dict) -> dict:
    """The config dict as the base family's config class reads it (the inverse of ``declared``)."""
    base = d.get("mosa_base_model_type")
    if not base:
        return d
    return {**d, "model_type": base}


def is_declared(d: dict) -> bool:
    return bool(d.get("mosa_base_model_type")) and str(d.get("model_type", "")).startswith(PREFIX)


def config_dict(path: str, **hub) -> dict:
    """config.json of a folder or hub id, as stored."""
    from transformers import PretrainedConfig

    d, _ = PretrainedConfig.get_config_dict(str(path), **{k: v for k, v in hub.items() if k in HUB_KWARGS})
    return d


def read_config(path: str, **hub):
    """The transformers config of a folder or hub id, converted or not: a declared MoSA folder reads as its base
    family's config class (with its ``mosa`` block), everything else as ``AutoConfig`` reads it."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    hub = {k: v for k, v in hub.items() if k in HUB_KWARGS}
    d = config_dict(path, **hub)
    if not is_declared(d):
        return AutoConfig.from_pretrained(str(path), **hub)
    base = d["mosa_base_model_type"]
    if base not in CONFIG_MAPPING:
        raise ValueError(f"{path}: its base model type {base!r} is not known to this transformers")
    return CONFIG_MAPPING[base].from_dict(undeclared(d))


def declare(folder: Path) -> None:
    """Turn the config.json stock ``save_pretrained`` wrote into the declared form and write the folder's code."""
    folder = Path(folder)
    d = json.loads((folder / "config.json").read_text())
    if not is_declared(d):
        d = declared(d)
    write_atomic(folder / "config.json", json.dumps(d, indent=2, sort_keys=True) + "\n")
    write_atomic(folder / CODE_FILE, _CODE.format(base=d["mosa_base_model_type"], version=package_version(),
                                                   requires=REQUIRES, code=CODE_VERSION))


def check_code(code_version: int, written_by: str) -> None:
    """A folder's modeling_mosa.py against this package: refused, with what to run, when either is too old."""
    installed = package_version()
    if code_version > CODE_VERSION:
        raise ImportError(f"this model's modeling_mosa.py was written by mosa_retrofit {written_by} (code version "
                          f"{code_version}); the installed mosa_retrofit {installed} reads up to version "
                          f"{CODE_VERSION}: pip install -U 'mosa_retrofit>={written_by}'")
    if code_version < OLDEST_CODE:
        raise ImportError(f"this model's modeling_mosa.py was written by mosa_retrofit {written_by} (code version "
                          f"{code_version}), older than the installed mosa_retrofit {installed} still reads "
                          f"({OLDEST_CODE}): save it again with mosa_retrofit.save(mosa_retrofit.load(path), path2), "
                          f"or install 'mosa_retrofit=={written_by}'")


def load_tokenizer(path: str, **kwargs):
    """``AutoTokenizer.from_pretrained(path)`` for a folder or hub id, converted or not, without transformers'
    remote-code prompt: the config it reads first is given (``read_config``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), config=read_config(path, **kwargs), **kwargs)
