"""CUDA-graph replay of a compression call: SRC compaction is a few hundred small kernels, and
launching them one by one from Python costs more than running them."""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch.utils._pytree import tree_flatten, tree_map


# CUDA graphs need torch's caching allocator (a plain cudaMalloc inside a capture invalidates it);
# with it disabled, as under compute-sanitizer, Graphed runs its function eagerly.
GRAPHLESS = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"


class Graphed:
    """``fn`` replayed from a CUDA graph captured once per call signature.

    The signature is the shapes, dtypes and devices of the tensor arguments plus the
    other arguments' values. The first call with a signature runs ``fn`` twice (warm-up: library
    handles and workspaces), captures it, and replays; later
    calls copy their tensors into the graph's input buffers and replay. ``fn`` must
    have shapes that depend only on that signature and must never synchronize with the
    host: :func:`~holokv.compaction.compact` qualifies, as its sizes are Python ints and
    solver failures come back as ``info`` tensors. Results are cloned out of the
    graph's memory. At most ``max_graphs`` graphs are kept (least recently used go),
    as each holds its own memory pool. Calls with any tensor not on CUDA run ``fn`` directly, and so
    do all calls while torch's CUDA caching allocator is disabled (``GRAPHLESS``).
    """

    def __init__(self, fn, max_graphs: int = 4):
        self.fn, self.max_graphs = fn, max_graphs
        self.graphs: OrderedDict = OrderedDict()

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if GRAPHLESS or not tensors or not all(t.is_cuda for t in tensors):
            return self.fn(*args, **kwargs)
        # the structure too (which keyword holds which value), then every leaf
        key = (str(spec), *((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves))
        if key not in self.graphs:
            self.graphs[key] = self._capture(args, kwargs)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, inputs, out = self.graphs[key]
        for buf, x in zip(inputs, tensors):
            buf.copy_(x)
        graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out)

    def clear(self) -> None:
        """Drop every graph and the memory pool it holds (the next call captures again)."""
        self.graphs.clear()

    def _capture(self, args, kwargs):
        static_args, static_kwargs = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                                              (args, kwargs))
        inputs = [x for x in tree_flatten((static_args, static_kwargs))[0] if isinstance(x, torch.Tensor)]
        # Warmed up on the current stream: a warm-up on a side stream before the capture left every CUDA graph
        # captured later in the process replaying with longer gaps between its kernels (the decode step's graph
        # at B=1, N=32K: 1.466 ms a step against 1.431; bench/results/graph_history).
        for _ in range(2):
            self.fn(*static_args, **static_kwargs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*static_args, **static_kwargs)
        return graph, inputs, out


_POOL = None  # one memory pool for every LiveGraphs capture


class LiveGraphs:
    """Work done in place on live buffers (a cache layer's store), replayed from CUDA graphs captured on them.

    ``graphs(key, fn)`` runs ``fn()`` (which returns tensors or None) for ``key``: the call's static shapes and
    the addresses of every buffer ``fn`` reads or writes, so a graph is never replayed on moved buffers. The
    first call with a key runs eagerly (library handles and workspaces; its work is real and not repeated), the
    second captures and replays, later ones replay. Whatever changes between calls lives in device tensors ``fn``
    reads, filled before the call (never in Python values, which a capture freezes). All instances share one
    memory pool: their graphs run one at a time, and a call's results must be read before another graph of the
    pool replays. At most ``max_graphs`` per instance (least recently used go). While torch's caching allocator is
    disabled (``GRAPHLESS``) every call runs eagerly.
    """

    def __init__(self, max_graphs: int = 4):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()

    def __call__(self, key, fn):
        global _POOL
        if GRAPHLESS:
            return fn()
        if key in self.graphs:
            self.graphs.move_to_end(key)
            graph, out = self.graphs[key]
            graph.replay()
            return out
        if key not in self.seen:
            self.seen.add(key)
            return fn()
        _POOL = _POOL or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_POOL):
            out = fn()
        graph.replay()
        self.graphs[key] = graph, out
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return out

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
