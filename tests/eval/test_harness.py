"""lm-evaluation-harness (its standard Hugging Face wrapper, HFLM) on a converted tiny model, offline: local task
YAMLs over local JSONL files, and the harness's numbers checked against log-likelihoods computed here."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")

from mosa_retrofit.cli.main import main  # noqa: E402
from train_fixtures import make_world  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import mosa_retrofit  # noqa: E402
from mosa_retrofit import MoSAConfig, convert_  # noqa: E402
from mosa_retrofit.eval.harness import evaluate_tasks  # noqa: E402
from mosa_retrofit.eval.perplexity import nll  # noqa: E402

PPL_TASK = """task: tiny_ppl
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
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# Short against long answers: an untrained model prefers the shorter continuation (fewer tokens to pay for), so
# the gold answers below make the accuracy neither 0 nor 1 without training anything.
LONG = "the old man remembers a red house and the king crosses the bridge"
QUESTIONS = [
    {"question": "The cat sees", "choices": ["the moon.", LONG + "."], "answer": 0},
    {"question": "A dog follows", "choices": [LONG + " again.", "a letter."], "answer": 1},
    {"question": "My sister paints", "choices": ["an apple.", "the garden and " + LONG + "."], "answer": 0},
    {"question": "The river finds", "choices": [LONG + " at night.", "the hill."], "answer": 0},
    {"question": "A small bird likes", "choices": ["the moon and " + LONG + ".", "a red house."], "answer": 0},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama converted with the default MoSAConfig(), saved; two local lm-eval tasks over local JSONL."""
    root = tmp_path_factory.mktemp("harness")
    model_dir, corpus = make_world(root, positions=1024)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    convert_(model, MoSAConfig(), tokenizer=tok, progress=False)
    out = root / "converted"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    tasks = root / "tasks"
    tasks.mkdir()
    paragraphs = [p.strip() for p in corpus.read_text().split("\n\n") if p.strip()]
    # 6 documents of 5 paragraphs (~390 tokens: past the default local window of 256, inside one 1,024 window)
    docs = [" ".join(paragraphs[5 * i: 5 * i + 5]) for i in range(6)]
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tasks / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / "tiny_ppl.yaml").write_text(PPL_TASK.format(data=tasks / "docs.jsonl"))
    (tasks / "tiny_mc.yaml").write_text(MC_TASK.format(data=tasks / "questions.jsonl"))
    return {"out": out, "tasks": tasks, "docs": docs}


@pytest.fixture(scope="module")
def harness_run(world):
    return evaluate_tasks(str(world["out"]), ["tiny_ppl", "tiny_mc"], include_path=str(world["tasks"]),
                          log_samples=True)


@pytest.fixture(scope="module")
def ours(world):
    """The converted model and tokenizer, loaded here the project's way (not through the harness)."""
    model = mosa_retrofit.load(str(world["out"])).eval()
    assert any(hasattr(m, "mosa_plan") for m in model.modules()), "the model must run converted"
    return model, AutoTokenizer.from_pretrained(world["out"])


def test_rolling_loglikelihood_is_our_nll(world, harness_run, ours):
    """Per document, the harness's rolling log-likelihood is minus our nll on [EOS] + the document's tokens
    (a document inside one window is scored given the EOS token, the prefix of a tokenizer without BOS); the
    word / byte perplexities and bits per byte follow from those sums and the word and byte counts."""
    model, tok = ours
    assert tok.bos_token_id is None and harness_run["max_length"] == 1024
    samples = sorted(harness_run["samples"]["tiny_ppl"], key=lambda s: s["doc_id"])
    assert [s["doc"]["text"] for s in samples] == world["docs"]
    total_ll, words, nbytes, worst = 0.0, 0, 0, 0.0
    for text, sample in zip(world["docs"], samples):
        ids = tok(text).input_ids
        assert 256 < len(ids) and 1 + len(ids) <= 1024  # past the local window, within one harness window
        block = torch.tensor([[tok.eos_token_id, *ids]])
        with torch.no_grad():
            loss, count = nll(model, block)
        assert count == len(ids)
        (harness_ll,) = sample["resps"][0]
        assert harness_ll == pytest.approx(-loss, rel=1e-5, abs=1e-3)
        worst = max(worst, abs(harness_ll + loss))
        total_ll -= loss
        words += len(text.split())
        nbytes += len(text.encode("utf-8"))
    res = harness_run["results"]["tiny_ppl"]
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-5)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / nbytes), rel=1e-5)
    assert res["bits_per_byte,none"] == pytest.approx(-total_ll / nbytes / math.log(2), rel=1e-5)
    print(f"\nmax |harness - ours| per document: {worst:.2e} nats (sums {total_ll / len(samples):.1f} on average); "
          f"word perplexity {res['word_perplexity,none']:.4f} (ours {math.exp(-total_ll / words):.4f}), "
          f"byte perplexity {res['byte_perplexity,none']:.4f}, bits per byte {res['bits_per_byte,none']:.4f}")


def _choice_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """sum of log p(continuation tokens | context) with plain torch; the continuation's tokens are those of
    context + continuation past the context's own (BPE merges never cross the space before a word)."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_multiple_choice_accuracy_is_our_argmax(harness_run, ours):
    model, tok = ours
    samples = sorted(harness_run["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    correct, worst = [], 0.0
    for q, sample in zip(QUESTIONS, samples):
        lls = [_choice_loglikelihood(model, tok, q["question"], " " + c) for c in q["choices"]]
        harness_lls = [ll for ll, _ in sample["filtered_resps"]]
        assert harness_lls == pytest.approx(lls, rel=1e-5, abs=1e-3)
        worst = max(worst, *(abs(a - b) for a, b in zip(harness_lls, lls)))
        correct.append(max(range(len(lls)), key=lls.__getitem__) == q["answer"])
    acc = sum(correct) / len(correct)
    assert 0 < acc < 1  # the check means something
    assert harness_run["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    print(f"\naccuracy {acc:.2f}; max |harness - ours| per answer: {worst:.2e} nats")


def test_cli_runs_local_tasks(world, harness_run, capsys):
    assert main(["eval", str(world["out"]), "--tasks", "tiny_mc", "--include-path", str(world["tasks"])]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | value |" in out
    assert f"| tiny_mc | acc | {harness_run['results']['tiny_mc']['acc,none']:.4f} |" in out
    assert main(["eval", str(world["out"]), "--include-path", str(world["tasks"])]) == 2
    assert "error: --include-path and --limit apply to --tasks only" in capsys.readouterr().err


def test_lm_eval_stock_hf_model_by_path_gives_our_loglikelihoods(world, harness_run, ours):
    """lm-eval's own ``--model hf --model_args pretrained=PATH,trust_remote_code=True`` loads the folder through
    its modeling_mosa.py: the same log-likelihoods as the model loaded here; without trust_remote_code it refuses."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok = ours
    args = dict(tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(world["tasks"])), log_samples=True,
                batch_size=1)
    stock = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={world['out']},trust_remote_code=True,device=cpu", **args)
    samples = sorted(stock["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    for q, sample in zip(QUESTIONS, samples):
        lls = [_choice_loglikelihood(model, tok, q["question"], " " + c) for c in q["choices"]]
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(lls, rel=1e-5, abs=1e-4)
    assert stock["results"]["tiny_mc"]["acc,none"] == harness_run["results"]["tiny_mc"]["acc,none"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={world['out']},device=cpu", **args)
