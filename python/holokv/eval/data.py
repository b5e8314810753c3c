"""Evaluation text (no download: Python's own pydoc topics, split by topic) and passkey prompts.

The pydoc topics are split once, for every use: ordered by the CRC-32 of their name (deterministic across
runs and Python builds, unlike ``hash``; unrelated to the alphabet, so the evaluation topics come from all
over the documentation), the first ones, until they hold ``HELD_OUT`` of the characters, are the evaluation
text; every other topic is the tuning text. Choices (options, policies) are made on the tuning side,
results reported on the evaluation side; ``holokv distill`` trains on the tuning side and holds out the
evaluation side, so no adapter has seen the text it is evaluated on.
"""
from __future__ import annotations

import random
import zlib

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
HELD_OUT = 0.2  # share of the pydoc topics' characters in the evaluation side
SPLITS = ("tune", "eval")


def topic_split() -> tuple[list[str], list[str]]:
    """(tuning topics, evaluation topics) of ``pydoc_data.topics``, each in sorted order."""
    from pydoc_data.topics import topics

    total, held = sum(map(len, topics.values())), set()
    for name in sorted(topics, key=lambda n: (zlib.crc32(n.encode()), n)):
        if sum(len(topics[n]) for n in held) >= HELD_OUT * total:
            break
        held.add(name)
    return sorted(set(topics) - held), sorted(held)


def corpus(path: str | None = None, split: str = "eval") -> tuple[str, dict]:
    """(text, where it came from): the file at ``path``, or the pydoc topics of ``split``."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read(), dict(file=path)
    from pydoc_data.topics import topics

    names = topic_split()[SPLITS.index(split)]
    return "\n\n".join(topics[n] for n in names), dict(split=split, pydoc_topics=names, held_out_share=HELD_OUT)


def synthetic_seed(seed: int, split: str) -> int | str:
    """The seed of passkey and RULER samples: tuning draws other samples than evaluation."""
    return seed if split == "eval" else f"{split}:{seed}"


def window_starts(n: int, context: int, continuation: int, count: int) -> list[int]:
    """Where ``count`` windows of ``context + continuation`` tokens start in a text of ``n`` tokens: spread
    evenly from its start to its end. They are disjoint where the text is long enough; otherwise their
    contexts overlap, but their continuations (the tokens scored) never do."""
    stride = (n - context - continuation) / max(count - 1, 1)
    if stride < 0 or (count > 1 and int(stride) < continuation):
        raise ValueError(f"text has {n} tokens, fewer than the {context} + {count} x {continuation} that {count} "
                         f"windows of {context} + {continuation} need (use a longer text, fewer windows or "
                         "shorter contexts)")
    return [int(i * stride) for i in range(count)]


def passkey_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> tuple[list[int], list[int], str]:
    """(context ids of ``length`` tokens with the key at ``depth`` in [0, 1], question ids, key)."""
    key = str(rng.randint(10000, 99999))
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                       add_special_tokens=False).input_ids
    filler = tokenizer(FILLER, add_special_tokens=False).input_ids
    n_fill = length - len(needle)
    if n_fill < 1:
        raise ValueError(f"passkey length {length} is too short for the needle ({len(needle)} tokens)")
    hay = (filler * (n_fill // len(filler) + 1))[:n_fill]
    cut = int(depth * n_fill)
    return hay[:cut] + needle + hay[cut:], tokenizer(QUESTION, add_special_tokens=False).input_ids, key
