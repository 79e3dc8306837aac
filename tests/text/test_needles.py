"""Synthetic retrieval in training blocks: keys inside the text, each asked and answered at the block's end."""

import random
import re

import pytest
import torch
from train_fixtures import corpus_text, make_tokenizer

from mosa_retrofit.text.data import DataSpec
from mosa_retrofit.text.needles import insert_needles, needle_batch
from mosa_retrofit.text.prompts import NAMES as EVAL_NAMES

TEXT = corpus_text(30)
KEY = re.compile(r" The access code for the (\w+) is (\d+)\.")
QA = re.compile(r" Question: what is the access code for the (\w+)\? Answer: the access code for the (\w+) is (\d+)\.")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(TEXT + " 0123456789?:QA", vocab=200)  # (digits and the question's marks in the alphabet)


@pytest.fixture(scope="module")
def block(tok):
    return torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][:1024])


def decode(tok, ids):
    return tok.decode(ids.tolist(), clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("n", [1, 4])
def test_keys_sit_in_the_text_and_each_is_asked_once_with_its_answer(tok, block, n):
    out, answers = insert_needles(block, tok, n, random.Random(n))
    assert out.shape == answers.shape == block.shape and out.dtype == block.dtype and answers.dtype == torch.bool
    text = decode(tok, out)
    qa_at = text.index(" Question:")
    keys = dict(KEY.findall(text[:qa_at]))
    assert len(keys) == n and not set(keys) & set(EVAL_NAMES)  # names never the passkey evaluation's
    asked = QA.findall(text[qa_at:])
    assert len(asked) == n and QA.sub("", text[qa_at:]) == ""  # the end is questions and answers only
    assert sorted(a for a, _, _ in asked) == sorted(keys)
    assert all(a == b and keys[a] == code for a, b, code in asked)
    haystack = KEY.sub("", text[:qa_at])  # the rest is the block's own text, in order, from its start
    original = decode(tok, block)
    assert original.startswith(haystack) and len(haystack) > len(original) // 2
    # the marked tokens are exactly the answers' codes, in the order asked (each " " + digits)
    runs, run = [], []
    for t, on in zip(out.tolist(), answers.tolist()):
        if on:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    assert [decode(tok, torch.tensor(r)).strip() for r in runs] == [code for _, _, code in asked]
    assert not answers[: len(tok(text[:qa_at], add_special_tokens=False)["input_ids"]) - 1].any()


def test_no_needles_leaves_the_block_alone(tok, block):
    out, answers = insert_needles(block, tok, 0, random.Random(0))
    assert out is block and not answers.any()
    ids = block.view(1, -1)
    assert needle_batch(ids, torch.tensor([5]), tok, 0, seed=0) == (ids, None)


def test_needles_depend_on_the_seed_and_the_sample_position_only(tok, block):
    ids = torch.stack([block, block])
    a, marks = needle_batch(ids, torch.tensor([3, 4]), tok, 3, seed=0)
    b, marks_b = needle_batch(ids, torch.tensor([3, 4]), tok, 3, seed=0)
    assert torch.equal(a, b) and torch.equal(marks, marks_b)  # a resumed run, or the control, reading positions 3
    assert not torch.equal(a[0], a[1])  # and 4 gets the same blocks; the same block at two positions: other keys
    assert not torch.equal(a, needle_batch(ids, torch.tensor([3, 4]), tok, 3, seed=1)[0])
    for row, p in zip(range(2), (3, 4)):  # each row is insert_needles of its own position
        alone = insert_needles(block, tok, 3, random.Random(f"needles-0-{p}"))
        assert torch.equal(a[row], alone[0]) and torch.equal(marks[row], alone[1])


@pytest.mark.parametrize("value", [-1, 17, True, 2.0, "3"])
def test_bad_needle_counts_are_refused(value):
    with pytest.raises(ValueError, match=r"needles.*(0 \(plain text\) to 16)"):
        DataSpec(block_size=4096, needles=value)


def test_needles_that_would_crowd_out_the_text_are_refused(tok, block):
    with pytest.raises(ValueError, match=r"needles.*at most data.block_size / 128 = 2"):
        DataSpec(block_size=256, needles=3)
    with pytest.raises(ValueError, match=r"data.needles = 8 do not fit a block of 256 tokens"):
        insert_needles(block[:256], tok, 8, random.Random(0))
