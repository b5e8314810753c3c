"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the real context size of your long-context
language models?"), generated here: no download, seeded, any length.

Each sample is a context of at most ``length`` tokens (prefilled and compressed), a question seen only after
the compression, and its answers; the score is RULER's string_match_all, the share of the answers found in
the greedy answer. The tasks, with RULER's settings:
- ``single``: one needle ("One of the special magic numbers for KEY is: 7 digits.") in the noise haystack;
- ``multikey``: four needles of different keys, one asked (three distractors);
- ``multivalue``: four needles of one key, all its values asked;
- ``vt`` (variable tracking): a chain VAR A = 12345, VAR B = VAR A, ... (four hops) in the haystack; which
  variables equal 12345?
- ``cwe`` (common words extraction): a numbered list where ten words appear 6 times and the others once
  (30 and 3 times from 4096 tokens on); which are the ten most common?
Differences from RULER: every haystack is its "noise" one (the passkey's sentences); keys and words are made
of random syllables (no word list ships, any number is available); no in-context example precedes the task.
"""
from __future__ import annotations

import random
import re
from functools import partial

from .data import FILLER
from .tasks import Prompt, match_all

TASKS = ("single", "multikey", "multivalue", "vt", "cwe")
NIAH_PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n")
VT_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
CWE_PREAMBLE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _word(rng: random.Random) -> str:
    """Three consonant-vowel syllables: no word is part of another."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))


def _distinct(make, n: int) -> list[str]:
    out = {}  # ordered, and a set
    while len(out) < n:
        out[make()] = None
    return list(out)


def _haystack(tokenizer, length: int, preamble: str, needles: list[str], rng: random.Random) -> list[int]:
    """The preamble, then noise sentences up to ``length`` tokens with the needles, in their order, between
    sentences at random depths."""
    head, inserts = _ids(tokenizer, preamble), [_ids(tokenizer, " " + n) for n in needles]
    sentences = [_ids(tokenizer, " " + s.strip()) for s in re.findall(r"[^.]+\.", FILLER)]
    room, hay = length - len(head) - sum(map(len, inserts)), []
    while room >= len(sentences[len(hay) % len(sentences)]):
        hay.append(sentences[len(hay) % len(sentences)])
        room -= len(hay[-1])
    if not hay:
        raise ValueError(f"RULER length {length} is too short for the task's needles")
    pieces, last = [head], 0
    for cut, needle in zip(sorted(rng.randint(0, len(hay)) for _ in inserts), inserts):
        pieces += hay[last:cut] + [needle]
        last = cut
    return [t for piece in pieces + hay[last:] for t in piece]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def niah(tokenizer, length: int, rng: random.Random, keys: int = 1, values: int = 1) -> Prompt:
    """Needles in a haystack: ``keys`` keys with ``values`` numbers each; the first key's numbers are asked."""
    names = _distinct(lambda: f"{_word(rng)}-{_word(rng)}", keys)
    numbers = _distinct(lambda: _number(rng, 7), keys * values)
    needles = [f"One of the special magic numbers for {name} is: {numbers[i * values + j]}."
               for i, name in enumerate(names) for j in range(values)]
    rng.shuffle(needles)
    context = _haystack(tokenizer, length, NIAH_PREAMBLE, needles, rng)
    s, be, which = ("", "is", "the") if values == 1 else ("s", "are", "all the")
    question = (f"\nWhat {be} {which} special magic number{s} for {names[0]} mentioned in the provided text? "
                f"The special magic number{s} for {names[0]} mentioned in the provided text {be}")
    return Prompt(context, _ids(tokenizer, question), partial(match_all, numbers[:values]), 12 * values,
                  dict(answers=numbers[:values]))


def vt(tokenizer, length: int, rng: random.Random, hops: int = 4) -> Prompt:
    """Variable tracking: one chain of ``hops`` assignments from a 5-digit value."""
    names = _distinct(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), hops + 1)
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    context = _haystack(tokenizer, length, VT_PREAMBLE, needles, rng)
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
                f"assigned the value {value}, they are:")
    return Prompt(context, _ids(tokenizer, question), partial(match_all, names), 30, dict(answers=names))


def cwe(tokenizer, length: int, rng: random.Random, common: int = 10) -> Prompt:
    """Common words extraction: as many once-seen (or thrice-seen) words as fit beside the ``common`` ones."""
    freq, rare = (6, 1) if length < 4096 else (30, 3)
    seed = rng.getrandbits(64)

    def listing(n: int) -> tuple[list[str], list[int]]:  # (the common words, the context) with n rare words
        r = random.Random(seed)
        words = _distinct(lambda: _word(r), common + n)
        items = words[:common] * freq + words[common:] * rare
        r.shuffle(items)
        return words[:common], _ids(tokenizer, CWE_PREAMBLE + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)))

    lo, hi = 0, length  # the most rare words that fit, by bisection (each item is at least a token)
    if len(listing(0)[1]) > length:
        raise ValueError(f"RULER length {length} is too short for {common} words x {freq}")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(listing(mid)[1]) <= length else (lo, mid - 1)
    answers, context = listing(lo)
    question = (f"\nQuestion: What are the {common} most common words in the above list? Answer: The top {common} "
                f"words that appear most often in the list are:")
    return Prompt(context, _ids(tokenizer, question), partial(match_all, answers), 64, dict(answers=answers))


GENERATORS = {"single": niah, "multikey": partial(niah, keys=4), "multivalue": partial(niah, values=4),
              "vt": vt, "cwe": cwe}


def prompts(tokenizer, tasks: list[str], lengths: list[int], count: int, seed: int | str) -> list[Prompt]:
    """``count`` samples of every task at every length; each (task, length) draws from its own generator, so a
    sample does not depend on which other tasks or lengths run."""
    out = []
    for task in tasks:
        for length in lengths:
            rng = random.Random(f"{seed}:{task}:{length}")
            for _ in range(count):
                prompt = GENERATORS[task](tokenizer, length, rng)
                prompt.info = dict(task=task, length=length, **prompt.info)
                out.append(prompt)
    return out
