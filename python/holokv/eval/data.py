"""Evaluation text (no download: Python's own pydoc topics) and passkey prompts."""
from __future__ import annotations

import random

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def corpus(path: str | None = None) -> str:
    """The text of ``path``, or by default every pydoc topic of this Python, in sorted order."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def windows(ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """``count`` disjoint windows of ``length`` tokens, spread evenly over the 1-D token tensor ``ids``."""
    if count * length > ids.numel():
        raise ValueError(f"text has {ids.numel()} tokens, fewer than the {count} x {length} requested "
                         "(use a longer text, fewer windows or shorter contexts)")
    stride = ids.numel() // count
    return [ids[i * stride: i * stride + length] for i in range(count)]


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
