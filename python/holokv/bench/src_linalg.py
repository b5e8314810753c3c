"""SRC compression's batched linear algebra on CUDA for one layer, float32: 8 KV heads x
4096 binned tokens (bins of 64) x d = 128, rank 16.

The whole compression of that layer ("layer": holokv.compaction.compact, softmax_ls: window-mass
selection, sigma-point keys, log-mass fit, joint ridge value solve) with 1024 kept tokens,
32 query heads observed over a 32-token window, 64 bins of 64 tokens -> 16 centroids each:
  holokv           compact() called eagerly (its default sigma-point PCA, subspace="iter")
  holokv_graph     the same replayed from a CUDA graph (holokv.compaction.Graphed)
  eigh_graph       the same with the exact PCA (subspace="eigh"), graphed
rel_err compares attention outputs for random probes against the same compact() in
float64 on the CPU (numerical accuracy); attn_err compares them against attention over
the uncompressed layer (what the compression loses, on white-noise keys: the hardest
case for a low-rank summary and for the iterative PCA).

Top-r right singular subspace of every bin's [64, 128] keys (sigma_point_keys,
truncated_svd), by
  holokv           linalg.top_subspace: the 64 x 64 row Gram (bins are wide) by GEMM +
                   holokv.batched_eigh (cuSOLVER syevBatched, one call for all 512 bins)
  holokv_iter      linalg.top_subspace(method="iter"): block subspace iteration on the same
                   Gram (3 steps, 2r columns, Cholesky QR) + a 2r-square batched Jacobi eigh;
                   eagerly and graphed (holokv_iter_graph)
  torch_eigh       the 128 x 128 column Gram through torch.linalg.eigh (loops over bins for d > 32)
  torch_svd        torch.linalg.svd, default driver
  torch_gesvda     torch.linalg.svd(driver="gesvda") (batched approximate SVD)
and the ridge normal equations of the two summarizers: seed (one 128 x 128 system per
bin, 128 right-hand sides) and softmax_ls's joint value fit as a primal (bins x rank)-square
system per head (ridge_solve takes the 128-square dual instead, as there are only 128
reference rows), by holokv.batched_cholesky_solve against torch.linalg.cholesky_ex +
torch.cholesky_solve.

Reports the median milliseconds of cold-L2 runs (CUDA events) and rel_err: the relative
error of the top-r singular values (subspace) or of the solution (solves) against float64
on the CPU; subspace rows also report energy, the smallest fraction over bins of the
optimal rank-r energy ‖x basis‖² that the basis captures.
"""
from __future__ import annotations

import argparse

import torch

import holokv
from holokv.compaction import Graphed, attend, compact, linalg, plan

from .common import ColdL2Timer, add_out, need_cuda, provenance, save


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double().cpu() - ref).norm() / ref.norm()).item()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="binned (evicted) tokens per head")
    ap.add_argument("--bin-size", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20, help="timed runs (torch_eigh and torch_svd take ~1 s each)")
    add_out(ap)


def run(args) -> int:
    need_cuda("src")
    h, d, r = args.kv_heads, args.head_dim, args.rank
    nb = args.tokens // args.bin_size
    gen = torch.Generator().manual_seed(0)
    timer = ColdL2Timer()
    rows = []

    def record(problem, method, fn, ref, out=lambda res: res, **extra):
        ms = timer(fn, reps=args.reps, warmup=3) / 1e3
        err = rel_err(out(fn()), ref)
        rows.append({"problem": problem, "method": method, "ms": ms, "rel_err": err, **extra})
        print(f"{problem:10s} {method:18s} {ms:9.3f} ms  rel_err {err:.1e}",
              *(f"{k} {v:.6f}" for k, v in extra.items()), flush=True)

    # a layer whose compaction bins exactly `tokens` tokens: n_keep kept + nb·r centroid entries fit the budget
    n_keep, w, hq = 1024, 32, 4 * h
    n = n_keep + args.tokens
    budget = -(-(n_keep + nb * r) * (2 * d + 1) // (2 * d))  # token-equivalents, log-mass bytes included
    q, k, v = (torch.randn(1, hh, nn, d, generator=gen).cuda() for hh, nn in ((hq, w), (h, n), (h, n)))
    sizes = plan(n, budget, method="softmax_ls", head_dim=d, bin_size=args.bin_size, rank=r)
    assert sizes == (n_keep, nb), sizes
    opts = dict(budget=budget, method="softmax_ls", score="mass", bin_size=args.bin_size, rank=r, ridge=1.0)
    probe = torch.randn(1, h, 64, d, generator=gen)  # outputs compared through attention (entry order, signs)
    full = attend(probe.double(), k.double().cpu(), v.double().cpu())[0]  # the uncompressed layer
    out = lambda res: attend(probe.cuda(), res[0].k, res[0].v, res[0].bias)[0]
    print(f"layer: {h} KV heads, {n} tokens -> {n_keep} kept + {nb} bins x {r} centroids")
    refs = {}  # float64 CPU compaction per PCA method: each takes seconds
    for subspace in ("iter", "eigh"):
        ref = compact(*(t.double().cpu() for t in (q, k, v)), **opts, subspace=subspace)[0]
        refs[subspace] = attend(probe.double(), ref.k, ref.v, ref.bias)[0]
    graphed = Graphed(compact)
    for method, subspace, fn in (("holokv", "iter", lambda: compact(q, k, v, **opts)),
                                 ("holokv_graph", "iter", lambda: graphed(q, k, v, **opts)),
                                 ("eigh_graph", "eigh", lambda: graphed(q, k, v, **opts, subspace="eigh"))):
        record("layer", method, fn, refs[subspace], out, attn_err=rel_err(out(fn()), full))
    del q, k, v, graphed

    x = torch.randn(h * nb, args.bin_size, d, generator=gen).cuda()  # one bin's keys per problem
    s_ref = torch.linalg.svdvals(x.double().cpu())[..., :r]
    top = lambda s: s.flip(-1)[..., :r].clamp_min(0).sqrt()  # ascending Gram eigenvalues -> top sigma
    energy = lambda basis: ((x @ basis).square().sum((-2, -1)).double().cpu() / s_ref.square().sum(-1)).min().item()
    print(f"subspace: {h * nb} bins [{args.bin_size}, {d}] -> rank {r}")
    graphed = Graphed(linalg.top_subspace)
    for method, fn in (("holokv", lambda: linalg.top_subspace(x, r)),
                       ("holokv_iter", lambda: linalg.top_subspace(x, r, method="iter")),
                       ("holokv_iter_graph", lambda: graphed(x, r, method="iter"))):
        record("subspace", method, fn, s_ref, lambda res: res[1], energy=energy(fn()[0]))
    record("subspace", "torch_eigh", lambda: torch.linalg.eigh(x.mT @ x), s_ref, lambda res: top(res[0]))
    record("subspace", "torch_svd", lambda: torch.linalg.svd(x, full_matrices=False), s_ref,
           lambda res: res[1][..., :r])
    # gesvda needs rows >= columns: the right singular vectors of x are the left ones of xᵀ
    record("subspace", "torch_gesvda", lambda: torch.linalg.svd(x.mT, full_matrices=False, driver="gesvda"),
           s_ref, lambda res: res[1][..., :r])
    del x, graphed

    for problem, batch, n in (("seed", h * nb, d), ("softmax_ls", h, nb * r)):
        a = torch.randn(batch, 2 * n, n, generator=gen)
        g = (a.mT @ a / (2 * n) + 0.1 * torch.eye(n)).cuda()  # well-conditioned normal equations
        rhs = torch.randn(batch, n, d, generator=gen).cuda()
        ref = torch.linalg.solve(g.double().cpu(), rhs.double().cpu())
        print(f"{problem}: {batch} systems {n} x {n}, {d} right-hand sides")
        record(problem, "holokv", lambda: holokv.batched_cholesky_solve(g, rhs), ref, lambda res: res[0])
        record(problem, "torch", lambda: torch.cholesky_solve(rhs, torch.linalg.cholesky_ex(g)[0]), ref)
        del a, g, rhs
    config = {"kv_heads": h, "tokens": args.tokens, "layer_q_heads": hq, "layer_window": w, "layer_kept": n_keep, "bin_size": args.bin_size, "bins_per_head": nb,
              "head_dim": d, "rank": r, "dtype": "float32"}
    path = save("src_linalg_bench.json", {"bench": "src_linalg", **provenance(), "config": config,
                                          "timing": f"median of {args.reps} cold-L2 runs, CUDA events, ms",
                                          "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0
