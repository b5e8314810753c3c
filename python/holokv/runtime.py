"""A decode loop whose every step is one CUDA-graph replay: the model's whole forward (all layers'
append and ``holo_decode``, the MLPs, the head) captured once and replayed per token.

Each cache layer's decode path works on device state alone (lengths, ring starts, write positions),
so a captured step stays valid as the cache fills; host bookkeeping and the work that changes shapes
(SRC's compression steps every ``every`` tokens) run between replays in the layers' ``after_token``.
Room for every planned token is reserved after the prefill, so no buffer moves while the graph lives.

    dec = Decoder(model, cache)
    logits = dec.prefill(input_ids, max_new_tokens=64)   # eager: attends, compresses, reserves room
    for _ in range(64):
        logits = dec.step(greedy(logits))                # one replay (the first step runs eagerly, then captures)

:func:`generate` wraps that in a greedy loop. ``compile=True`` fuses the model's own small operations
(:mod:`holokv.compiled_layers`; the first step then compiles, which takes a while). With ``graph=False``, on
CPU, or while torch's caching allocator is off (a capture cannot allocate then: compute-sanitizer runs) the
same steps run eagerly. ``fuse=True`` (the default) computes the linear layers that read one input (q/k/v,
gate/up) by one GEMM each in the decode steps, and the layers alone (o, down, the head) by
:func:`holokv.decode_linear.decode_linear` (:mod:`holokv.fused_linears`; the fused weights become views of one
buffer).
"""
from __future__ import annotations

from contextlib import ExitStack

import torch

from .caches.hf_attention import CACHE_KWARG
from .caches.base import CompressedCache
from .compaction.graph import GRAPHLESS
from .compiled_layers import CompiledLayers
from .fused_linears import FusedLinears
from .row_argmax import row_argmax


class Decoder:
    """Prefill, then decode steps of ``model`` over ``cache`` (a :func:`holokv.caches.make_cache` cache). After
    the prefill the cache belongs to the decoder: it runs the layers' host bookkeeping itself."""

    def __init__(self, model, cache: CompressedCache, graph: bool = True, compile: bool = False, fuse: bool = True):
        self.model, self.cache = model, cache
        self.graph_wanted = graph
        self.compiled = CompiledLayers(model) if compile else None
        self.fused = FusedLinears(model) if fuse else None
        self.steps_left = 0  # set by prefill()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                max_new_tokens: int = 256) -> torch.Tensor:
        """Prompt ``input_ids`` [B, n] (left-padded where ``attention_mask`` says so) -> last logits [B, V]."""
        B, n = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{CACHE_KWARG: self.cache}).logits[:, -1]
        self.cache.end_prefill()
        self.cache.reserve(max_new_tokens, exact=True)
        self.cache.defer()
        self.steps_left = max_new_tokens
        dev = input_ids.device
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = positions[:, -1:] + 1  # each sequence's next position
        self.cache_position = torch.full((1,), n, dtype=torch.long, device=dev)
        self.use_graph = self.graph_wanted and dev.type == "cuda" and not GRAPHLESS
        self.cache.graph(self.use_graph)
        self.graph, self.warmed = None, False
        return logits

    def _forward(self) -> torch.Tensor:
        with ExitStack() as stack:
            for patch in (self.fused, self.compiled):
                if patch:
                    stack.enter_context(patch.installed())
            return self._model_step()

    def _model_step(self) -> torch.Tensor:
        # No attention mask: each layer knows its sequences' lengths, and a single query sees everything held.
        out = self.model(self.ids, position_ids=self.pos, cache_position=self.cache_position, use_cache=True,
                         **{CACHE_KWARG: self.cache}).logits[:, -1]
        self.pos.add_(1)
        return out

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (``tokens`` [B]) -> next logits [B, V] (a static buffer when graphed)."""
        if self.steps_left <= 0:
            raise RuntimeError("the cache has room for the max_new_tokens given to prefill(); prefill again")
        self.steps_left -= 1
        self.ids.copy_(tokens.view(-1, 1))
        if not (self.use_graph and self.warmed):
            self.warmed = True  # the first step runs eagerly (library handles, workspaces), the next one captures
            out = self._forward()
        elif self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
            self.graph.replay()
            out = self.logits
        else:
            self.graph.replay()
            out = self.logits
        self.cache.after_token()
        return out


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The next token of each sequence: ``logits.argmax(-1)`` of [B, V] logits (the first of equal maxima; a NaN
    counts as the largest), by :func:`holokv.row_argmax.row_argmax` (two Triton passes on CUDA)."""
    return row_argmax(logits)


@torch.no_grad()
def generate(model, cache: CompressedCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, graph: bool = True, compile: bool = False, fuse: bool = True) -> torch.Tensor:
    """Greedy decoding through :class:`Decoder` -> [B, n + max_new_tokens] token ids."""
    dec = Decoder(model, cache, graph, compile, fuse)
    logits = dec.prefill(input_ids, attention_mask, max_new_tokens)
    out = [input_ids]
    for i in range(max_new_tokens):
        token = greedy(logits)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:  # the last token is not fed back
            logits = dec.step(token)
    return torch.cat(out, 1)
