"""Data: file formats, split by document before packing, packing, and the block schedule."""

import json

import pytest
import torch
from train_fixtures import corpus_text, make_tokenizer

from mosa_retrofit.text.data import (
    BlockSchedule,
    DataSpec,
    as_blocks,
    load_corpus,
    token_stream,
)

TEXT = corpus_text(20)
DOCS = TEXT.strip().split("\n\n")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(TEXT)


def _expected(tok, docs):
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_split_by_document_then_pack(tmp_path, tok, fmt):
    path = tmp_path / f"docs.{fmt}"
    if fmt == "txt":
        path.write_text("\n\n".join(DOCS))  # blank-line separated paragraphs
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        import pandas as pd

        pd.DataFrame({"body": DOCS}).to_parquet(path)
    spec = DataSpec(source=str(path), text_field="body", block_size=16, validation_documents=4,
                    validation_tokens=None)
    c = load_corpus(spec, tok, progress=False)
    assert (c.train_documents, c.validation_documents) == (16, 4)
    assert torch.equal(c.train.long(), _expected(tok, DOCS[:16]))  # the held-out documents never reach training
    assert torch.equal(c.validation.long(), _expected(tok, DOCS[16:]))
    blocks = c.blocks("train", 16)
    assert blocks.shape == (len(c.train) // 16, 16) and torch.equal(blocks.reshape(-1), c.train[: blocks.numel()])


def test_streaming_holds_out_the_first_documents(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    c = load_corpus(DataSpec(source=str(path), streaming=True, block_size=16, validation_documents=3,
                             validation_tokens=None, max_train_tokens=200), tok, progress=False)
    assert torch.equal(c.validation.long(), _expected(tok, DOCS[:3]))
    assert torch.equal(c.train.long(), _expected(tok, DOCS[3:])[:200])


def test_caps_and_errors(tmp_path, tok):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    c = load_corpus(DataSpec(source=str(path), block_size=8, validation_documents=2, validation_tokens=40,
                             max_train_tokens=100), tok, progress=False)
    assert c.validation.numel() == 40 and c.train.numel() == 100
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(DataSpec(source=str(tmp_path / "missing.txt")), tok)
    with pytest.raises(ValueError, match="leaves no training documents"):
        load_corpus(DataSpec(source=str(path), validation_documents=20), tok)
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="text_field 'text'.*content"):
        load_corpus(DataSpec(source=str(j), validation_documents=1), tok)
    with pytest.raises(ValueError, match="fewer than one block"):
        load_corpus(DataSpec(source=str(path), block_size=4096, validation_documents=2), tok)


def test_token_stream_and_blocks(tok):
    ids = token_stream(tok, DOCS[:3])
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), _expected(tok, DOCS[:3]))
    assert torch.equal(token_stream(tok, DOCS[:3], max_tokens=7).long(), _expected(tok, DOCS[:3])[:7])
    assert as_blocks(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="at least 16"):
        as_blocks(torch.arange(10), 16)


def test_block_schedule_epochs_processes_and_resume():
    s = BlockSchedule(10, seed=3)
    first = s.indices(0, 10).tolist()
    assert sorted(first) == list(range(10))  # every block once per epoch
    assert sorted(s.indices(10, 10).tolist()) == list(range(10)) and s.indices(10, 10).tolist() != first
    assert s.indices(4, 9).tolist() == BlockSchedule(10, seed=3).indices(4, 9).tolist()  # pure function of position
    # one process x 2 micro-batches of 2 == two processes x 1 micro-batch of 2 (same global batch)
    one = [s.micro_batch(6, 2, m, 0, 1).tolist() for m in range(2)]
    two = [s.micro_batch(6, 2, 0, r, 2).tolist() for r in range(2)]
    assert one == two
    assert sum(one, []) == s.indices(6, 4).tolist()
    assert BlockSchedule(10, seed=4).indices(0, 10).tolist() != first


def test_excluded_documents_never_reach_training(tmp_path, tok):
    """``exclude``: training documents another evaluation scores are left out (up to surrounding whitespace),
    listed or streamed; the held-out documents stay what they were."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    spec = DataSpec(source=str(path), block_size=16, validation_documents=4, validation_tokens=None)
    c = load_corpus(spec, tok, progress=False, exclude=[DOCS[2], f"  {DOCS[5]}\n"])
    kept = [d for i, d in enumerate(DOCS[:16]) if i not in (2, 5)]
    assert (c.train_documents, c.excluded_documents) == (14, 2)
    assert torch.equal(c.train.long(), _expected(tok, kept))
    assert torch.equal(c.validation.long(), _expected(tok, DOCS[16:]))
    s = load_corpus(DataSpec(source=str(path), streaming=True, block_size=16, validation_documents=3,
                             validation_tokens=None), tok, progress=False, exclude=[DOCS[4]])
    assert torch.equal(s.train.long(), _expected(tok, DOCS[3:4] + DOCS[5:]))
    with pytest.raises(ValueError, match="every training document"):
        load_corpus(spec, tok, progress=False, exclude=DOCS)


def test_embedded_texts_combine_in_the_order_named():
    from mosa_retrofit.text.assets import shakespeare_plays, wikipedia_articles
    from mosa_retrofit.text.data import documents

    docs, _ = documents(DataSpec(source="shakespeare-offline, wikipedia-offline"))
    assert docs == shakespeare_plays() + wikipedia_articles()
    with pytest.raises(ValueError, match="name"):  # an embedded text takes no hub fields
        DataSpec(source="shakespeare-offline,wikipedia-offline", name="wikitext-2")
