"""The RULER-style generators: exact lengths, needles where the depth says, answers that the prompt alone decides
(checked by reading the prompt's text back with plain regular expressions), and RULER's scorer."""

import random
import re
import string
from collections import Counter

import pytest
from train_fixtures import make_tokenizer

from mosa_retrofit.text.ruler import ANSWER_TOKENS, TASKS, Filler, ruler_prompt, score

WORDS = ("apple anchor basket bright candle castle clever copper dance desert eager engine falcon feather forest "
         "garden golden hammer harbor honest island jacket kettle ladder lantern letter market meadow mirror "
         "needle noble orange orchard palace pencil pepper planet pocket quiet rabbit river rocket saddle silver "
         "simple spring summer tender thunder timber travel valley velvet violet wagon walnut window winter "
         "yellow").split()


def _texts(n=30, seed=0):
    rng = random.Random(seed)
    return [" ".join(f"The {rng.choice(WORDS)} {rng.choice(WORDS)} near the {rng.choice(WORDS)}."
                     for _ in range(rng.randint(8, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def filler():
    text = " ".join(_texts()) + string.ascii_letters + string.digits + string.punctuation + " \n"
    return Filler(make_tokenizer(text + " special magic numbers words uuids variables", vocab=400), _texts())


def _text(filler, prompt):
    return filler.tokenizer.decode(prompt.ids[0].tolist())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1000, 3000])
def test_every_prompt_and_its_answer_fit_the_length_exactly(filler, task, length):
    prompt = ruler_prompt(task, filler, length, 0.5, random.Random(task))
    assert prompt.ids.shape == (1, length - ANSWER_TOKENS[task])
    assert prompt.max_new_tokens == ANSWER_TOKENS[task]


@pytest.mark.parametrize("task,depth", [(t, d) for t in ("niah_number", "niah_uuid", "niah_multikey")
                                         for d in (0.1, 0.5, 0.9)] + [("variable_tracking", 0.1),
                                                                      ("variable_tracking", 0.5)])
def test_the_asked_needle_sits_at_its_depth(filler, task, depth):
    """Depth: the share of the prompt before the needle (a chain's first link; its other links come after it, so
    a deep chain ends where the question leaves room)."""
    prompt = ruler_prompt(task, filler, 1500, depth, random.Random(f"{task}{depth}"))
    at = prompt.needles_at[0]
    P = prompt.ids.shape[1]
    assert abs(at / P - depth) < 0.1, (at, P)
    head = filler.tokenizer.decode(prompt.ids[0, at:at + 30].tolist())
    assert head.lstrip().startswith("One of the special magic" if task.startswith("niah") else "VAR"), head


@pytest.mark.parametrize("task", ["niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue",
                                  "niah_multiquery"])
def test_needle_answers_are_what_the_question_asks_and_occur_once(filler, task):
    for seed in range(3):
        prompt = ruler_prompt(task, filler, 1500, 0.3, random.Random(seed))
        text = _text(filler, prompt)
        stated = re.findall(r"special magic \w+ for ([\w-]+) is: ([\w-]+)\.", text)
        asked = re.search(r"special magic \w+ for (.+?) mentioned", text.split("\n")[-1]).group(1)
        keys = re.split(r", | and ", asked)
        expected = [v for k, v in stated if k in keys]  # read from the text: every value of every asked key
        assert sorted(expected) == sorted(prompt.answers)
        assert all(text.count(a) == 1 for a in prompt.answers)
        assert len({v for _, v in stated}) == len(stated)  # distractor values differ from the answers
        if task == "niah_multikey":
            assert len(stated) == 4 and len(keys) == 1


def test_variable_tracking_answers_are_the_chain_that_holds_the_value(filler):
    for seed in range(3):
        prompt = ruler_prompt("variable_tracking", filler, 1500, 0.2, random.Random(seed))
        text = _text(filler, prompt)
        assign = dict(re.findall(r"VAR ([A-Z]{5}) = ((?:VAR )?[A-Z0-9]+)\.", text))
        value = re.search(r"assigned the value (\d+) in the text", text).group(1)

        def resolve(name):
            rhs = assign[name]
            return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

        holders = sorted(n for n in assign if resolve(n) == value)
        assert holders == sorted(prompt.answers) and len(holders) == 5
        assert len(assign) == 10  # a second chain, with another value, beside it


def test_common_words_answers_are_the_ten_most_frequent_of_the_list(filler):
    for length in (1500, 4000):
        prompt = ruler_prompt("common_words", filler, length, 0.0, random.Random(length))
        counts = Counter(re.findall(r"\d+\. (\w+) ", _text(filler, prompt)))
        ranked = counts.most_common()
        assert sorted(w for w, _ in ranked[:10]) == sorted(prompt.answers)
        assert ranked[9][1] > ranked[10][1]  # the tenth stands clear of the rest


def test_frequent_words_answers_are_the_three_most_frequent_coded_words(filler):
    prompt = ruler_prompt("frequent_words", filler, 1500, 0.0, random.Random(1))
    body = _text(filler, prompt).split("coded words.\n")[1].split("\nQuestion")[0]
    ranked = Counter(re.findall(r"\b[a-z]{5}\b", body)).most_common(4)
    assert tuple(w for w, _ in ranked[:3]) == prompt.answers
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]


def test_the_same_seed_gives_the_same_prompt(filler):
    a, b = (ruler_prompt("niah_multiquery", filler, 900, 0.5, random.Random(7)) for _ in range(2))
    assert a.ids.equal(b.ids) and a.answers == b.answers


def test_score_is_the_fraction_of_expected_strings_found():
    assert score("The numbers are 123 and 456.", ("123", "456")) == 1.0
    assert score("The number is 123.", ("123", "456")) == 0.5
    assert score("it is LANTERN", ("lantern",)) == 1.0
    assert score("", ("x",)) == 0.0


def test_bad_input_is_refused_by_name(filler):
    with pytest.raises(ValueError, match="task must be one of"):
        ruler_prompt("niah", filler, 1000, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth must be in"):
        ruler_prompt("niah_number", filler, 1000, 1.5, random.Random(0))
    with pytest.raises(ValueError, match="give a longer length"):
        ruler_prompt("niah_multiquery", filler, 120, 0.5, random.Random(0))
