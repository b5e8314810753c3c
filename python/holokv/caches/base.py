"""Cache container, the exact (full) layer, and the life cycle every layer shares.

A layer stores new tokens in ``update`` and hands itself to the ``"holokv"`` attention
function, which calls ``attend``: the layer reads its own storage (:class:`~.store.Store`)
and compresses it, so the bytes it holds really shrink. The first chunk is the prompt:
``prefill`` attends to it exactly (or as the method prescribes) and compresses it, with
left pads cut off, so each sequence is compressed as it would be alone. Every later token
is a decode step: ``decode`` appends it in place and reads the store through
``holo_decode``; it works on device state alone (no host sync, no allocation that grows
with the cache), so a whole model step can be captured in a CUDA graph
(:mod:`holokv.runtime`). Host bookkeeping and work that changes shapes (SRC's compression
steps) run in ``after_token``, outside any graph. ``seen`` stays the true sequence length:
transformers derives RoPE positions and mask sizes from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ..compaction.scores import take
from .hf_attention import hand_over
from .store import Store

NOT_READ = ("{} was not read by its attention: the model must use attn_implementation='holokv' "
            "(call holokv.caches.use_holokv_attention(model) first)")


def left_aligned(pads: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] index that moves each sequence's tokens (after its ``pads``) to the front; filler repeats the last."""
    return (pads[:, None] + torch.arange(n, device=pads.device)).clamp(max=n - 1)


def exact_attention(q, k, v, mask, scale) -> torch.Tensor:
    """SDPA of q [B, Hq, q, d] over k/v [B, Hkv, n, d] in sequence order -> [B, q, Hq, d]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          is_causal=mask is None and q.shape[2] > 1, enable_gqa=True).transpose(1, 2)


class FullLayer(CacheLayerMixin):
    """Exact cache: keeps every token (the reference the compressed layers are measured against)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    log_mass = False  # whether entries carry a log-mass
    adaptive = None  # the head-adaptive budgets' share (AdaKV) of the layers that have them: lengths per KV head
    batch_state = ("n_valid",)  # per-sequence tensors beside the store (batch first)
    graphed = True  # whether work between decode steps (SRC's compression) may replay CUDA graphs on CUDA

    def __init__(self, ratio: float = 1.0):
        super().__init__()
        if ratio != 1:
            raise ValueError(f"{type(self).__name__} keeps every token; its ratio must be 1, got {ratio}")
        self.ratio = ratio
        self.seen = 0  # true sequence length, pads included
        self.pending = None  # (k, v) handed over by update(), not read yet
        self.deferred = False  # set by holokv.runtime: it calls after_token() itself, outside the graph
        self.counts = True  # advances n_valid itself (deferred: only the first layer, the others share its counter)

    # ---- life cycle ------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.store = self.new_store(key_states)
        self.pads = None  # [B] left pads per sequence (host ints), known at the first read
        self.is_initialized = True

    def new_store(self, like: torch.Tensor) -> Store:
        return Store(like, bias=self.log_mass, per_head=self.adaptive is not None)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending is not None:
            raise RuntimeError(NOT_READ.format(type(self).__name__))
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pads is not None:
            self.reserve(key_states.shape[2])
        self.pending = key_states, value_states
        hand_over(self, key_states)
        return key_states, value_states

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Attention output [B, q, Hq, d] of the new tokens' queries q [B, Hq, q, d] over this layer."""
        (k, v), self.pending = self.pending, None
        if self.pads is None:  # the prompt
            n = q.shape[2]
            pads = (torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if mask is None
                    else (~mask[:, 0, -1, :n]).sum(-1))
            self.pads = pads.tolist()  # once per prompt: the prefill may sync
            self.n_valid, self.counts = n - pads, True  # [B] on the device, advanced by every decode step
            self.seen = n
            return self.prefill(q, k, v, mask, scale, pads)
        outs = []  # several new tokens: one decode step each, so they read what a decode would
        for i in range(q.shape[2]):
            outs.append(self.decode(q[:, :, i], k[:, :, i], v[:, :, i], scale))
            if not self.deferred:
                self.after_token()
        return outs[0].unsqueeze(1) if len(outs) == 1 else torch.stack(outs, 1)  # a decode step copies nothing

    def prefill(self, q, k, v, mask, scale, pads: torch.Tensor) -> torch.Tensor:
        out = exact_attention(q, k, v, mask, scale)
        self.compress_prompt(q, k, v, mask, scale, pads)
        return out

    def compress_prompt(self, q, k, v, mask, scale, pads: torch.Tensor) -> None:
        """Store the prompt (pads cut off); compressed layers store less."""
        index = left_aligned(pads, k.shape[2])
        self.store.write(take(k, index), take(v, index), self.n_valid)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """One token per sequence (q [B, Hq, d], k/v [B, Hkv, d]) -> [B, Hq, d]; device state only."""
        self.count_token()
        self.store.append(k, v)
        return self.store.decode(q, scale)

    def count_token(self) -> None:
        """n_valid += 1, where this layer advances it (see :meth:`CompressedCache.defer`)."""
        if self.counts:
            self.n_valid.add_(1)

    def after_token(self) -> None:
        """Host bookkeeping after a decode step (and eager work that cannot be captured)."""
        self.seen += 1

    def end_prefill(self) -> None:
        """The prompt is in: memory kept only to compress prompts faster may go."""

    def reserve(self, tokens: int, exact: bool = False) -> None:
        """Room for ``tokens`` more decode steps, from host-known bounds (never asks the device); ``exact``: no
        more (the caller plans every step), else geometric growth (a step at a time)."""
        self.store.reserve(self.bound(self.seen + tokens), exact=exact)

    def bound(self, seen: int) -> int:
        """The most entries a sequence holds once ``seen`` tokens were read (a host-side bound)."""
        return seen - min(self.pads)

    # ---- what it holds ---------------------------------------------------------------------------
    def valid(self) -> int:
        """Tokens seen, pads excluded, summed over the batch."""
        return sum(self.seen - p for p in self.pads)

    def nbytes(self) -> int:
        return self.store.nbytes()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0
        self.pending = None
        self.is_initialized = False  # the next update re-creates the store

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the sequences ``indices`` (beam search reorders, batch repeats): the store and every per-sequence
        tensor of ``batch_state``."""
        self.store.select(indices)
        for name in self.batch_state:
            setattr(self, name, getattr(self, name)[indices])
        self.counts = True  # n_valid is this layer's own copy now
        self.pads = [self.pads[i] for i in indices.tolist()]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(len(self.pads), device=self.device).repeat_interleave(repeats))


class CompressedCache(Cache):
    """A transformers ``Cache`` whose layers are holokv layers; see :func:`holokv.caches.make_cache`."""

    cache_options = ()  # make_cache options a subclass takes itself; the others go to its layers

    def __init__(self, layers: list[FullLayer], method: str, ratio: float):
        super().__init__(layers=layers)
        self.method, self.ratio = method, ratio

    @torch.compiler.disable  # the layers' Python state: under torch.compile, a graph break (holokv.compiled_layers)
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes the cache holds right now (all layers, all sequences)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Bytes held per (non-pad) token seen, summed over layers."""
        return self.nbytes() / self.layers[0].valid()

    def reserve(self, tokens: int, exact: bool = False) -> None:
        """Room for ``tokens`` more decode steps in every layer (then a captured step keeps its buffers);
        ``exact``: that much and no more."""
        for layer in self.layers:
            layer.reserve(tokens, exact)

    def end_prefill(self) -> None:
        """Release what only the prefill needed (called by holokv.runtime before decoding)."""
        for layer in self.layers:
            layer.end_prefill()

    def defer(self, on: bool = True) -> None:
        """Whether the caller (holokv.runtime) runs :meth:`after_token` itself, outside a captured step. Deferred,
        the layers, which have read the same tokens, share the first layer's n_valid: one add a step, not one a
        layer."""
        lead = self.layers[0]
        for layer in self.layers:
            layer.deferred = on
            if layer is not lead:
                layer.n_valid = lead.n_valid if on else lead.n_valid.clone()
                layer.counts = not on

    def after_token(self) -> None:
        for layer in self.layers:
            layer.after_token()

    def graph(self, on: bool = True) -> None:
        """Whether the layers' work between decode steps may replay CUDA graphs (holokv.runtime: as its steps do)."""
        for layer in self.layers:
            layer.graphed = on
