"""Training data: documents from files, the hub or the embedded text, split by document, packed into blocks.

Documents are tokenised, joined with EOS and cut into fixed-length blocks (the remainder is dropped).
The validation documents never contribute a token to training: the split happens before packing.
Sources (``DataSpec.source``):
  * ``wikipedia-offline`` / ``shakespeare-offline``: the embedded Wikipedia articles and Shakespeare plays
    (assets.py), alone or comma-separated (``shakespeare-offline,wikipedia-offline``: the plays, then the articles);
  * local files, comma-separated or a glob: ``.txt`` (blank-line separated paragraphs are documents),
    ``.jsonl`` / ``.json`` / ``.parquet`` (one document per row, column ``text_field``);
  * anything else is a hub dataset name for ``datasets.load_dataset`` (``name``, ``split``, ``streaming``).
``needles`` > 0 hides that many keys in every training block and asks for them at its end (text/needles.py).
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from ..validate import positive_int, require
from .assets import shakespeare_plays, wikipedia_articles
from .needles import NAMES as NEEDLE_NAMES


@dataclass(frozen=True)
class DataSpec:
    source: str = "wikipedia-offline"
    """'wikipedia-offline' / 'shakespeare-offline' (embedded texts, alone or comma-separated, in that order), local
    .txt/.jsonl/.json/.parquet files (comma-separated or a glob), or a hub dataset name."""
    name: str | None = None
    """Hub dataset configuration name (e.g. 'wikitext-103-raw-v1')."""
    split: str = "train"
    """Hub split to read."""
    text_field: str = "text"
    """Column holding the text (jsonl / parquet / hub)."""
    streaming: bool = False
    """Stream the documents (hub or files) instead of loading them whole; max_train_tokens bounds what is read."""
    block_size: int = 256
    """Tokens per training / validation sequence; documents are joined with EOS and packed."""
    validation_documents: int = 10
    """Documents held out for validation: the last N (the first N when streaming)."""
    validation_tokens: int | None = 8192
    """Cap on validation tokens (None: all of the held-out documents)."""
    max_train_tokens: int | None = None
    """Cap on training tokens read (None: everything)."""
    needles: int = 0
    """Synthetic retrieval in every training block (text/needles.py): this many key sentences at random depths
    and, at the block's end, a question and answer for each; 0: the text as it is. Validation stays plain."""

    def __post_init__(self):
        require(isinstance(self.source, str) and bool(self.source), "source", self.source, "a non-empty string")
        positive_int("block_size", self.block_size, 2)
        positive_int("validation_documents", self.validation_documents)
        require(isinstance(self.needles, int) and not isinstance(self.needles, bool)
                and 0 <= self.needles <= len(NEEDLE_NAMES), "needles", self.needles,
                f"an integer from 0 (plain text) to {len(NEEDLE_NAMES)} (one per name the keys can belong to)")
        require(self.block_size >= 128 * self.needles, "needles", self.needles,
                f"at most data.block_size / 128 = {self.block_size // 128} for blocks of {self.block_size} tokens "
                "(keys and questions take about 40 tokens each and may fill at most half a block)")
        for name in ("validation_tokens", "max_train_tokens"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name), self.block_size)
        if builtin_parts(self.source) is not None or _local_files(self.source) is not None:
            where = "an embedded text" if builtin_parts(self.source) is not None else "local files"
            for name, unset in (("name", None), ("split", "train")):  # hub-only fields must not be ignored
                require(getattr(self, name) == unset, name, getattr(self, name),
                        f"{unset!r} for source {self.source!r} ({where}: the dataset name and split apply to hub "
                        "datasets only)")



_EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _wikipedia() -> list[str]:

    return wikipedia_articles()


def _shakespeare() -> list[str]:

    return shakespeare_plays()


BUILTIN_SOURCES: dict[str, Callable[[], list[str]]] = {"wikipedia-offline": _wikipedia,
                                                       "shakespeare-offline": _shakespeare}


def builtin_parts(source: str) -> list[str] | None:
    """The embedded texts ``source`` names, comma-separated (None if it names anything else)."""
    parts = [p.strip() for p in source.split(",")]
    return parts if parts and all(p in BUILTIN_SOURCES for p in parts) else None


@dataclass
class Corpus:
    train: Tensor  # (N_train,) int32 token ids, documents joined with EOS
    validation: Tensor  # (N_val,) int32
    train_documents: int
    validation_documents: int
    excluded_documents: int = 0  # training documents left out because they are evaluated elsewhere

    def blocks(self, split: str, block_size: int) -> Tensor:
        """(N, block_size) non-overlapping blocks of ``split``."""
        return as_blocks(getattr(self, split), block_size)


def as_blocks(stream: Tensor, block_size: int) -> Tensor:
    n = stream.numel() // block_size
    if n == 0:
        raise ValueError(f"need at least {block_size} tokens, got {stream.numel()}")
    return stream[: n * block_size].view(n, block_size)


def token_stream(tokenizer, texts: Iterable[str], max_tokens: int | None = None, progress: bool = False,
                 desc: str = "tokenising") -> Tensor:
    """Token ids (int32) of ``texts``, each followed by EOS, stopping once ``max_tokens`` are collected."""
    import numpy as np
    from tqdm.auto import tqdm

    sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    chunks: list[np.ndarray] = []
    count = 0
    it = iter(texts)
    with tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        while max_tokens is None or count < max_tokens:
            batch = [t for t in itertools.islice(it, 256) if t]
            if not batch:
                break
            rows = [row + sep for row in tokenizer(batch, add_special_tokens=False)["input_ids"]]
            chunk = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32)
            chunks.append(chunk)
            count += len(chunk)
            bar.update(len(chunk))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.from_numpy(ids)


def _local_files(source: str) -> list[str] | None:
    parts = [p.strip() for p in source.split(",") if p.strip()]
    files: list[str] = []
    for p in parts:
        if any(c in p for c in "*?["):
            files.extend(sorted(glob.glob(p)))
        elif Path(p).suffix in _EXTENSIONS or Path(p).exists():
            files.append(p)
        else:
            return None  # not a file-looking source: a hub name
    return files


def documents(spec: DataSpec) -> tuple[list[str] | None, Iterator[str] | None]:
    """(all documents as a list) or (a stream of documents when streaming)."""
    parts = builtin_parts(spec.source)
    if parts is not None:
        return [doc for part in parts for doc in BUILTIN_SOURCES[part]()], None
    import datasets

    files = _local_files(spec.source)
    if files is not None:
        missing = [f for f in files if not Path(f).is_file()]
        if not files or missing:
            bad = missing[0] if missing else spec.source
            why = "is a folder: name its files (a glob such as DIR/*.txt)" if Path(bad).is_dir() else "no such file"
            raise FileNotFoundError(f"data.source {spec.source!r}: {bad} {why}" if Path(bad).is_dir()
                                    else f"data.source {spec.source!r}: {why} {bad}")
        if all(Path(f).stat().st_size == 0 for f in files):  # datasets fails on these with a traceback
            raise ValueError(f"data.source {spec.source!r} holds no text (empty file{'s' if len(files) > 1 else ''})")
        blank = [f for f in files if Path(f).stat().st_size < 2**26 and not Path(f).read_bytes().strip()]
        if len(blank) == len(files):  # only newlines and spaces: datasets finds no paragraph and names no file
            raise ValueError(f"data.source {spec.source!r} holds no text (only whitespace in {', '.join(blank[:3])})")
        kinds = {_EXTENSIONS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) > 1:
            raise ValueError(f"data.source files must all be one of {sorted(_EXTENSIONS)}, got {files}")
        kind = kinds.pop()
        extra = {"sample_by": "paragraph"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=spec.streaming, **extra)
        except Exception as e:  # datasets wraps a decoding error in its own
            cause = e
            while cause is not None and not isinstance(cause, UnicodeDecodeError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise ValueError(f"data.source {spec.source!r}: a file is not UTF-8 text ({cause.reason} at byte "
                             f"{cause.start}); files: {', '.join(files[:3])}") from None
        field = "text" if kind == "text" else spec.text_field
    else:
        ds = datasets.load_dataset(spec.source, spec.name, split=spec.split, streaming=spec.streaming)
        field = spec.text_field
    columns = ds.column_names or []
    if columns and field not in columns:
        raise ValueError(f"data.text_field {field!r} is not a column of {spec.source}; columns: {columns}")
    texts = (row[field] for row in ds)
    if spec.streaming:
        return None, texts
    return list(texts), None


def load_corpus(spec: DataSpec, tokenizer, progress: bool = True, validation_only: bool = False,
                exclude: Iterable[str] = ()) -> Corpus:
    """Read, split by document and tokenise ``spec``'s data (only the held-out part with ``validation_only``).
    ``exclude``: documents never trained on (those another evaluation scores, e.g. the long-context play); a
    training document equal to one of them (up to surrounding whitespace) is left out."""
    docs, stream = documents(spec)
    V = spec.validation_documents
    skip = {d.strip() for d in exclude}
    excluded = 0
    if docs is not None:
        docs = [d for d in docs if d and d.strip()]
        if not docs:
            raise ValueError(f"data.source {spec.source!r} holds no text")
        if len(docs) <= V and not validation_only:  # (held-out text alone needs no training document)
            raise ValueError(f"data.validation_documents = {V} leaves no training documents ({len(docs)} in all)")
        train_docs, val_docs = docs[:-V], docs[-V:]
        if skip:
            kept = [d for d in train_docs if d.strip() not in skip]
            excluded, train_docs = len(train_docs) - len(kept), kept
            if not train_docs and not validation_only:
                raise ValueError(f"data.source {spec.source!r}: every training document is one the evaluation "
                                 "scores (the long-context checks); train on other text")
        n_train = len(train_docs)
    else:  # streaming: the first V documents are held out, the rest stream into training
        val_docs = list(itertools.islice(stream, V))
        train_docs = (d for d in stream if d.strip() not in skip) if skip else stream
        n_train = -1
    validation = token_stream(tokenizer, val_docs, spec.validation_tokens, progress, "tokenising validation")
    train = token_stream(tokenizer, [] if validation_only else train_docs, spec.max_train_tokens, progress,
                         "tokenising train")
    for name, t in (("training", train), ("validation", validation)):
        if validation_only and name == "training":
            continue
        if t.numel() < spec.block_size + 1:
            raise ValueError(f"{name} text has {t.numel()} tokens, fewer than one block of data.block_size = "
                             f"{spec.block_size}")
    return Corpus(train, validation, n_train, len(val_docs), excluded)


class BlockSchedule:
    """Which training blocks every process reads at every step: a pure function of the position.

    Sample g of the run (counted over all stages) is block ``perm_e[g % N]`` of epoch e = g // N, where
    perm_e is a permutation seeded by (seed, e). A step takes the next micro × processes × accumulation
    samples; micro-batch m of process r reads samples  start + (m · processes + r) · micro + [0, micro).
    Resuming at a sample position, or changing processes at equal global batch, reads the same data.
    """

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed = num_blocks, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_blocks, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> Tensor:
        out = []
        for g in range(start, start + count):
            out.append(self._perm(g // self.num_blocks)[g % self.num_blocks])
        return torch.stack(out)

    def positions(self, start: int, micro: int, m: int, rank: int, processes: int) -> Tensor:
        """The sample positions g that micro-batch m of process r reads (``micro_batch`` gives their blocks)."""
        first = start + (m * processes + rank) * micro
        return torch.arange(first, first + micro)

    def micro_batch(self, start: int, micro: int, m: int, rank: int, processes: int) -> Tensor:
        return self.indices(int(self.positions(start, micro, m, rank, processes)[0]), micro)
