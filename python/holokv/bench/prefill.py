"""Training attention's cost on CUDA: holo_prefill_attention (compiled FlexAttention over the prompt's exact and
virtual entries, forward and backward) against SDPA's causal attention with GQA (flash, cuDNN or memory-efficient,
whichever torch picks) over the same q, k, v.

Shapes default to SmolLM2-135M's attention (9 query heads, 3 KV heads, d = 64) at holokv distill's defaults
(4 sequences of 512 tokens), and 2048 tokens; HoloKV at k = 2 and 4 with every stream token superposed (ratio k,
as the distillation experiment trains), both read modes. Per (N, k, mode): the milliseconds of the forward and
of forward + backward (medians of CUDA-event-timed runs after the first call, whose compilation is reported
apart as compile_s), their ratio to SDPA's at the same N, and the tokens/s of forward + backward.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import holokv
from holokv.caches.prefill_attention import holo_prefill_attention
from holokv.caches.superposed import HoloSpec
from holokv.reference import MODES

from .common import ColdL2Timer, add_out, need_cuda, provenance, save


def add_arguments(ap) -> None:
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--reps", type=int, default=20)
    add_out(ap)


def run(args) -> int:
    need_cuda("prefill")
    dtype = getattr(torch, args.dtype)
    B, hq, hkv, d = args.batch, args.q_heads, args.kv_heads, args.head_dim
    timer = ColdL2Timer()
    rows = []
    for n in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(B, h, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
                   for h in (hq, hkv, hkv))
        grad = torch.randn(B, hq, n, d, device="cuda", dtype=dtype, generator=g)

        def measure(attend, **row):
            """attend() -> [B, Hq, N, d]; its forward and forward + backward times, into rows."""
            def fwd_bwd():
                torch.autograd.grad(attend(), (q, k, v), grad)

            start = time.perf_counter()
            fwd_bwd()  # compiles, where it does
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            with torch.no_grad():
                fwd_ms = timer(attend, reps=args.reps) / 1e3
            ms = timer(fwd_bwd, reps=args.reps) / 1e3
            rows.append(dict(row, tokens=n, fwd_ms=fwd_ms, fwd_bwd_ms=ms, compile_s=compile_s,
                             tokens_per_s=B * n / (ms * 1e-3)))
            sdpa = next(r for r in rows if r["attention"] == "sdpa" and r["tokens"] == n)
            rows[-1].update(fwd_vs_sdpa=fwd_ms / sdpa["fwd_ms"], fwd_bwd_vs_sdpa=ms / sdpa["fwd_bwd_ms"])
            print(f"N={n:6d} {row['attention']:6s} k={row.get('k') or '-'} {row.get('mode') or '':8s}"
                  f" fwd {fwd_ms:8.3f} ms  fwd+bwd {ms:8.3f} ms  x{rows[-1]['fwd_bwd_vs_sdpa']:.2f} of SDPA"
                  f"  (first call {compile_s:.1f} s)", flush=True)

        measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), attention="sdpa")
        for kk in args.k:
            phase = holokv.phase_keys(kk, d, device="cuda")
            for mode in args.modes:
                spec = HoloSpec(k=kk, ratio=float(kk), mode=mode)
                measure(lambda: holo_prefill_attention(q, k, v, phase, spec).transpose(1, 2), attention="holokv",
                        k=kk, mode=mode)
        del q, k, v, grad
    config = dict(batch=B, q_heads=hq, kv_heads=hkv, head_dim=d, dtype=args.dtype, tokens=args.tokens, k=args.k,
                  modes=args.modes, reps=args.reps, timing="median of CUDA-event-timed runs, cold L2")
    path = save("prefill_bench.json", {"bench": "prefill", **provenance(), "config": config, "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0
