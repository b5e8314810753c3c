"""SRC compression while decoding: its cost per generated token, for one decoder layer's KV.

One SRCLayer (holokv.caches.src) is driven directly, without a model: a random prompt
(B=1, 32 query heads, 8 KV heads, d=128, bf16 storage) is compacted at ratio 4, then
256 tokens are decoded through the layer's decode path (append, holo_decode) twice:
  decode only     every=None: generated tokens stay exact
  decode + steps  a compression step every M generated tokens (scoring, binning, fp32
                  centroid solves), amortized over the M tokens
Each run is timed with CUDA events around the whole 256-token loop, so the time includes
the Python launch gaps that a real decode loop pays; the prefill is not timed. Reported:
microseconds per generated token for each (median of --reps runs, each from the same
compacted prompt), their difference (the compression overhead per token), the steps' own
span per token (events around each step) and the entries each cache holds at the end (the
decode-only cache reads more entries, so the difference slightly understates the steps).
A run under torch.cuda.set_sync_debug_mode("error") records whether any host sync happened.

    holokv bench stream                 # CUDA, writes bench/results/src_stream_bench.json
    holokv bench stream --smoke         # small shapes on the CPU, prints only
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from holokv.caches.src import SRCLayer

from .common import add_out, need_cuda, provenance, save


def decode(layer: SRCLayer, q, k, v, scale, cuda: bool) -> tuple[float, list[float]]:
    """Decode q/k/v [B, H, T, d] token by token; returns (µs per token, µs of each compression step)."""
    spans = []
    step = layer.step

    def timed_step(scale):
        if not cuda:
            t0 = time.perf_counter()
            step(scale)
            spans.append(1e6 * (time.perf_counter() - t0))
            return
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(scale)
        e.record()
        spans.append((s, e))

    layer.step = timed_step
    n = q.shape[2]
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for t in range(n):
        layer.update(k[:, :, t: t + 1], v[:, :, t: t + 1])
        layer.attend(q[:, :, t: t + 1], None, scale)
    if not cuda:
        return 1e6 * (time.perf_counter() - t0) / n, spans
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / n, [1e3 * s.elapsed_time(e) for s, e in spans]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help="CPU, small shapes, nothing saved unless --out")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 8192; smoke 512)")
    ap.add_argument("--tokens", type=int, default=256, help="generated tokens")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--every", default="16", help="comma-separated M values")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of each configuration (smoke 1)")
    add_out(ap, smoke=True)


def run(args) -> int:
    cuda = not args.smoke
    if cuda:
        need_cuda("stream", " (--smoke runs on the CPU)")
    dev = torch.device("cuda" if cuda else "cpu")
    n, n_new = args.prompt or (512 if args.smoke else 8192), args.tokens
    reps = 1 if args.smoke else args.reps
    dtype = torch.bfloat16 if cuda else torch.float32
    B, Hq, H, d = 1, args.q_heads, args.kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n + n_new, d, generator=gen).to(dev, dtype) for h in (Hq, H, H))
    scale = d ** -0.5

    rows = []
    for every in [None] + [int(m) for m in args.every.split(",")]:
        layer = SRCLayer(ratio=args.ratio, every=every)
        layer.update(k[:, :, :n], v[:, :, :n])
        layer.attend(q[:, :, :n], None, scale)  # prefill: exact attention, then the one-shot compaction
        new = [x[:, :, n:] for x in (q, k, v)]
        decode(copy.deepcopy(layer), *new, scale, cuda)  # warm-up (allocator, cuSOLVER handles)
        times, last = [], None
        for _ in range(reps):
            last = copy.deepcopy(layer)
            us, spans = decode(last, *new, scale, cuda)
            times.append(us)
        last.late_check.flush()
        syncs = "not checked (CPU)"
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
            try:
                decode(copy.deepcopy(layer), *new, scale, cuda=False)  # host timing only: events are no syncs anyway
                syncs = "none"
            except RuntimeError as e:
                syncs = f"synchronized: {e}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        row = {"every": every, "us_per_token": statistics.median(times), "us_per_token_runs": times,
               "steps": len(spans), "step_us_mean": statistics.mean(spans) if spans else 0.0,
               "step_us_per_token": sum(spans) / n_new, "entries_after_prompt": layer.held_k.shape[2],
               "entries_end": last.held_k.shape[2], "bins_summarized": (last.reviewed - last.kept) // last.bin_size,
               "reviewed": last.reviewed, "kept_exact": last.kept, "host_syncs": syncs}
        rows.append(row)
        base = rows[0]["us_per_token"]
        print(f"every={str(every):5s} {row['us_per_token']:8.1f} us/token (+{row['us_per_token'] - base:6.1f})  "
              f"steps {row['steps']:3d} x {row['step_us_mean']:8.1f} us = {row['step_us_per_token']:6.1f} us/token  "
              f"entries {row['entries_after_prompt']} -> {row['entries_end']}  host syncs: {syncs}", flush=True)
    for row in rows[1:]:
        row["overhead_us_per_token"] = row["us_per_token"] - rows[0]["us_per_token"]

    config = {"batch": B, "q_heads": Hq, "kv_heads": H, "head_dim": d, "prompt": n, "generated": n_new,
              "ratio": args.ratio, "storage_dtype": str(dtype).removeprefix("torch."), "solve_dtype": "float32",
              "layer_defaults": {k: getattr(layer, k) for k in ("method", "score", "rank", "bin_size", "window",
                                                                "recent", "sinks", "ridge")}}
    if cuda or args.out:
        path = save("src_stream_bench.json" if cuda else "src_stream_smoke.json",
                    {"bench": "src_stream", **provenance(dev), "config": config,
                     "timing": "CUDA events around the whole decode loop (Python launch gaps included), "
                               f"median of {reps} runs, microseconds per generated token" if cuda else
                               "host wall clock, microseconds per generated token", "rows": rows}, args.out)
        print(f"wrote {path}")
    return 0
