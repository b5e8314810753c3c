"""Does a CUDA graph captured earlier in a process slow the decode step's graph replays? One variant a process
(as holokv bench e2e runs each row), Llama-3-8B shapes cut to 8 layers, random bf16 weights, B = 1, N = 32768,
the compiled and graphed decode step; the median of three timings of 60 steps each:

    holokv               holokv k=4 alone
    src                  SRC, whose prompt compaction is replayed from CUDA graphs (compaction.Graphed)
    holokv_after_graph   holokv after a Graphed capture of a small matmul, replayed and cleared
    holokv_kept_graph    the same, the graph kept
    holokv_side_stream   holokv after work on a side stream alone (Graphed's warm-up), no capture
    holokv_reset_graph   holokv after a Graphed capture whose graph is reset (its executable destroyed), then
                         collected, before the model is built
    holokv_plain_graph   holokv after a torch.cuda.graph capture of the matmul, warmed up on the current stream
                         (no side stream), replayed, then reset

    python scripts/graph_history.py VARIANT OUT_DIR      (appends a row to OUT_DIR/graph_history.json)
"""
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

from holokv.bench.e2e_measure import holokv_decoder
from holokv.bench.e2e_model import build_model, model_config
from holokv.compaction import Graphed
from holokv.provenance import provenance
from holokv.runtime import greedy

B, N, LAYERS, STEPS = 1, 32768, 8, 60
variant, out = sys.argv[1], Path(sys.argv[2])
method = variant.split("_")[0]
matmul = lambda a: (a @ a).softmax(-1)  # noqa: E731
a = torch.randn(64, 64, device="cuda")
if variant in ("holokv_after_graph", "holokv_kept_graph", "holokv_reset_graph"):
    graphed = Graphed(matmul)
    graphed(a), graphed(a)
    if variant == "holokv_reset_graph":
        for graph, _, _ in graphed.graphs.values():
            graph.reset()
        graphed.clear()
        gc.collect()
    elif variant == "holokv_after_graph":
        graphed.clear()
elif variant == "holokv_plain_graph":
    matmul(a)  # cuBLAS makes its handle outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        matmul(a)
    graph.replay()
    torch.cuda.synchronize()
    graph.reset()
elif variant == "holokv_side_stream":
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        matmul(a)
    torch.cuda.current_stream().wait_stream(side)
config = model_config(None, LAYERS, False)
model = build_model(None, config, "cuda", torch.bfloat16)
ids = torch.randint(config.vocab_size, (B, N), generator=torch.Generator().manual_seed(1)).cuda()
spec = dict(name=method, options={"k": 4} if method == "holokv" else {}, ratio=4.0, graph=True, compile=True)
with torch.no_grad():
    prefill, step, _ = holokv_decoder(model, spec, 8 + 3 * STEPS)
    tokens = greedy(prefill(ids))
    for _ in range(8):
        tokens = greedy(step(tokens))
    ms = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS):
            tokens = greedy(step(tokens))
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end) / STEPS)
path = out / "graph_history.json"
rows = json.loads(path.read_text())["rows"] if path.exists() else []
rows.append(dict(variant=variant, batch=B, context=N, layers=LAYERS, dtype="bfloat16", step_ms=statistics.median(ms),
                 step_ms_all=ms))
out.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(dict(provenance(), script="scripts/graph_history.py", rows=rows), indent=2) + "\n")
print(rows[-1])
