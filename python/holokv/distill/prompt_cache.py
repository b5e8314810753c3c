"""Training attention through a cache that compresses the prompt once (SnapKV, Top-K, Expected Attention, SRC).

These caches attend to the prompt exactly and compress it after; later tokens are appended exact. ``holokv eval``
scores a continuation read that way, so a training sequence of N tokens is split as that protocol is: its first
P tokens are the prompt, the last N - P the continuation. Row by row the student reads:

- a prompt position: the exact causal prompt (the caches' prefill is exact SDPA);
- a continuation position: the prompt as the method compressed it (the kept entries; SRC's compacted ones with
  their log-mass bias) followed by the exact continuation up to itself, as ``holo_decode`` reads the cache.

The compression is the cache's own: each layer's prompt goes through the layer ``make_cache`` builds (its
``update`` and the ``"holokv"`` attention function, as in generation), and the continuation reads the entries
that layer stored. Gradients reach the adapters through what is differentiable. Selection gathers the kept K/V,
so the continuation's loss reaches the prompt's keys and values (which tokens are kept, decided by scores, is
not differentiable). SRC's fit runs custom linear-algebra ops without autograd, so its entries are computed
without gradient from the student's prompt K/V: its adapters learn from the continuation's own queries, keys
and values, and from the prompt rows, which get the same exact SDPA with gradient.

SRC also compresses while decoding, a step every ``every`` generated tokens (16 for these prompts). A step only
reorders exact entries until a bin of ``decode_bin`` reviewed tokens fills, which at ratios 2 and 4 with its
default options does not happen within holokv eval's 32-token continuation; the student models the prompt's
compaction alone, so longer continuations would read more than SRC serves them.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from ..caches import make_cache
from ..caches.base import exact_attention
from ..caches.hf_attention import holokv_attention

# method -> whether its compression is differentiable in the kept K/V (see the module docstring)
PROMPT_METHODS = {"snapkv": True, "topk": True, "expected": True, "src": False}


def continuation_mask(store, n: int) -> torch.Tensor:
    """[B, Hkv, n, capacity + n] additive mask of n continuation queries over the store's entries (held ones,
    with their log-mass where the store has one) and then the continuation itself, causally."""
    B, Hkv, cap = store.k.shape[:3]
    held = torch.arange(cap, device=store.k.device) < store.lens.view(B, -1, 1)  # lens per sequence or head
    entries = store.k.new_zeros(B, Hkv, cap) if store.bias is None else store.bias
    entries = entries.masked_fill(~held, float("-inf"))
    future = torch.ones(n, n, dtype=torch.bool, device=store.k.device).triu(1)
    own = store.k.new_zeros(n, n).masked_fill(future, float("-inf"))
    return torch.cat([entries.unsqueeze(2).expand(B, Hkv, n, cap), own.expand(B, Hkv, n, n)], -1)


class PromptCacheReader:
    """Causal attention of whole sequences whose first ``prompt`` tokens a ``method`` cache at ``ratio``
    compresses (the rule of the module docstring)."""

    def __init__(self, method: str, ratio: float, prompt: int, config):
        self.new_cache = partial(make_cache, method, config, ratio=ratio)
        self.cache = self.new_cache()  # checked now
        self.prompt, self.differentiable = prompt, PROMPT_METHODS[method]

    def __call__(self, module, q, k, v, mask, scale):
        """q [B, Hq, N, d], k/v [B, Hkv, N, d] after RoPE, transformers' boolean mask or None -> [B, N, Hq, d]."""
        P = self.prompt
        qp, kp, vp = q[:, :, :P], k[:, :, :P], v[:, :, :P]
        mp = None if mask is None else mask[:, :, :P, :P]
        if module.layer_idx == 0:  # a new forward: a fresh cache, as holokv eval makes one per prompt
            self.cache = self.new_cache()
        layer = self.cache.layers[module.layer_idx]
        with nullcontext() if self.differentiable else torch.no_grad():
            keys, values = layer.update(kp, vp)
            head, _ = holokv_attention(module, qp, keys, values, mp, scaling=scale)  # the prefill: exact, compressed
        if not self.differentiable:
            head = exact_attention(qp, kp, vp, mp, scale)  # the same rows as the prefill's, with gradient
        s = layer.store
        n = q.shape[2] - P
        tail = F.scaled_dot_product_attention(
            q[:, :, P:], torch.cat([s.k, k[:, :, P:]], 2), torch.cat([s.v, v[:, :, P:]], 2),
            attn_mask=continuation_mask(s, n).repeat_interleave(q.shape[1] // k.shape[1], 1), scale=scale,
            enable_gqa=True)
        return torch.cat([head, tail.transpose(1, 2)], 1)
