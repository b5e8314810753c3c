"""Training and held-out text for distillation, disjoint by construction.

Default: Python's ``pydoc_data.topics`` (no download), split by topic as ``holokv eval`` splits them
(``holokv.eval.data.topic_split``): training on the tuning side, the evaluation side held out. A user's
files (``train_text``, ``eval_text``) replace either side.
"""
from __future__ import annotations

import functools

import torch

from ..eval.data import HELD_OUT, topic_split


def texts(train_text: str | None, eval_text: str | None) -> tuple[str, str, dict]:
    """(training text, held-out text, a description of where each came from for the log)."""
    from pydoc_data.topics import topics

    train_topics, held_topics = topic_split()
    sides = []
    for path, names in ((train_text, train_topics), (eval_text, held_topics)):
        if path is not None:
            with open(path, encoding="utf-8") as f:
                sides.append((f.read(), dict(file=path)))
        else:
            sides.append(("\n\n".join(topics[n] for n in names),
                          dict(pydoc_topics=names, held_out_share=HELD_OUT, split="crc32 of the topic name")))
    (train, train_info), (held, held_info) = sides
    return train, held, dict(train=dict(chars=len(train), **train_info), eval=dict(chars=len(held), **held_info))


def sequences(tokenizer, text: str, seq_len: int, what: str) -> torch.Tensor:
    """[n, seq_len]: the text's tokens cut into consecutive, non-overlapping sequences (the remainder dropped)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{what} has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


class Batches:
    """Step ``s`` reads the sequences at ``s * batch ...`` of an endless stream of epochs, each a permutation
    seeded by (seed, epoch): the batch is a pure function of the step, so a resumed run continues the stream."""

    def __init__(self, count: int, batch: int, seed: int):
        if count < batch:
            raise ValueError(f"the training text gives {count} sequences, fewer than --batch {batch}")
        self.count, self.batch, self.seed = count, batch, seed

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __call__(self, step: int) -> torch.Tensor:
        return torch.stack([self._order(j // self.count)[j % self.count]
                            for j in range(step * self.batch, (step + 1) * self.batch)])
