"""Decode attention with holo_decode over the two compressed cache formats, against
SDPA (flash / cuDNN) over the full, uncompressed cache, in the same run, cold L2:

  superposed  HoloKV: N/k slots (modes "full" and "aligned") plus an exact tail;
  compacted   SRC: N/ratio entries (kept tokens and centroids) with a log-mass bias
              each (holo_decode without slots, tail_bias); SDPA over the same number
              of entries without the bias is listed as a same-bytes reference.

Reports microseconds, GB/s of cache read and % of the measured copy bandwidth.
Shapes default to Llama-3-8B's attention: 32 query heads, 8 KV heads, d = 128.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import holokv

from .common import ColdL2Timer, add_out, copy_bandwidth, need_cuda, provenance, save

SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]  # the fastest decode SDPA has


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tail", type=int, default=64, help="exact tail tokens (open slot + recent window)")
    ap.add_argument("--compact-ratio", type=int, nargs="+", default=[4, 8], help="compacted cache: N / entries")
    add_out(ap)


def run(args) -> int:
    need_cuda("decode")
    dtype = getattr(torch, args.dtype)
    timer = ColdL2Timer()
    peak = copy_bandwidth(timer)
    esize = torch.finfo(dtype).bits // 8
    rows, full_us = [], {}
    for B, N, k in itertools.product(args.batch, args.tokens, args.k):
        hq, hkv, d, T = args.q_heads, args.kv_heads, args.head_dim, args.tail
        q = torch.randn(B, hq, d, device="cuda", dtype=dtype)
        kf = torch.randn(B, hkv, N, d, device="cuda", dtype=dtype)
        vf = torch.randn(B, hkv, N, d, device="cuda", dtype=dtype)
        with sdpa_kernel(SDPA_BACKENDS):
            t_sdpa = timer(lambda: F.scaled_dot_product_attention(q[:, :, None], kf, vf, enable_gqa=True))
        full_bytes = 2 * B * hkv * N * d * esize
        phase = holokv.phase_keys(k, d, device="cuda", dtype=dtype)
        n_sup = N - T
        ks = holokv.superpose(kf[:, :, :n_sup].contiguous(), phase)
        vs = holokv.superpose(vf[:, :, :n_sup].contiguous(), phase)
        kt, vt = kf[:, :, n_sup:].contiguous(), vf[:, :, n_sup:].contiguous()
        del kf, vf
        sl = torch.full((B,), n_sup, dtype=torch.int64, device="cuda")
        tl = torch.full((B,), T, dtype=torch.int64, device="cuda")
        holo_bytes = 2 * B * hkv * (ks.shape[2] + T) * d * esize
        full_us[B, N] = t_sdpa
        row = {"cache": "superposed", "batch": B, "tokens": N, "k": k, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
               "dtype": args.dtype, "tail": T,
               "sdpa_full_us": t_sdpa, "sdpa_full_bytes": full_bytes,
               "sdpa_full_GBps": full_bytes / t_sdpa / 1e3, "holo_bytes": holo_bytes}
        for mode in ("full", "aligned"):
            t = timer(lambda: holokv.holo_decode(q, ks, vs, phase, sl, kt, vt, tl, mode))
            row[f"holo_{mode}_us"] = t
            row[f"holo_{mode}_GBps"] = holo_bytes / t / 1e3
            row[f"holo_{mode}_pct_copy_bw"] = 100 * holo_bytes / (t * 1e-6) / peak
            row[f"holo_{mode}_speedup_vs_sdpa_full"] = t_sdpa / t
        rows.append(row)
        print(f"B={B:2d} N={N:6d} k={k:2d}  sdpa(full) {t_sdpa:8.1f} us {row['sdpa_full_GBps']:7.0f} GB/s | "
              + " | ".join(f"holo[{m}] {row[f'holo_{m}_us']:8.1f} us {row[f'holo_{m}_GBps']:6.0f} GB/s "
                           f"{row[f'holo_{m}_pct_copy_bw']:5.1f}% x{row[f'holo_{m}_speedup_vs_sdpa_full']:.2f}"
                           for m in ("full", "aligned")), flush=True)
        del ks, vs, kt, vt
        torch.cuda.empty_cache()
    for B, N, ratio in itertools.product(args.batch, args.tokens, args.compact_ratio):
        hq, hkv, d, M = args.q_heads, args.kv_heads, args.head_dim, N // ratio
        q = torch.randn(B, hq, d, device="cuda", dtype=dtype)
        kc, vc = (torch.randn(B, hkv, M, d, device="cuda", dtype=dtype) for _ in range(2))
        bias = torch.rand(B, hkv, M, device="cuda", dtype=dtype)  # log-masses
        lens = torch.full((B,), M, dtype=torch.int64, device="cuda")
        none, phase = kc[:, :, :0], holokv.phase_keys(1, d, device="cuda", dtype=dtype)
        t = timer(lambda: holokv.holo_decode(q, none, none, phase, torch.zeros_like(lens), kc, vc, lens,
                                             tail_bias=bias))
        with sdpa_kernel(SDPA_BACKENDS):
            t_same = timer(lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True))
        nbytes = (2 * d + 1) * B * hkv * M * esize
        row = {"cache": "compacted", "batch": B, "tokens": N, "ratio": ratio, "entries": M, "q_heads": hq,
               "kv_heads": hkv, "head_dim": d, "dtype": args.dtype, "holo_bytes": nbytes, "holo_us": t,
               "holo_GBps": nbytes / t / 1e3, "holo_pct_copy_bw": 100 * nbytes / (t * 1e-6) / peak,
               "sdpa_same_entries_no_bias_us": t_same, "sdpa_full_us": full_us[B, N],
               "speedup_vs_sdpa_full": full_us[B, N] / t}
        rows.append(row)
        print(f"B={B:2d} N={N:6d} compacted x{ratio}: holo {t:8.1f} us {row['holo_GBps']:6.0f} GB/s "
              f"{row['holo_pct_copy_bw']:5.1f}% | sdpa same entries, no bias {t_same:8.1f} us | "
              f"x{row['speedup_vs_sdpa_full']:.2f} vs sdpa full", flush=True)
        del q, kc, vc, bias
        torch.cuda.empty_cache()
    path = save("decode_bench.json", {"bench": "decode", **provenance(), "copy_bandwidth_Bps": peak,
                                      "timing": "median of 50 cold-L2 runs, CUDA events", "rows": rows},
                args.out)
    print(f"copy bandwidth {peak / 1e9:.0f} GB/s; wrote {path}")
    return 0
