"""The model's own small operations fused by ``torch.compile`` for the decode step (``Decoder(compile=True)``).

A decode step of a small batch launches dozens of tiny kernels per layer around the weights' GEMMs and the
cache's ``holo_decode``: RMSNorm in seven, RoPE in ten, SiLU-and-multiply, residual adds. Inductor fuses them
into a few, and gathers the input embedding's row per sequence in one small kernel (eager ``index_select`` takes
over 10 us for 16 rows of a 128K-row table). The input embedding, each decoder layer, the rotary embedding and
the final norm are compiled (static shapes, no CUDA graphs of inductor's own: the Decoder captures the whole step
itself). The cache's ``update`` and the ``"holokv"`` attention function are ``torch.compiler.disable``d, so
dynamo breaks the graph there instead of tracing the cache's Python state (which would guard on it and recompile
every token). transformers passes each layer's index to ``update`` as a Python int, which dynamo specializes:
one graph of the attention's input projections per layer, so the recompile limit is raised to the model's depth
while the compiled forwards run.

The compiled forwards are installed only while a decode step runs (:meth:`CompiledLayers.installed`): the
prefill (prompt lengths vary) and anything else the user runs stays eager.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class CompiledLayers:
    def __init__(self, model):
        decoder = model.get_decoder()
        self.modules = [model.get_input_embeddings(), *decoder.layers,
                        *(getattr(decoder, name, None) for name in ("rotary_emb", "norm"))]
        self.modules = [m for m in self.modules if m is not None]
        self.forwards = [torch.compile(m.forward, dynamic=False) for m in self.modules]
        # variants per code object: the attention's projections once per layer, a few others
        self.limit = len(decoder.layers) + 8

    @contextmanager
    def installed(self):
        """Within: the modules run their compiled forwards (compiling on first use)."""
        with torch._dynamo.config.patch(recompile_limit=self.limit,
                                        accumulated_recompile_limit=max(256, 4 * self.limit)):
            for module, forward in zip(self.modules, self.forwards):
                module.forward = forward
            try:
                yield
            finally:
                for module in self.modules:
                    del module.forward
