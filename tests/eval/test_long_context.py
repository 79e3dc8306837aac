"""Long-context evaluation on tiny models: the passkey generator, the exact scorer, perplexity against context."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from train_fixtures import corpus_text, make_tokenizer

from mosa_retrofit.eval.long_context import context_perplexity, passkey_grid
from mosa_retrofit.text.prompts import FILLER, NAMES, passkey_prompt


@pytest.fixture(scope="module")
def tokenizer():
    extra = FILLER * 3 + "0123456789 What is the pass key? Remember it. The pass key of the " + " ".join(NAMES)
    return make_tokenizer(corpus_text() + extra, vocab=200)


class Copier(nn.Module):
    """A hand-built induction model: at each position it finds the latest earlier position whose preceding
    tokens match the longest suffix (at least ``n``) of the current context, and predicts the token after it."""

    def __init__(self, vocab: int, n: int = 3):
        super().__init__()
        self.vocab, self.n = vocab, n
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab)
        for t in range(len(ids)):
            best, where = 0, None
            for s in range(t - 1, -1, -1):
                m = 0
                while m <= s and ids[s - m] == ids[t - m]:
                    m += 1
                if m > best:
                    best, where = m, s
            if where is not None and best >= self.n:
                logits[0, t, ids[where + 1]] = 10.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("variant", ["single", "multi"])
@pytest.mark.parametrize("length, depth", [(160, 0.0), (200, 0.5), (240, 1.0), (300, 0.25)])
def test_the_needle_sits_at_the_requested_depth_and_length(tokenizer, variant, length, depth):
    p = passkey_prompt(tokenizer, length, depth, random.Random(0), variant)
    assert p.ids.shape == (1, length)
    text = tokenizer.decode(p.ids[0])
    assert text.endswith(f" is {p.key}") and text.count(p.key) >= 2
    needle = tokenizer.decode(p.ids[0, p.needle_at:])
    assert needle.startswith("The pass key") and p.key in needle.split(".")[0]
    # the asked needle starts at the filler sentence boundary nearest to depth (other keys may sit before it)
    sentence = max(len(tokenizer(s + ". ")["input_ids"]) for s in FILLER.strip().rstrip(".").split(". "))
    others = 0 if variant == "single" else sum(
        len(tokenizer(f"The pass key of the {n} is 12345. ")["input_ids"]) for n in NAMES[:3])
    assert -sentence <= p.needle_at - depth * p.filler_tokens <= sentence + others


def test_the_scorer_is_exact_on_a_copier_and_at_chance_without_the_key(tokenizer):
    copier = Copier(len(tokenizer))
    for variant in ("single", "multi"):
        grid = passkey_grid(copier, tokenizer, [160, 240], [0.0, 0.5, 1.0], trials=3, variant=variant,
                            progress=False)
        assert set(grid.values()) == {1.0}, grid
    rng = random.Random(1)
    misses = 0
    for _ in range(6):  # the needle's tokens replaced by filler: nothing to copy the key from
        p = passkey_prompt(tokenizer, 200, 0.5, rng)
        span = len(tokenizer(f"The pass key is {p.key}. Remember it. {p.key} is the pass key. ")["input_ids"])
        ids = p.ids.clone()
        ids[0, p.needle_at: p.needle_at + span] = ids[0, 0]
        logits = copier(ids).logits[0]
        misses += not torch.equal(logits[p.answer_start - 1: -1].argmax(-1), ids[0, p.answer_start:])
    assert misses == 6


class Bigram(nn.Module):
    """Logits from the current token alone: no use of context at all."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table(input_ids))


def test_context_perplexity_scores_the_same_tokens_at_every_length():
    torch.manual_seed(0)
    docs = [torch.randint(0, 50, (700,)) for _ in range(3)]
    contexts, S = [16, 64, 256], 32
    flat = context_perplexity(Bigram(50), docs, contexts, S, progress=False)
    assert len(set(round(v, 9) for v in flat.values())) == 1  # same tokens, context unused: same perplexity
    model = Bigram(50)
    by_hand = {}
    for L in contexts:  # the tail's loss by hand: every L predicts doc[-S:] from what precedes it
        nll = 0.0
        for d in docs:
            logits = model(d[None, -(L + S):]).logits[0, L - 1: -1]
            nll += torch.nn.functional.cross_entropy(logits, d[-S:], reduction="sum").item()
        by_hand[L] = math.exp(nll / (S * len(docs)))
    assert context_perplexity(model, docs, contexts, S, progress=False) == pytest.approx(by_hand, rel=1e-6)
    # a model that copies improves when the repeated half comes into its context
    rep = [torch.cat([d[:300], d[:300]]) for d in docs]
    copy_ppl = context_perplexity(Copier(50, n=2), rep, [16, 350], 8, progress=False)
    assert copy_ppl[350] < 0.1 * copy_ppl[16]  # the first copy of the tail is in reach only at L = 350


def test_long_command_prints_both_tables_and_draws_the_plot(tmp_path, capsys):
    from mosa_retrofit.cli.main import main
    from train_fixtures import make_world

    model_dir, _ = make_world(tmp_path, positions=1024)
    out = tmp_path / "plots"
    assert main(["long", str(model_dir), "--baseline", str(model_dir), "--lengths", "120,5000", "--depths", "0,1",
                 "--trials", "1", "--contexts", "16,64,1020", "--score-tokens", "16", "--documents", "1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the model has 1024 positions: passkey lengths [120], contexts [16, 64]" in text
    assert "| model | 120 |" in text and "| model | L = 16 | L = 64 |" in text
    # tiny llama: 2 layers x K and V x 2 KV heads x 120 tokens x d = 16 x 4 bytes
    assert f"| {model_dir} | {2 * 2 * 2 * 120 * 16 * 4 / 2**20:.1f} MiB (1.000x) |" in text
    assert (out / "long_context.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["long", str(model_dir), "--depths", "1.5"])


def test_prefill_footprint_counts_what_the_cache_holds():
    from tiny_models import tiny_model

    from mosa_retrofit.eval.long_context import prefill_footprint

    held, seconds = prefill_footprint(tiny_model("llama"), 40)
    assert held == 2 * 2 * 2 * 40 * 16 * 4 and seconds > 0  # layers x K/V x KV heads x tokens x d x fp32


def test_a_chunked_prefill_leaves_the_same_sparse_cache():
    """Chunks through the sparse cache keep what one forward keeps: the same bytes for a converted model with a
    windowed layer (Gemma 3's sliding layer 0 converted too, keep_sliding=0)."""
    from tiny_models import CAUSAL, plain_config, tiny_model

    from mosa_retrofit import convert_
    from mosa_retrofit.eval.long_context import prefill_footprint

    model = convert_(tiny_model("gemma3_text"), plain_config(**{**CAUSAL, "sparsity": 4}),
                     calibration=torch.randint(1, 100, (2, 64), generator=torch.Generator().manual_seed(1)))
    whole = prefill_footprint(model, 60)[0]
    assert prefill_footprint(model, 60, chunk=16)[0] == whole
    assert whole > 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("converted", [False, True])
def test_chunked_scoring_gives_the_logits_of_one_forward(family, converted):
    """Reading a long input through the KV cache in chunks scores the same tail as one forward over all of it:
    logits of the last tokens equal (plain full-logits forward as the reference), so passkey verdicts and
    perplexity against context do not depend on --prefill-chunk."""
    from tiny_models import CAUSAL, plain_config, tiny_model

    from mosa_retrofit import convert_
    from mosa_retrofit.eval.long_context import tail_logits

    model = tiny_model(family)
    if converted:
        convert_(model, plain_config(**{**CAUSAL, "sparsity": 4}),
                 calibration=torch.randint(1, 100, (2, 64), generator=torch.Generator().manual_seed(1)))
    model.eval()
    ids = torch.randint(1, 100, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits[:, -9:]  # (1, 9, V) every position computed
        for chunk in (16, 25):
            torch.testing.assert_close(tail_logits(model, ids, 9, chunk), reference, atol=1e-4, rtol=1e-4)
    docs = [torch.randint(1, 100, (90,), generator=torch.Generator().manual_seed(3))]
    whole = context_perplexity(model, docs, [20, 60], score_tokens=12, progress=False)
    chunked = context_perplexity(model, docs, [20, 60], score_tokens=12, progress=False, chunk=16)
    assert chunked == pytest.approx(whole, rel=1e-4)
