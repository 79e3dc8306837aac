"""``mosa-retrofit bench MODEL`` (bench/model.py) and the GPU benchmark script at toy sizes on tiny models: the
rows it prints, its FLOP and byte limits against counts written here."""

import re
import sys
from pathlib import Path

import pytest
import torch
from mosa_retrofit.cli.main import main
from tiny_models import fake_retrieval, tiny_model
from train_fixtures import make_world
from transformers import AutoModelForCausalLM, AutoTokenizer

from mosa_retrofit import MoSAConfig, convert_
from mosa_retrofit.bench.model import (
    bench_model,
    model_flops,
    original_flops,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[2]


def _converted(model):
    calib = torch.randint(1, 100, (4, 64), generator=torch.Generator().manual_seed(0))
    return convert_(model, MoSAConfig(local_window=8, sparsity=8), calibration=calib,
                    retrieval=fake_retrieval(model), progress=False)


def test_model_flops_against_a_hand_count():
    """Attention (projections + causal scores), every MLP matrix at every token, the lm_head at the asked
    tokens; the converted model's original_flops is the unconverted model's count."""
    model = tiny_model("llama")
    cfg = model.config
    D, H, L, I, V, T = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size, \
        cfg.vocab_size, 48
    d = D // H
    attention = L * H * (8 * D * d * T + 2 * d * T * T)
    mlp = L * 3 * D * I
    assert model_flops(model, T, 1) == attention + 2 * T * mlp + 2 * V * D
    assert model_flops(model, T, T) == attention + 2 * T * mlp + 2 * T * V * D
    converted = _converted(tiny_model("llama"))
    assert original_flops(converted, T, 1) == model_flops(model, T, 1)
    assert model_flops(converted, T, 1) < model_flops(model, T, 1)


def test_bench_rows_ratios_and_limits():
    original, converted = tiny_model("llama"), _converted(tiny_model("llama"))
    ids = torch.randint(1, 100, (1, 97), generator=torch.Generator().manual_seed(1))
    rows = bench_model(converted, original, ids, [48, 96], [1, 3], decode_steps=2, train_length=32, reps=1,
                       progress=False)
    kinds = [(r.measure, r.tokens) for r in rows]
    assert kinds[:4] == [("prefill", 48), ("decode b=1", 48), ("decode b=3", 48), ("KV cache", 48)]
    assert ("train step", 32) in kinds and ("prefill", 96) in kinds
    for r in rows:
        if r.measure in ("prefill", "train step"):  # times: speed-up = original / converted
            assert r.ratio == pytest.approx(r.original / r.converted)
        elif r.measure.startswith("decode"):  # tokens/s
            assert r.ratio == pytest.approx(r.converted / r.original)
    prefill96 = next(r for r in rows if r.measure == "prefill" and r.tokens == 96)
    assert prefill96.limit == pytest.approx(model_flops(original, 96, 1) / model_flops(converted, 96, 1))
    kv = {r.tokens: r for r in rows if r.measure == "KV cache"}
    assert 0 < kv[96].ratio < 1  # a quarter of the groups dense, the others a window of 8 + routed rows
    b3 = next(r for r in rows if r.measure == "decode b=3" and r.tokens == 96)
    wb = weight_bytes(original), weight_bytes(converted)
    assert b3.limit == pytest.approx((wb[0] + 3 * kv[96].original) / (wb[1] + 3 * kv[96].converted))


def test_a_chunked_prefill_holds_what_one_forward_holds():
    """bench --prefill-chunk: the cache after chunks of a prompt holds the same bytes, and the next token is the
    same, as after one forward (original and converted); the chunked run's rows are the same rows."""
    from mosa_retrofit.bench.model import greedy_prefill as prefill
    from mosa_retrofit.convert.cache import cache_bytes

    ids = torch.randint(1, 100, (1, 90), generator=torch.Generator().manual_seed(2))
    for model in (tiny_model("llama"), _converted(tiny_model("llama"))):
        (whole, token), (chunked, token2) = prefill(model.eval(), ids), prefill(model, ids, chunk=32)
        assert cache_bytes(chunked)[:2] == cache_bytes(whole)[:2] and sum(cache_bytes(whole)[:2]) > 0
        assert torch.equal(token, token2)
    rows = bench_model(_converted(tiny_model("llama")), tiny_model("llama"), ids, [48], [1], decode_steps=2,
                       train_length=None, reps=1, progress=False, chunk=16)
    assert [r.measure for r in rows][:3] == ["prefill", "decode b=1", "KV cache"]


def test_cli_bench_model_is_bench_MODEL(tmp_path, capsys):
    base, _ = make_world(tmp_path, positions=256)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    calib = torch.randint(1, len(tok), (4, 64), generator=torch.Generator().manual_seed(0))
    convert_(model, MoSAConfig(local_window=8, sparsity=8, base_model_name_or_path=str(base)), calibration=calib,
             retrieval=fake_retrieval(model), progress=False)
    model.save_pretrained(tmp_path / "conv")
    tok.save_pretrained(tmp_path / "conv")
    out = tmp_path / "speed.md"
    args = ["--contexts", "32,64", "--batch", "1,2", "--decode-tokens", "2", "--train-length", "32", "--reps", "1",
            "--prefill-chunk", "16", "--output", str(out)]
    assert main(["bench", str(tmp_path / "conv"), *args]) == 0
    text = capsys.readouterr().out
    assert "thread(s)" in text and "Limit" in text and "prefills read 16 tokens per forward" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows][:4] == ["prefill", "decode b=1", "decode b=2", "KV cache"]
    assert any(re.search(r"\d+\.\d\dx \(FLOPs\)", r) for r in rows) and any("(bytes)" in r for r in rows)
    assert out.read_text().strip().endswith(rows[-1].strip())
    assert main(["bench", str(tmp_path / "conv"), "--contexts", "1000", "--reps", "1"]) == 2
    assert "--contexts = 1,000 reaches beyond the 256 positions" in capsys.readouterr().err
    assert main(["bench", str(base)]) == 2  # not converted
    assert "not a converted model" in capsys.readouterr().err


def test_gpu_script_runs_at_toy_sizes_on_cpu(tmp_path):
    """benchmarks/gpu_speed.py --small: the GPU benchmark's own code on any machine, so it cannot rot."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_speed
    finally:
        sys.path.pop(0)
    out = tmp_path / "gpu.md"
    text = gpu_speed.main(["--small", "--device", "cpu", "--dtype", "float32", "--batch", "1,2", "--out", str(out)])
    assert out.read_text() == text
    for name in ("llama-3.2-1b-shape", "smollm2-135m"):
        assert f"### {name}" in text
    assert text.count("| prefill |") == 4 and text.count("| decode b=2 |") == 4


def test_a_peak_memory_of_zero_is_said_not_divided():
    from mosa_retrofit.bench.model import SpeedRow, format_rows

    line = format_rows([SpeedRow("peak memory", 64, 0, 0, None, None, "")]).splitlines()[-1]
    assert "not measurable" in line and "0.000x" not in line


def test_decoding_stays_within_learned_positions():
    """GPT-2 embeds positions in a table: decoding after a context at its last position would index past it.
    With the model's positions the decode rows are timed after fewer tokens and say so; the KV row is still
    the full context's (the original's cache holds 2 (K, V) x layers x heads x d floats per token)."""
    original, converted = tiny_model("gpt2"), _converted(tiny_model("gpt2"))
    P = original.config.n_positions  # 128
    ids = torch.randint(1, 100, (1, P + 1), generator=torch.Generator().manual_seed(2))
    rows = bench_model(converted, original, ids, [P], [1], decode_steps=4, train_length=None, reps=1,
                       progress=False, positions=P)
    kinds = {r.measure: r.tokens for r in rows}
    assert kinds["prefill"] == P and kinds["decode b=1"] == P - 5 and kinds["KV cache"] == P
    kv = next(r for r in rows if r.measure == "KV cache")
    cfg = original.config
    assert kv.original == 2 * cfg.n_layer * cfg.n_embd * P * 4
    with pytest.raises(IndexError):  # what the positions guard prevents
        bench_model(converted, original, ids, [P], [1], decode_steps=4, train_length=None, reps=1, progress=False)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable high-water mark")
def test_peak_memory_sees_a_call_that_follows_a_larger_one():
    """What a call allocates shows as its peak even right after a larger call freed more (as the converted model's
    prefill follows the original's): the heap would otherwise hand back pages it kept resident, and the second
    call would read about 0."""
    from mosa_retrofit.bench.model import peak_bytes

    pins = []  # small tensors that outlive each call, one above every large one: the heap cannot shrink past them

    def work(pieces: int, kib: int) -> None:  # pieces x kib live at once
        kept = []
        for _ in range(pieces):
            kept.append(torch.ones(kib * 1024 // 4))
            pins.append(torch.ones(16))

    for _ in range(2):
        work(16, 1024)  # 16 MiB, freed
    peaks = [peak_bytes(lambda: work(64, 256), torch.device("cpu")) for _ in range(3)]  # 16 MiB again
    assert all(p is not None and 14 * 2**20 <= p <= 20 * 2**20 for p in peaks), [p / 2**20 for p in peaks]
