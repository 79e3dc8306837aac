"""The RULER-style suite on models: the scorer tells a reader from a model blind past a window, the answers come
from greedy generation through the converted model's own cache (equal to a plain greedy loop), and the tables
put the worst task first."""

import random
import re
import shutil
import string

import pytest
import torch
from tiny_models import CAUSAL, plain_config, tiny_config
from train_fixtures import make_tokenizer

from mosa_retrofit.convert.surgery import convert_
from mosa_retrofit.eval.ruler import greedy_answerer, ruler_prompts, run_ruler, task_ratios
from mosa_retrofit.text.ruler import TASKS

NIAH = [t for t in TASKS if t.startswith("niah")]


def _texts(n=30, seed=0):
    rng = random.Random(seed)
    words = "apple anchor basket candle castle copper desert engine falcon forest garden harbor island kettle".split()
    return [" ".join(f"The {rng.choice(words)} {rng.choice(words)} near the {rng.choice(words)}."
                     for _ in range(rng.randint(8, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(_texts()) + string.ascii_letters + string.digits + string.punctuation + " \n"
    return make_tokenizer(text + " special magic numbers words uuids variables", vocab=400)


def window_reader(tokenizer, window: int):
    """A stand-in model that reads only the last ``window`` tokens of a prompt and answers every asked key with
    the values its needles state there (what a model blind beyond its window could at best do)."""

    def answer(prompt):
        text = tokenizer.decode(prompt.ids[0, -window:].tolist())
        asked = re.search(r"special magic \w+ for (.+?) mentioned", text.split("\n")[-1])
        keys = re.split(r", | and ", asked.group(1)) if asked else []
        stated = re.findall(r"special magic \w+ for ([\w-]+) is: ([\w-]+)\.", text)
        return " ".join(v for k, v in stated if k in keys)

    return answer


def test_a_reader_of_the_whole_prompt_passes_and_one_blind_past_a_window_fails(tokenizer):
    prompts = ruler_prompts(tokenizer, _texts(), NIAH, [1200], trials=3)
    oracle = lambda p: " and ".join(p.answers)
    scores = run_ruler({"oracle": oracle, "reader": window_reader(tokenizer, 10**6),
                        "blind": window_reader(tokenizer, 150)}, prompts, progress=False)
    assert all(v == 1.0 for v in scores["oracle"].values())
    assert all(v == 1.0 for v in scores["reader"].values()), scores["reader"]
    # the asked needles at depths 1/6, 1/2 and 5/6 of 1,200 tokens are all further back than 150 tokens (the
    # other values of a multi-value or multi-query prompt lie anywhere: some may be in view)
    blind = scores["blind"]
    assert all(blind[t, 1200] == 0.0 for t in ("niah_number", "niah_word", "niah_uuid", "niah_multikey")), blind
    assert all(blind[t, 1200] < 1.0 for t in ("niah_multivalue", "niah_multiquery")), blind


def test_the_same_prompts_for_every_model(tokenizer):
    a = ruler_prompts(tokenizer, _texts(), ["niah_multikey"], [600], trials=2, seed=3)
    b = ruler_prompts(tokenizer, _texts(), ["niah_multikey"], [600], trials=2, seed=3)
    assert all(x.ids.equal(y.ids) and x.answers == y.answers for x, y in zip(a["niah_multikey", 600],
                                                                           b["niah_multikey", 600]))
    with pytest.raises(ValueError, match="unknown RULER tasks"):
        ruler_prompts(tokenizer, _texts(), ["niah_single"], [600], trials=1)


def test_greedy_answers_through_the_sparse_cache_equal_a_plain_greedy_loop(tokenizer):
    cfg = tiny_config("llama")
    cfg.vocab_size, cfg.max_position_embeddings = len(tokenizer), 1024
    torch.manual_seed(0)
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    convert_(model, plain_config(**{**CAUSAL, "sparsity": 8}),
             calibration=torch.randint(1, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(1)))
    prompt = ruler_prompts(tokenizer, _texts(), ["niah_number"], [400], trials=1)["niah_number", 400][0]
    ids = prompt.ids.clone()
    with torch.no_grad():  # by hand: the argmax of a full forward over everything so far, no cache
        for _ in range(prompt.max_new_tokens):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    expected = tokenizer.decode(ids[0, prompt.ids.shape[1]:], skip_special_tokens=True)
    assert greedy_answerer(model, tokenizer)(prompt) == expected
    # chunked prefill through the sparse cache: the same answer, the prompt read in ceil(P / 96) forwards
    widths = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        assert greedy_answerer(model, tokenizer, prefill_chunk=96)(prompt) == expected
    finally:
        hook.remove()
    P = prompt.ids.shape[1]
    assert widths[: -(-P // 96)] == [96] * (P // 96) + ([P % 96] if P % 96 else [])


def test_the_worst_task_comes_first_and_unsolved_tasks_last():
    original = {("a", 1): 1.0, ("a", 2): 1.0, ("b", 1): 0.5, ("b", 2): 0.5, ("c", 1): 0.0, ("c", 2): 0.0}
    converted = {("a", 1): 1.0, ("a", 2): 0.5, ("b", 1): 0.5, ("b", 2): 0.5, ("c", 1): 0.5, ("c", 2): 0.0}
    rows = task_ratios(original, converted, solved=0)
    assert [(r.task, r.ratio) for r in rows] == [("a", 0.75), ("b", 1.0), ("c", None)]


def test_tasks_the_original_does_not_solve_have_no_ratio():
    original = {("a", 1): 1.0, ("a", 2): 0.5, ("b", 1): 0.5, ("b", 2): 0.0, ("c", 1): 0.25, ("c", 2): 0.0}
    converted = {("a", 1): 0.5, ("a", 2): 0.5, ("b", 1): 0.0, ("b", 2): 0.0, ("c", 1): 0.0, ("c", 2): 0.0}
    rows = task_ratios(original, converted)  # means 0.75, 0.25, 0.125: only "a" is solved (>= 0.5)
    assert [(r.task, r.ratio) for r in rows][0] == ("a", 2 / 3)
    assert {r.task for r in rows if r.ratio is None} == {"b", "c"}


@pytest.mark.slow  # a tiny world and two models generating at 1,000 tokens: 14 s
def test_long_suite_ruler_prints_the_table_and_the_kv_cache(tmp_path, capsys):
    from mosa_retrofit.cli.main import main
    from train_fixtures import make_world

    model_dir, _ = make_world(tmp_path, positions=1024)
    twin = tmp_path / "twin"
    shutil.copytree(model_dir, twin)  # the same weights under another name: two columns, equal scores
    assert main(["long", str(model_dir), "--baseline", str(twin), "--suite", "ruler", "--tasks",
                 "frequent_words", "--lengths", "1000,5000", "--trials", "1", "--prefill", "64"]) == 0
    text = capsys.readouterr().out
    assert "the model has 1024 positions: RULER lengths [1000]" in text
    assert "| task | 1000 |" in text and re.search(r"\| frequent_words \| [\d.]+ · [\d.]+ \|", text)
    assert "KV cache held after one 64-token prefill" in text
    with pytest.raises(SystemExit):
        main(["long", str(model_dir), "--suite", "ruler", "--tasks", "niah"])
