"""RULER-style synthetic long-context tasks (Hsieh et al. 2024, arXiv 2404.06654), built offline from a seed on
natural filler text (a token stream of real prose, never a repeated sentence).

Tasks (RULER's names in brackets):

* ``niah_number`` / ``niah_word`` / ``niah_uuid`` (niah_single): one "special magic" value hidden at a chosen
  depth, asked for by its key;
* ``niah_multikey`` (niah_multikey): the asked needle among three others with other keys and values;
* ``niah_multivalue`` (niah_multivalue): four values of one key, all asked for;
* ``niah_multiquery`` (niah_multiquery): four keys, each with its value, all asked for;
* ``variable_tracking`` (vt): a chain of assignments ``VAR A = 12345`` … ``VAR E = VAR D`` beside a second
  chain; every variable holding the asked value is the answer (multi-hop);
* ``common_words`` (cwe): a numbered list where ten words appear far more often than the rest; the ten are asked;
* ``frequent_words`` (fwe): coded words with Zipf-like counts; the three most frequent are asked.

Every prompt is exactly ``length - max_new_tokens`` tokens, so the prompt and the answer generated after it fit
in ``length`` positions. A prompt's score is RULER's ``string_match_all``: the fraction of its expected strings
that the generated text contains (case-insensitive).

Shape legend: P prompt tokens.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

TASKS = ("niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words", "frequent_words")
"""Every task of the suite, in the order tables list them."""

ANSWER_TOKENS = {"niah_number": 16, "niah_word": 16, "niah_uuid": 40, "niah_multikey": 16, "niah_multivalue": 48,
                 "niah_multiquery": 48, "variable_tracking": 32, "common_words": 96, "frequent_words": 32}
"""Tokens generated per task: room for every expected string."""

ADJECTIVES = ("amber", "bitter", "brave", "calm", "clever", "crimson", "curious", "eager", "fancy", "gentle",
              "golden", "hollow", "humble", "jolly", "lively", "lucky", "mellow", "misty", "noble", "plain",
              "proud", "quiet", "rapid", "rustic", "silent", "silver", "steady", "sturdy", "swift", "tender",
              "velvet", "vivid")
NOUNS = ("anchor", "badger", "beacon", "bottle", "canyon", "castle", "comet", "falcon", "harbor", "island",
         "jacket", "kettle", "lantern", "meadow", "mirror", "needle", "orchard", "pebble", "pigeon", "quarry",
         "rocket", "saddle", "signal", "temple", "thimble", "tunnel", "valley", "violin", "wagon", "walnut",
         "willow", "zipper")
"""Keys are 'adjective-noun' (1,024 of them)."""
WORDS = ("accordion", "armadillo", "bagpipe", "chameleon", "dirigible", "escalator", "flamingo", "gondola",
         "harmonica", "iguana", "kaleidoscope", "kumquat", "lemonade", "mandolin", "marmalade", "narwhal",
         "origami", "platypus", "quesadilla", "rhubarb", "saxophone", "tambourine", "trampoline", "ukulele",
         "vermicelli", "walrus", "xylophone", "zeppelin")
"""Word values: words no key contains."""


@dataclass(frozen=True)
class RulerPrompt:
    task: str
    ids: Tensor  # (1, P): the prompt, P = length - max_new_tokens
    answers: tuple[str, ...]  # every string the generated answer must contain
    needles_at: tuple[int, ...]  # token index where each inserted needle starts (empty for list tasks)
    max_new_tokens: int


def score(generated: str, answers: tuple[str, ...]) -> float:
    """RULER's string_match_all: the fraction of ``answers`` that ``generated`` contains (case-insensitive)."""
    text = generated.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


class Filler:
    """Natural prose as one token stream, with the places a sentence ends (where needles go in)."""

    def __init__(self, tokenizer, texts: list[str]):
        enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
        self.tokenizer, self.enc = tokenizer, enc
        self.ids = [i for t in texts for i in enc(" ".join(t.split()) + " ")]
        if len(self.ids) < 64:
            raise ValueError(f"filler text has {len(self.ids)} tokens; give at least 64")
        pieces = tokenizer.convert_ids_to_tokens(self.ids)
        text = [tokenizer.convert_tokens_to_string([p]) for p in pieces]
        self.ends = [i + 1 for i, t in enumerate(text) if t.rstrip().endswith((".", "!", "?"))]
        words = re.findall(r"\b[a-z]{4,10}\b", " ".join(texts))
        self.words = sorted(set(words))  # the vocabulary of the list tasks: real words of the filler

    def span(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """``n`` consecutive filler tokens from a random start (wrapping), and the sentence ends inside them."""
        start = rng.randrange(len(self.ids))
        reps = n // len(self.ids) + 2
        ids = (self.ids * reps)[start:start + n]
        ends = sorted({(e - start) % len(self.ids) + k * len(self.ids)
                       for e in self.ends for k in range(reps)} | {0, n})
        return ids, [e for e in ends if 0 <= e <= n]


def _haystack(filler: Filler, rng: random.Random, intro: list[int], needles: list[list[int]], depths: list[float],
              question: list[int], P: int) -> tuple[list[int], tuple[int, ...]]:
    """``intro`` + filler with each needle at the sentence end nearest ``depth`` x P tokens into the prompt +
    ``question``: exactly P tokens; returns them and where each needle starts."""
    budget = P - len(intro) - sum(map(len, needles)) - len(question)
    if budget < 1:
        raise ValueError(f"{P} prompt tokens hold no filler beside the needles and question "
                         f"({P - budget} tokens); give a longer length")
    text, ends = filler.span(budget, rng)
    order = sorted(range(len(needles)), key=lambda i: (depths[i], i))
    out, at, pos = list(intro), [0] * len(needles), 0
    for i in order:  # the filler before needle i is its target position less what precedes it that is not filler
        want = depths[i] * P - len(out) + pos
        spot = min((e for e in ends if e >= pos), key=lambda e: abs(e - want))
        out += text[pos:spot]
        pos = spot
        at[i] = len(out)
        out += needles[i]
    out += text[pos:] + question
    return out, tuple(at)


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _values(rng: random.Random, kind: str, n: int) -> list[str]:
    """``n`` distinct values: 7-digit numbers, nouns or UUIDs."""
    if kind == "number":
        return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n)]
    if kind == "word":
        return rng.sample(WORDS, n)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def _unique(build, filler: Filler, P: int, depth: float, rng: random.Random, tries: int = 8) -> RulerPrompt:
    """A prompt from ``build`` whose every answer occurs in its text only where its needles put it (once; a chain's
    variables twice but the last): a value the filler happens to contain is drawn again."""
    for _ in range(tries):
        prompt = build(filler, P, depth, rng)
        text = filler.tokenizer.decode(prompt.ids[0].tolist())
        chain = prompt.task == "variable_tracking"
        if all(text.count(a) == (2 if chain and i < len(prompt.answers) - 1 else 1)
               for i, a in enumerate(prompt.answers)):
            return prompt
    raise ValueError(f"no {prompt.task} prompt of {P} tokens with unique answers in {tries} draws")


def _niah(task: str, filler: Filler, P: int, depth: float, rng: random.Random) -> RulerPrompt:
    kind = {"niah_word": "word", "niah_uuid": "uuid"}.get(task, "number")
    noun = kind
    enc = filler.enc
    if task == "niah_multivalue":
        key, values = _keys(rng, 1)[0], _values(rng, kind, 4)
        pairs, asked = [(key, v) for v in values], [key]
    elif task == "niah_multiquery":
        keys, values = _keys(rng, 4), _values(rng, kind, 4)
        pairs, asked = list(zip(keys, values)), keys
    elif task == "niah_multikey":
        keys, values = _keys(rng, 4), _values(rng, kind, 4)
        pairs, asked = list(zip(keys, values)), keys[:1]
    else:
        keys, values = _keys(rng, 1), _values(rng, kind, 1)
        pairs, asked = list(zip(keys, values)), keys
    needles = [enc(f" One of the special magic {noun}s for {k} is: {v}.") for k, v in pairs]
    answers = tuple(v for k, v in pairs if k in asked)
    many = len(answers) > 1
    who = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    intro = enc(f"Some special magic {noun}s are hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun}s afterwards.\n")
    question = enc(f"\nWhat {'are all the' if many else 'is the'} special magic {noun}{'s' if many else ''} for "
                   f"{who} mentioned in the provided text? The special magic {noun}{'s' if many else ''} for {who} "
                   f"mentioned in the provided text {'are' if many else 'is'}")
    # the asked needle (the first) at ``depth``; the others anywhere
    depths = [depth] + [rng.random() for _ in pairs[1:]]
    ids, at = _haystack(filler, rng, intro, needles, depths, question, P)
    return RulerPrompt(task, torch.tensor([ids]), answers, at, ANSWER_TOKENS[task])


def _variable_tracking(filler: Filler, P: int, depth: float, rng: random.Random, hops: int = 4,
                       chains: int = 2) -> RulerPrompt:
    enc = filler.enc
    names: list[str] = []
    while len(names) < chains * (hops + 1):  # distinct five-letter names
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    values = _values(rng, "number", chains)
    needles, depths = [], []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        start = depth if c == 0 else rng.random()
        for h, name in enumerate(chain):
            rhs = values[c] if h == 0 else f"VAR {chain[h - 1]}"
            needles.append(enc(f" VAR {name} = {rhs}."))
            depths.append(min(1.0, start + (1 - start) * h / (hops + 1)))  # each hop after the one it reads
    intro = enc("Memorize and track the chain(s) of variable assignment hidden in the following text.\n")
    question = enc(f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
                   f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                   f"variables are assigned the value {values[0]}, they are:")
    ids, at = _haystack(filler, rng, intro, needles, depths, question, P)
    return RulerPrompt("variable_tracking", torch.tensor([ids]), tuple(names[:hops + 1]), at[:hops + 1],
                       ANSWER_TOKENS["variable_tracking"])


def _fit_list(filler: Filler, rng: random.Random, intro: list[int], entries: list[list[int]],
              question: list[int], P: int) -> tuple[list[int], int]:
    """(``intro`` + as many of ``entries`` as fit + ``question``, the remainder of P filled with prose before the
    intro, so the length is exact and every kept entry whole; how many entries were kept)."""
    room = P - len(intro) - len(question)
    body, kept = [], 0
    for e in entries:
        if len(body) + len(e) > room:
            break
        body, kept = body + e, kept + 1
    lead, _ = filler.span(room - len(body), rng) if room > len(body) else ([], [])
    return lead + intro + body + question, kept


def _common_words(filler: Filler, P: int, depth: float, rng: random.Random) -> RulerPrompt:
    """Ten words appear ``often`` times and others 3 times, shuffled, in a numbered list sized to the prompt."""
    enc = filler.enc
    intro = enc("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
    question = enc("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words "
                   "that appear most often in the list are:")
    words = rng.sample(filler.words, len(filler.words))
    per_entry = len(enc(f"{P // 8}. {words[0]} ")) + 1
    fits = (P - len(intro) - len(question)) // per_entry
    often = max(5, min(30, fits // 40))
    common, rare = words[:10], words[10:10 + max(0, fits - 10 * often) // 3]
    seq = common * often + rare * 3
    rng.shuffle(seq)
    ids, kept = _fit_list(filler, rng, intro, [enc(f"{i + 1}. {w} ") for i, w in enumerate(seq)], question, P)
    counts = Counter(seq[:kept])
    if len(rare) < 10 or min(counts[w] for w in common) <= 3:
        raise ValueError(f"{P} prompt tokens are too few for common_words (ten words {often} times beside the "
                         f"filler's words 3 times; {len(filler.words)} distinct words in the filler)")
    return RulerPrompt("common_words", torch.tensor([ids]), tuple(common), (), ANSWER_TOKENS["common_words"])


def _frequent_words(filler: Filler, P: int, depth: float, rng: random.Random) -> RulerPrompt:
    """Coded words with counts falling as 1 / rank² (RULER's Zipf alpha 2); the three most frequent are asked,
    each strictly more frequent than the next."""
    enc = filler.enc
    vocab = list(dict.fromkeys("".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(400)))
    intro = enc("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.\n")
    question = enc("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                   "most frequently appeared words in the above coded text? Answer: According to the coded text "
                   "above, the three most frequently appeared words are:")
    per_word = len(enc(" " + vocab[0])) + len(enc(" ....")) / 8 + 0.5
    total = max(40, int((P - len(intro) - len(question)) / per_word))
    counts = [c for c in (round(total * 0.6 / r ** 2) for r in range(1, len(vocab) + 1)) if c > 0]
    counts += [1] * min(len(vocab) - len(counts), max(0, total - sum(counts)))  # the long tail: words seen once
    seq = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(seq)
    entries = [enc(f" {w}") + (enc(" ....") if i % 8 == 7 else []) for i, w in enumerate(seq)]
    ids, kept = _fit_list(filler, rng, intro, entries, question, P)
    top = Counter(seq[:kept]).most_common(4)
    if len(top) < 4 or not top[0][1] > top[1][1] > top[2][1] > top[3][1]:
        raise ValueError(f"{P} prompt tokens are too few to rank three coded words; give a longer length")
    return RulerPrompt("frequent_words", torch.tensor([ids]), tuple(w for w, _ in top[:3]), (),
                       ANSWER_TOKENS["frequent_words"])


def ruler_prompt(task: str, filler: Filler, length: int, depth: float, rng: random.Random) -> RulerPrompt:
    """One prompt of ``task`` whose prompt and answer fit in ``length`` tokens; needle tasks put the asked needle
    (the first of a chain) at the sentence end nearest ``depth`` of the filler."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    P = length - ANSWER_TOKENS[task]
    if task.startswith("niah"):
        return _unique(lambda *a: _niah(task, *a), filler, P, depth, rng)
    if task == "variable_tracking":
        return _unique(_variable_tracking, filler, P, depth, rng)
    return {"common_words": _common_words, "frequent_words": _frequent_words}[task](filler, P, depth, rng)
