"""What a converted model weighs on disk: a full save against an adapter-only save (routers, thresholds, fills and
the plan over a fingerprinted base). SmolLM2-135M measured (the default conversion, saved both ways, every file
counted); Llama-3.2-1B and Llama-3.1-8B computed from their published shapes on the meta device. Then lm-eval's
stock ``--model hf --model_args pretrained=FOLDER,trust_remote_code=True`` on the saved folder against lm-eval
given the model mosa_retrofit.load returns: per-document rolling log-likelihoods of held-out Wikipedia text.

    python benchmarks/sharing_sizes.py           # writes benchmarks/results/sharing_sizes.md
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def folder_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in Path(path).iterdir() if p.is_file()}


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def main(out: str = "benchmarks/results/sharing_sizes.md") -> None:
    from transformers import AutoModelForCausalLM

    import mosa_retrofit
    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.adapter import is_mosa_tensor
    from mosa_retrofit.convert.hub import load_tokenizer
    from mosa_retrofit.convert.serialization import load_any
    from mosa_retrofit.convert.surgery import apply_plan_, plan_layers
    from mosa_retrofit.study import machine

    sys_path = Path(__file__).resolve().parent
    import sys

    sys.path.insert(0, str(sys_path))
    from fsdp_memory import MODELS

    started = time.time()
    model, source = load_any("smollm2-135m")
    tokenizer = load_tokenizer(source)
    convert_(model, MoSAConfig(), tokenizer=tokenizer, progress=False)
    ids = torch.randint(0, 1000, (1, 64))
    rows = ["| model | dtype | full save | adapter-only save | adapter tensors | adapter / full |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        full, adapter = Path(tmp) / "full", Path(tmp) / "adapter"
        mosa_retrofit.save(model, full, tokenizer=tokenizer)
        mosa_retrofit.save(model, adapter, adapter_only=True, tokenizer=tokenizer)
        f, a = folder_bytes(full), folder_bytes(adapter)
        with torch.no_grad():  # the two load to the same model
            same = torch.equal(mosa_retrofit.load(str(full))(ids).logits, mosa_retrofit.load(str(adapter))(ids).logits)
        assert same, "the adapter and the full save load to different logits"
        stock, ours = _lm_eval_both(full, tokenizer, Path(tmp))
    worst = max(abs(a - b) for a, b in zip(stock, ours))
    rows.append(f"| SmolLM2-135M (measured) | float32 | {mib(sum(f.values()))} | "
                f"{mib(sum(a.values()))} | {mib(a['mosa_adapter.safetensors'])} | "
                f"{sum(a.values()) / sum(f.values()):.5f} |")
    detail = ", ".join(f"{k} {v / 1024:,.1f} KiB" for k, v in sorted(a.items()))
    for name, cfg in MODELS.items():
        with torch.device("meta"):
            big = AutoModelForCausalLM.from_config(cfg)
        apply_plan_(big, plan_layers(big, MoSAConfig(head_choice="first", dense_scope="layer")))
        for dtype, size in (("bfloat16", 2), ("float32", 4)):
            thresholds = sum(b.numel() * 4 for n, b in big.named_buffers() if n.endswith("mosa_threshold"))
            total = sum(p.numel() for p in big.parameters()) * size + thresholds  # parameters(): tied ones once
            extra = sum(p.numel() * size for n, p in big.named_parameters() if is_mosa_tensor(n)) + thresholds
            rows.append(f"| {name} (computed) | {dtype} | {mib(total)} | {mib(extra)} + config | {mib(extra)} | "
                        f"{extra / total:.6f} |")
    text = ("# A full save against an adapter-only save\n\n"
            "Command: `python benchmarks/sharing_sizes.py`\n\n"
            f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s.\n\n"
            "The default conversion (`MoSAConfig()`). SmolLM2: both folders written by `mosa_retrofit.save` with "
            "the tokenizer, every file counted, and both loaded back to equal logits; its adapter folder: " + detail + ". Llama: the "
            "default conversion's structure on the meta device (published shapes), every tensor of the state dict "
            "counted (tied embeddings once); thresholds are float32.\n\n" + "\n".join(rows) + "\n\n"
            f"lm-eval {_version('lm_eval')}, stock `--model hf` by path (`trust_remote_code=True`) against `HFLM` given "
            f"`mosa_retrofit.load(path)`: {len(ours)} held-out Wikipedia documents, rolling log-likelihood; largest "
            f"difference {worst:.2e} nats (sums of {sum(ours) / len(ours):,.1f} nats on average).\n")
    Path(out).write_text(text)
    print(text)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


TASK = """task: held_out_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
metadata:
  version: 1.0
"""


def _lm_eval_both(folder: Path, tokenizer, tmp: Path) -> tuple[list[float], list[float]]:
    """Per-document rolling log-likelihoods from lm-eval's stock hf model by path and from HFLM given our model."""
    import json

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import mosa_retrofit
    from mosa_retrofit.eval.perplexity import split_articles
    from mosa_retrofit.text.assets import wikipedia_articles

    _, held_out = split_articles(wikipedia_articles())
    docs = [a[:2000] for a in held_out[:8]]
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp / "held_out_rolling.yaml").write_text(TASK.format(data=tmp / "docs.jsonl"))
    args = dict(tasks=["held_out_rolling"], task_manager=TaskManager(include_path=str(tmp)), log_samples=True,
                batch_size=1)

    def lls(result) -> list[float]:
        return [s["resps"][0][0] for s in sorted(result["samples"]["held_out_rolling"], key=lambda s: s["doc_id"])]

    stock = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,device=cpu",
                                    **args)
    ours = lm_eval.simple_evaluate(model=HFLM(pretrained=mosa_retrofit.load(str(folder)), tokenizer=tokenizer,
                                              batch_size=1), **args)
    return lls(stock), lls(ours)


if __name__ == "__main__":
    main()
