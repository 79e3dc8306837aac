"""``mosa-retrofit convert`` and ``mosa-retrofit inspect``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch

from mosa_retrofit.convert.calibration import calibration_ids
from mosa_retrofit.convert.config import MoSAConfig, field_choices
from mosa_retrofit.convert.heads import HEAD_GROUPS
from mosa_retrofit.text.protocol import PROTOCOL
from mosa_retrofit import validate
from mosa_retrofit.validate import positions_of, within_positions

from .common import HelpFormatter, add_dataclass_flags, given_flags
from .flags import COUNT

PRESETS = ("default", "paper")
DTYPES = {name: getattr(torch, name) for name in validate.DTYPES}  # name -> torch dtype
DEFAULT_CALIBRATION = "wikipedia-offline"
CONFIG_SKIP = ("dense_heads_pattern", "dense_head_ids", "base_model_name_or_path", "version")


def _count(text: str) -> float:
    v = float(text)
    if v < 0 or (v >= 1 and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or a fraction in [0, 1), got {text!r}")
    return int(v) if v >= 1 or v == 0 else v


def _layers(text: str):
    if text == "all" or text.startswith("re:"):
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', '0,1,5' or 're:<regex>', got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a pretrained causal LM to hybrid MoSA and save it",
        description="Convert MODEL (a local folder, a hub id, 'smollm2-135m', the embedded default, or "
                    "'gemma3-270m', embedded Gemma-3-270M-it with 32k positions) to hybrid "
                    "MoSA attention and save it to OUT (safetensors + config.json with a 'mosa' block; load it "
                    "with mosa_retrofit.load(OUT)). The defaults are the best retrofit we know: a quarter of the KV "
                    "groups stay dense, those that read hidden keys back (retrieval heads, wherever they are in the "
                    "model); the others become key-selection MoSA units (4 sinks + a 256-token window + the 1/64 "
                    "of tokens a router passes) with one router per KV group fitted on --calibration-data and "
                    "causal routing (the model generates with a sparse KV cache). Layers whose own sliding window "
                    "is short (Gemma 3's 512-token local layers; --keep-sliding) stay as they are. --preset paper "
                    "gives the MoSA paper's conversion instead. Ends with "
                    "held-out perplexity of the original and the converted model (--no-check skips it). "
                    "Precedence: flags > --config > --preset.",
        formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist, or use --overwrite)")
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="default: the best retrofit we know (calibrated); paper: the MoSA paper's conversion "
                        "(4 first heads dense, random sigmoid routers, expert-choice top-k, zero fill)")
    p.add_argument("--config", help="a MoSAConfig JSON file (over the preset; flags given explicitly override it)")
    p.set_defaults(config_flags=add_dataclass_flags(p, MoSAConfig, choices=field_choices(), skip=CONFIG_SKIP,
                                                    parsers={"dense_heads": _count, "layers": _layers}))
    p.add_argument("--calibration-data", "--calib-text", dest="calibration_data", default=DEFAULT_CALIBRATION,
                   help="calibration text: 'wikipedia-offline' (embedded; its held-out articles are never used), "
                        "'shakespeare-offline', text/jsonl/parquet files or a hub dataset (falls back to the "
                        "embedded text when the hub is unreachable)")
    p.add_argument("--calib-sequences", type=COUNT, default=16, help="calibration sequences")
    p.add_argument("--calib-length", type=COUNT, default=None,
                   help="tokens per calibration sequence (default: 512, or the model's positions if fewer)")
    p.add_argument("--device", default="cpu",
                   help="where the model is loaded and converted: cpu, cuda, cuda:1, ... (calibration, retrieval "
                        "scoring and the check run there; statistics accumulate in fp32/fp64)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the weights' dtype while converting, and as saved (bfloat16 halves memory; the routers "
                        "are fitted from statistics accumulated in fp32/fp64 either way)")
    p.add_argument("--device-map", metavar="MAP",
                   help="spread a model larger than one device over several (accelerate's device_map: 'auto', "
                        "'balanced', ...); replaces --device")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="after converting, measure held-out perplexity of the original and the converted model "
                        f"({PROTOCOL.describe()}; about half a minute for SmolLM2-135M on 2 CPU cores)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write only what the conversion adds (routers, thresholds, fills, the plan: kilobytes to "
                        "megabytes) and a fingerprint of MODEL; loading it reads MODEL and refuses a different one")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it holds a converted checkpoint written by this tool and nothing else")
    p.set_defaults(run=run_convert)


def build_config(args: argparse.Namespace):
    import json

    from mosa_retrofit.convert.config import PAPER

    base = dict(PAPER) if args.preset == "paper" else {}
    if args.config:
        path = Path(args.config)
        if path.is_dir():
            raise ValueError(f"--config {args.config} is a folder; give a MoSAConfig .json file")
        if not path.is_file():
            raise FileNotFoundError(f"--config {args.config} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of MoSAConfig fields")
        base.update(data)
    base.update(given_flags(args, args.config_flags))
    return MoSAConfig.from_dict(base)


def run_convert(args: argparse.Namespace) -> int:
    from mosa_retrofit.atomic import output_lock

    config = build_config(args)  # validates every value before anything is loaded
    device = checked_device(args.device)
    if args.device_map and "cuda" in args.device_map and not torch.cuda.is_available():
        raise ValueError(f"--device-map {args.device_map}: this torch has no CUDA device (torch {torch.__version__}); "
                         "use --device-map auto or cpu, or drop it")
    for name in ("calib_sequences", "calib_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    check_output(out, args.model, args.overwrite)
    with output_lock(out):  # a second convert into OUT stops here, in one line, while this one runs
        check_output(out, args.model, args.overwrite)  # (what a run that just finished left there)
        return _convert_into(args, config, device, out)


def _convert_into(args: argparse.Namespace, config, device: torch.device, out: Path) -> int:
    from transformers import AutoModelForCausalLM

    from mosa_retrofit import convert_, save
    from mosa_retrofit.convert.families import family_of
    from mosa_retrofit.convert.hub import load_tokenizer, read_config
    from mosa_retrofit.convert.surgery import check_config
    from mosa_retrofit.eval.perplexity import perplexity
    from mosa_retrofit.text.assets import model_reference, resolve_model

    source = resolve_model(args.model)
    hf_config = read_config(source)
    calib_length = check_lengths(config, args, positions_of(hf_config))
    saved = getattr(hf_config, "mosa", None)
    if saved:
        base = saved.get("base_model_name_or_path") if isinstance(saved, dict) else None
        raise ValueError(f"{args.model} is already converted (its config.json has a 'mosa' block): load it with "
                         f"mosa_retrofit.load, or convert the original{f' ({base})' if base else ''} again to change "
                         "the conversion")
    config = dataclasses.replace(config, base_model_name_or_path=model_reference(args.model))
    print(f"loading {args.model} ...", flush=True)
    placement = {"device_map": args.device_map} if args.device_map else {"device_map": {"": str(device)}} \
        if device.type != "cpu" else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[args.dtype], **placement)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError):
        tokenizer = None  # a bare checkpoint: fine unless calibration or the check needs to tokenize text
    family_of(model)  # unsupported families fail here, before any work
    check_config(model, config)  # and every value the model must fit
    if tokenizer is None and (config.needs_calibration or args.check):
        raise ValueError(f"{args.model} has no tokenizer, which calibration and the check need (use --preset paper "
                         "--no-check for a bare checkpoint)")
    calibration = blocks = before = None
    if config.uses_calibration:
        calibration = calibration_ids(tokenizer, args.calibration_data, args.calib_sequences, calib_length)
    if args.check:
        blocks = PROTOCOL.blocks(tokenizer, positions_of(model.config))
        before = perplexity(model, blocks, progress=True)
    convert_(model, config, calibration=calibration, tokenizer=tokenizer, checked=True)  # (checked above)
    after = None
    if args.check:
        after = perplexity(model, blocks, progress=True)
        described = PROTOCOL.describe(positions_of(hf_config))
        model.config.mosa_check = {"protocol": described, "original": before, "converted": after}
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)
    save(model, out, adapter_only=args.adapter_only, tokenizer=tokenizer, overwrite=args.overwrite)
    print(summary(model, min(2048, positions_of(hf_config) or 2048)))
    if args.check:
        print(f"\ncheck ({described}): original {before:.2f}, converted {after:.2f} "
              f"({after / before:.2f}x the original)")
        if after > 4 * before:
            print("the converted model needs adaptation before use: mosa-retrofit train (see recipes/)")
    print(f"\nsaved {'an adapter of ' + args.model + ' ' if args.adapter_only else ''}to {out}; load with "
          f"mosa_retrofit.load({str(out)!r}) or AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          "trust_remote_code=True)")
    return 0


def checked_device(name: str) -> torch.device:
    """``name`` as a device this torch has (one line naming it otherwise, before anything is loaded)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch has no CUDA device (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name}: convert runs on cpu or cuda")
    backend = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, "xpu", None)
    if device.type in ("mps", "xpu") and not (backend is not None and backend.is_available()):
        raise ValueError(f"--device {name}: this torch has no {device.type} device (torch {torch.__version__}); "
                         "use cpu" + (" or cuda" if torch.cuda.is_available() else ""))
    return device


def check_lengths(config: MoSAConfig, args: argparse.Namespace, positions: int | None) -> int:
    """Lengths against the model's positions and what calibration can fit, before the model is loaded; returns
    the calibration length (``--calib-length``, or 512 tokens where the model has them)."""
    explicit = getattr(args, "local_window", None) is not None  # the default window on a short model: noted later
    if explicit and positions is not None and HEAD_GROUPS[config.sparse_heads].windowed \
            and config.local_window >= positions:
        raise ValueError(f"--local-window {config.local_window:,} covers all {positions:,} positions of "
                         f"{args.model}: its '{config.sparse_heads}' heads would attend every token (a no-op); give "
                         f"--local-window < {positions:,}")
    length = args.calib_length if args.calib_length is not None else min(512, positions or 512)
    if config.uses_calibration:
        within_positions("--calib-length", length, positions, args.model)
        floor = config.calibration_floor
        if length < floor:
            raise ValueError(f"--calib-length {length} is too short to calibrate this conversion: it "
                             f"needs >= {floor} tokens per sequence (one routed token at sparsity "
                             f"{config.sparsity:g})")
    return length


def check_writable_parent(path: Path, what: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder this process may write into."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path} lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: {parent} is read-only for this user")


def sweep_temporaries(out: Path) -> None:
    """Remove the half-written folders an earlier convert into ``out`` left when it was killed
    (``.OUT.tmp-PID-*`` / ``.OUT.old-PID`` of a process that no longer runs)."""
    for p in out.parent.glob(f".{out.name}.*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:tmp-(\d+)-\w+|old-(\d+))", p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m.group(1) or m.group(2))
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(p, ignore_errors=True)
            print(f"removed {p}, left half-written by an earlier convert that was stopped", flush=True)


# what save_pretrained of a converted model and its tokenizer write
_CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                     "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                     "modeling_mosa.py", "README.md", "mosa_adapter.safetensors")


def check_output(out: Path, model: str, overwrite: bool) -> None:
    """OUT must not exist, or (with --overwrite) be a folder that holds a converted checkpoint and nothing
    else; never the input model, a folder holding it, the working directory, a home or a root folder, nor a
    symlink; its parent must be a folder that can be written (checked before any work)."""
    if out.is_symlink():
        raise ValueError(f"OUT {out} is a symlink (to {os.path.realpath(out)}); give the folder itself")
    check_writable_parent(out, "OUT")
    if not out.exists():
        return
    if not overwrite:
        raise ValueError(f"{out} exists; choose another OUT or pass --overwrite")
    target = out.resolve()
    source = Path(model).expanduser().resolve() if Path(model).expanduser().exists() else None
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path(target.anchor)}
    if target in protected or (source is not None and (source == target or target in source.parents)):
        raise ValueError(f"--overwrite refuses OUT = {out}: it is the input model, a folder holding it, the working "
                         "directory, a home or a root folder")
    if not target.is_dir() or not (target / "config.json").is_file():
        raise ValueError(f"--overwrite refuses OUT = {out}: it is not a converted checkpoint folder")
    import json

    try:
        converted = bool(json.loads((target / "config.json").read_text()).get("mosa"))
    except (ValueError, OSError):
        converted = False
    unexpected = sorted(p.name for p in target.iterdir() if p.name not in _CHECKPOINT_FILES
                        and not p.name.startswith("model-0"))
    if not converted or unexpected:
        why = "its config.json has no 'mosa' block" if not converted else f"it also holds {unexpected[:5]}"
        raise ValueError(f"--overwrite refuses OUT = {out}: {why} (only a folder written by convert is replaced)")


def summary(model, T: int) -> str:
    """Per-layer table: head split, k, attention FLOPs, KV entries and KV bytes relative to the original."""
    from mosa_retrofit.convert.costs import attention_costs, ratios

    rows = ["| layer | dense | local | MoSA | k | attention FLOPs × | KV entries × | KV bytes × |",
            "|---|---|---|---|---|---|---|---|"]
    costs = attention_costs(model, T)
    for c in costs:
        rows.append(f"| {c.layer} | {c.dense} | {c.local} | {c.mosa} | {c.k or '-'} | {c.flops / c.flops_original:.3f} "
                    f"| {c.kv / c.kv_original:.3f} | {c.kv_bytes / c.kv_bytes_original:.3f} |")
    r = ratios(costs)
    held, original = sum(c.kv_bytes for c in costs), sum(c.kv_bytes_original for c in costs)
    rows.append(f"| all | | | | | **{r.flops:.3f}** | **{r.kv:.3f}** | **{r.kv_bytes:.3f}** |")
    return (f"At T = {T} (FLOPs count the causal half; KV entries per query head as in the paper; KV bytes what "
            f"a cache holds under GQA: {_mib(held)} against {_mib(original)} for the original):\n\n" + "\n".join(rows))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
