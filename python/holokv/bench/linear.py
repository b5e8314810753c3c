"""The linear layers of a decode step, x [M, K] times an nn.Linear weight [N, K], M = 1 and 16, at Llama-3-8B's
shapes (q/k/v fused, o, gate/up fused, down, the LM head), bfloat16: holokv.decode_linear (a Triton kernel)
against F.linear (cuBLAS).

Each is timed as a decode step runs it: a CUDA graph replays the call over as many copies of the weight as
make 4 x the L2 cache (each read cold, as one layer's weight after the others'), and the time per call is the
replay's over the copies, launch gaps included. floor_us: the weight's bytes over the copy bandwidth measured in
the same run. max_err: the largest difference from float64, over the output's magnitude, for each method.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import holokv

from .common import ColdL2Timer, add_out, copy_bandwidth, need_cuda, provenance, save

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="M, the decode step's tokens")
    ap.add_argument("--layers", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--replays", type=int, default=20, help="timed replays (median)")
    add_out(ap)


def per_call_us(fn, xs, weights, replays: int) -> float:
    """Median microseconds per call of fn(x, w) over a graph of one call per weight copy."""
    outs = [fn(x, w) for x, w in zip(xs, weights)]  # warm-up (workspaces, first-use setup) before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x, w) for x, w in zip(xs, weights)]
    times = []
    for _ in range(replays + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    del outs
    return sorted(times[2:])[replays // 2]


def run(args) -> int:
    need_cuda("linear")
    bandwidth = copy_bandwidth(ColdL2Timer())
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    methods = {"cublas": lambda x, w: F.linear(x, w), "holokv": holokv.decode_linear}
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in args.layers:
        N, K = SHAPES[name]
        nbytes = N * K * 2
        copies = max(2, math.ceil(4 * l2 / nbytes))
        weights = [torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) / K ** 0.5
                   for _ in range(copies)]
        for M in args.rows:
            xs = [torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(copies)]
            ref = xs[0].cpu().double() @ weights[0].cpu().double().T
            row = {"layer": name, "M": M, "N": N, "K": K, "weight_bytes": nbytes, "copies": copies,
                   "floor_us": nbytes / bandwidth * 1e6}
            for method, fn in methods.items():
                us = per_call_us(fn, xs, weights, args.replays)
                err = ((fn(xs[0], weights[0]).cpu().double() - ref).abs().max() / ref.abs().max()).item()
                row |= {f"{method}_us": us, f"{method}_over_floor": us / row["floor_us"], f"{method}_max_err": err}
            row["speedup"] = row["cublas_us"] / row["holokv_us"]
            rows.append(row)
            print(f"{name:8s} M={M:2d}  cublas {row['cublas_us']:7.1f} us ({row['cublas_over_floor']:.2f} x floor)  "
                  f"holokv {row['holokv_us']:7.1f} us ({row['holokv_over_floor']:.2f} x floor)  "
                  f"{row['speedup']:.2f}x", flush=True)
        del weights
        torch.cuda.empty_cache()
    path = save("linear_bench.json", {"bench": "linear", **provenance(torch.device("cuda")), "dtype": "bfloat16",
                                      "copy_bandwidth_Bps": bandwidth, "timing": __doc__, "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0
