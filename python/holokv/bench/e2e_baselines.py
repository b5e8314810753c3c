"""The full-cache baselines of ``holokv bench e2e``: transformers' ``StaticCache`` read by SDPA, with the decode
step eager ("static") or under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; "static-compiled"), the
way ``generate``'s compile path runs it: prefill eager, decode steps compiled."""
from __future__ import annotations

import inspect

import torch
from transformers import StaticCache

from ..eval.model import CACHE_KWARG

BASELINES = ("static", "static-compiled")


def static_decoder(model, name: str, batch: int, context: int, capacity: int):
    """(prefill(ids) -> logits [B, V], step(tokens [B]) -> logits [B, V], nbytes()) over a StaticCache of
    ``context + capacity`` tokens."""
    model.set_attn_implementation("sdpa")
    cache = StaticCache(config=model.config, max_cache_len=context + capacity)
    # older transformers take cache_position; 5.24 keeps the length in the cache itself
    explicit = "cache_position" in inspect.signature(model.forward).parameters
    forward = torch.compile(model.forward, mode="reduce-overhead") if name == "static-compiled" else model.forward
    position = torch.full((batch, 1), context, dtype=torch.int64, device=model.device)  # the next token's

    def call(fn, ids, position_ids, **kw):
        extra = {"cache_position": position_ids[0]} if explicit else {}
        out = fn(input_ids=ids, position_ids=position_ids, use_cache=True, **{CACHE_KWARG: cache}, **extra, **kw)
        return out.logits[:, -1]

    def prefill(ids):
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return call(model.forward, ids, positions, logits_to_keep=1)  # one position's logits, not N of them

    def step(tokens):
        logits = call(forward, tokens[:, None], position)
        position.add_(1)
        return logits

    def nbytes():  # what the cache holds allocated, all context + capacity slots (SDPA reads them all)
        return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))

    return prefill, step, nbytes
