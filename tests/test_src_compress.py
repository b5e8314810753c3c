"""SRC selection, summaries, one-shot and streaming compaction, decode reference."""
import math

import pytest
import torch

import holokv
from holokv.compaction import (CompactKV, Graphed, attend, causal_stats, compact, plan, pool_gqa, seed_centroids,
                               sigma_point_keys, softmax_ls_centroids)
from holokv.compaction.graph import GRAPHLESS
from holokv.compaction.linalg import check_info
from conftest import needs_cuda

B, HQ, HKV, D = 2, 6, 2, 16


def qkv(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, n, D, generator=g, dtype=dtype), torch.randn(B, HKV, n, D, generator=g, dtype=dtype),
            torch.randn(B, HKV, n, D, generator=g, dtype=dtype))


def test_compact_decode_bias_is_log_multiplicity():
    """Decoding a compacted cache (holo_decode, no slots, tail_bias): an entry with bias log 3
    weighs exactly like three copies of it; entries past lens are ignored."""
    q, k, v = qkv(5)
    q = q[:, :, 0]
    bias = torch.zeros(B, HKV, 5, dtype=q.dtype)
    bias[..., 1] = math.log(3)
    lens = torch.tensor([5, 4])
    none = k.new_zeros(B, HKV, 0, D)
    out = holokv.holo_decode(q.contiguous(), none, none, holokv.phase_keys(1, D, dtype=q.dtype), torch.zeros_like(lens),
                             k, v, lens, tail_bias=bias)
    for b in range(B):
        n = int(lens[b])
        kk = torch.cat([k[b, :, :n], k[b, :, 1:2].repeat(1, 2, 1)], 1).repeat_interleave(HQ // HKV, 0)
        vv = torch.cat([v[b, :, :n], v[b, :, 1:2].repeat(1, 2, 1)], 1).repeat_interleave(HQ // HKV, 0)
        ref = torch.softmax(q[b, :, None] @ kk.mT / math.sqrt(D), -1) @ vv
        torch.testing.assert_close(out[b], ref.squeeze(1))


@pytest.mark.parametrize("method", ["evict", "seed", "softmax_ls"])
def test_no_compression_when_budget_fits(method):
    q, k, v = qkv(40)
    _, ent = causal_stats(q, k)
    c, _ = compact(q[:, :, -8:], k, v, budget=41, method=method, row_entropy=ent, n_recent=8)
    assert torch.equal(c.k, k) and torch.equal(c.v, v) and (c.bias == 0).all()


def test_softmax_ls_exact_with_enough_centroids():
    """With at least as many centroids as reference rows, the reference outputs are reproduced exactly."""
    n, w = 64, 2  # 2 window queries x 3 heads = 6 reference rows <= 4 centroids per bin
    q, k, v = qkv(n)
    _, ent = causal_stats(q, k)
    c, info = compact(q[:, :, -w:], k, v, budget=24, method="softmax_ls", row_entropy=ent, bin_size=16, rank=4,
                      n_sink=2, n_recent=4, ridge=1e-12)
    check_info(info)
    assert c.k.shape[2] < n
    q_ref = pool_gqa(q[:, :, -w:], HKV)
    q_pos = (n - w + torch.arange(w)).repeat(HQ // HKV)
    exact, _ = attend(q_ref, k, v, mask=torch.arange(n) <= q_pos[:, None])
    # entries: kept tokens in position order (the last 4 are the recent window), then centroids
    n_kept, n_bins = plan(n, 24, method="softmax_ls", head_dim=D, bin_size=16, rank=4)
    entry_pos = torch.cat([torch.full((n_kept - 4,), -1), torch.arange(n - 4, n), torch.full((4 * n_bins,), -1)])
    got, _ = attend(q_ref, c.k, c.v, c.bias, mask=entry_pos <= q_pos[:, None])
    torch.testing.assert_close(got, exact, atol=1e-8, rtol=1e-8)


def test_key_bin_order_bins_similar_keys():
    """Keys of two clusters, alternating by position, the first 48 evicted: bins in position order mix them (a
    one-point centroid, the bin's mean, falls between), bins in key order do not (each centroid sits on a
    cluster); the same entries either way."""
    n, budget, rank = 64, 23, 1
    n_kept, n_bins = plan(n, budget, method="softmax_ls", head_dim=D, bin_size=8, rank=rank)
    assert (n_kept, n_bins) == (16, 6)
    q, k, v = qkv(n)
    c = torch.zeros(D, dtype=k.dtype)
    c[0] = 8.0
    k = 0.1 * k + torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).view(1, 1, n, 1).to(k.dtype) * c
    score = torch.arange(n, dtype=k.dtype).expand(B, HKV, n)  # the last 16 kept, the first 48 binned
    runs = {order: compact(q[:, :, -4:], k, v, budget=budget, method="softmax_ls", score=score, bin_size=8,
                           rank=rank, n_sink=0, n_recent=4, bin_order=order)[0] for order in ("position", "key")}
    assert torch.equal(runs["position"].k[..., :n_kept, :], runs["key"].k[..., :n_kept, :])
    first = {order: r.k[..., n_kept:, 0].abs() for order, r in runs.items()}  # the centroids' cluster coordinate
    assert (first["position"] < 1).all() and (first["key"] > 7).all()
    with pytest.raises(ValueError, match="bin_order"):
        compact(q[:, :, -4:], k, v, budget=budget, bin_order="random")


def test_tree_bin_order_bins_by_cells():
    """Keys of four clusters at (±8, ±4) in two coordinates, cycling by position, the first 48 evicted into 4 bins:
    key order (one split along the wide coordinate) bins two clusters together (a one-point centroid falls between
    them in the narrow coordinate), tree order splits each half again and bins one cluster a bin."""
    n, budget, rank = 64, 21, 1
    assert plan(n, budget, method="softmax_ls", head_dim=D, bin_size=12, rank=rank) == (16, 4)
    q, k, v = qkv(n)
    sign = lambda period: torch.where(torch.arange(n) % period < period // 2, 1.0, -1.0).view(1, 1, n).to(k.dtype)
    k = 0.1 * k
    k[..., 0] += 8 * sign(2)
    k[..., 1] += 4 * sign(4)
    score = torch.arange(n, dtype=k.dtype).expand(B, HKV, n)  # the last 16 kept, the first 48 binned
    runs = {order: compact(q[:, :, -4:], k, v, budget=budget, method="softmax_ls", score=score, bin_size=12,
                           rank=rank, n_sink=0, n_recent=4, bin_order=order)[0] for order in ("key", "tree")}
    assert torch.equal(runs["key"].k[..., :16, :], runs["tree"].k[..., :16, :])
    cent = {order: r.k[..., 16:, :2].abs() for order, r in runs.items()}  # the centroids' cluster coordinates
    assert (cent["key"][..., 0] > 7).all() and cent["key"][..., 1].mean() < 1  # the halves mix in their bins
    assert (cent["tree"][..., 0] > 7).all() and (cent["tree"][..., 1] > 3).all()


def test_sigma_points_match_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, D, generator=g, dtype=torch.float64)
    b = torch.zeros(3, 40, dtype=torch.float64)
    kc, lm = sigma_point_keys(k, b, 5)  # rank-2 bin, 5 points: the mean and two ± pairs
    torch.testing.assert_close(kc.mean(1), k.mean(1))
    cov = lambda x: (x - x.mean(1, keepdim=True)).mT @ (x - x.mean(1, keepdim=True)) / x.shape[1]
    torch.testing.assert_close(cov(kc), cov(k))
    torch.testing.assert_close(lm, torch.full_like(lm, math.log(40 / 5)))


@pytest.mark.parametrize("shrink_to", ["window", "mean"])
def test_ridge_shrinks_values_toward(shrink_to):
    """ridge pulls the fitted values toward V_0: with a huge one they are V_0. For "mean" that is each bin's plain
    mass-weighted mean value softmax(b)·v, which no reference query changes; for "window" (the default) the bin's
    output averaged over the reference queries, which is another value (so the option is not a no-op)."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    q, kb, vb, bb, n_c = rand(1, HKV, 5, D), rand(1, HKV, 3, 8, D), rand(1, HKV, 3, 8, D), rand(1, HKV, 3, 8), 2
    fitted = [softmax_ls_centroids(q * s, (rand(1, HKV, 5, D), rand(1, HKV, 5)), kb, vb, bb, n_c, ridge=1e9,
                                   shrink_to=shrink_to)[1] for s in (1, 3)]
    mean = (torch.softmax(bb, -1).unsqueeze(-2) @ vb).repeat_interleave(n_c, 2).flatten(2, 3)  # [1, H, 3·n_c, D]
    gaps = [float((values - mean).abs().max()) for values in fitted]
    assert max(gaps) < 1e-6 if shrink_to == "mean" else min(gaps) > 0.1, gaps


def test_prior_mass_is_the_bins_own():
    """mass="prior": each centroid's log-mass is its bin's, logsumexp(b) − log n_c, whatever the reference
    queries; "fit" shifts it per bin to their log-partitions (another value, so the option is not a no-op)."""
    g = torch.Generator().manual_seed(4)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    q, kb, vb, bb, n_c = rand(1, HKV, 5, D), rand(1, HKV, 3, 8, D), rand(1, HKV, 3, 8, D), rand(1, HKV, 3, 8), 2
    context = (rand(1, HKV, 5, D), rand(1, HKV, 5))
    prior = (bb.logsumexp(-1, keepdim=True) - math.log(n_c)).expand(1, HKV, 3, n_c).flatten(2)
    biases = {mass: [softmax_ls_centroids(q * s, context, kb, vb, bb, n_c, mass=mass)[2] for s in (1, 3)]
              for mass in ("prior", "fit")}
    for bias in biases["prior"]:
        torch.testing.assert_close(bias, prior)
    assert min(float((bias - prior).abs().max()) for bias in biases["fit"]) > 0.1


def test_seed_linear_readout_is_rank_r_fit():
    """Σ_c (q·k_c) v_c equals q W_r, W_r the rank-r truncation of the OLS map from queries to bin outputs."""
    q, k, v = qkv(24)
    q_ref, kb, vb = q[0, :2].reshape(48, D), k[0, 0], v[0, 0]
    kc, vc, info = seed_centroids(q_ref, kb, vb, torch.zeros(24, dtype=q.dtype), 3)
    check_info(info)
    w = torch.linalg.lstsq(q_ref, attend(q_ref, kb, vb)[0]).solution
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(kc.mT @ vc, u[:, :3] * s[:3] @ vh[:3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["seed", "softmax_ls"])
def test_one_shot_keeps_sinks_and_recent(method):
    n, n_sink, n_recent = 96, 4, 16
    q, k, v = qkv(n, dtype=torch.float32)
    score = torch.zeros(B, HKV, n)
    score[..., 40:60] = 1.0  # the middle looks important; sinks and recent must stay anyway
    c, info = compact(q[:, :, -8:], k, v, budget=40, method=method, score=score, bin_size=16, rank=2,
                      n_sink=n_sink, n_recent=n_recent)
    check_info(info)
    for pos in list(range(n_sink)) + list(range(n - n_recent, n)):
        assert (c.k == k[:, :, pos:pos + 1]).all(-1).any(-1).all(), pos
    assert torch.isfinite(c.v).all() and torch.isfinite(c.bias).all()


@needs_cuda
@pytest.mark.parametrize("method,subspace", [("seed", "iter"), ("softmax_ls", "iter"), ("softmax_ls", "eigh")])
def test_cuda_compact_matches_cpu_without_host_sync(method, subspace):
    """The whole one-shot compaction on CUDA (cuSOLVER solves, wide row-Gram subspaces, dual
    ridge solves) agrees with the CPU path and never waits on the host."""
    g = torch.Generator().manual_seed(3)
    # well-posed fits, so that two solver paths must agree: 4 x 48 reference rows for the seed's
    # 64-dim OLS map, and values of rank 8 = rank, so its rank-8 truncation is well defined
    q, k = torch.randn(1, 8, 48, 64, generator=g), torch.randn(1, 2, 600, 64, generator=g)
    v = torch.randn(1, 2, 600, 8, generator=g) @ torch.randn(1, 2, 8, 64, generator=g)
    kw = dict(budget=200, method=method, score="mass", bin_size=48, rank=8, n_recent=48, subspace=subspace)
    ref, _ = compact(q, k, v, **kw)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    compact(q, k, v, **kw)  # warm up: cuSOLVER handles, allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, info = compact(q, k, v, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_info(info)
    # entries are compared through attention (eigenvector signs may swap a sigma-point pair)
    probe = torch.randn(1, 2, 40, 64, generator=g)
    torch.testing.assert_close(attend(probe.cuda(), got.k, got.v, got.bias)[0].cpu(),
                               attend(probe, ref.k, ref.v, ref.bias)[0], rtol=1e-3, atol=1e-3)


@needs_cuda
def test_cuda_graphed_compact_replays_what_compact_computes():
    """Graphed(compact): a capture per signature, inputs copied in, results equal to eager calls
    on each new input; another shape gets its own graph; CPU inputs run eagerly."""
    g = torch.Generator().manual_seed(4)
    kw = dict(budget=160, method="softmax_ls", score="mass", bin_size=32, rank=4, n_recent=32)
    run = Graphed(compact, max_graphs=1)
    for n in (500, 500, 600, 500):
        q, k, v = (torch.randn(1, h, m, 64, generator=g).cuda() for h, m in ((8, 32), (2, n), (2, n)))
        (got, info), (ref, ref_info) = run(q, k, v, **kw), compact(q, k, v, **kw)
        for a, b in zip(got + (info,), ref + (ref_info,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert len(run.graphs) == (not GRAPHLESS)  # the least recently used graph went
    q, k, v = (x.cpu() for x in (q, k, v))
    assert run(q, k, v, **kw)[0].k.device.type == "cpu" and len(run.graphs) == (not GRAPHLESS)


@needs_cuda
def test_cuda_graphed_keys_on_argument_names():
    """The same values under other keywords are another call: no replay of the wrong graph."""
    f = Graphed(lambda x, *, a, b: x * a + b)
    x = torch.full((3,), 2.0, device="cuda")
    assert f(x, a=2.0, b=3.0).tolist() == [7.0] * 3
    assert f(x, b=2.0, a=3.0).tolist() == [8.0] * 3
    assert len(f.graphs) == (0 if GRAPHLESS else 2)


def window_reference(q, k, v, bias, lens, m, scale):
    """Dense fp64 causal attention of each sequence's last m entries' queries (pooled rows) over its entries."""
    B, H, rows, d = q.shape
    j = torch.arange(k.shape[2])
    at = (lens - m).view(B, 1, 1) + (torch.arange(rows) % m).view(1, -1, 1)  # each row's own entry
    s = (q.double() @ k.double().mT) * scale + bias.double()[:, :, None]
    s = s.masked_fill(~(j <= at)[:, None], -math.inf)
    return torch.softmax(s, -1) @ v.double(), s.logsumexp(-1)


@pytest.mark.parametrize("device, dtype, tol", [("cpu", torch.float32, 1e-5), pytest.param(
    "cuda", torch.bfloat16, 3e-2, marks=needs_cuda), pytest.param("cuda", torch.float16, 5e-3, marks=needs_cuda)])
def test_attention_before_a_window_merges_with_it(device, dtype, tol):
    """The observation window's causal attention over a ragged cache in two parts, as SRC's steps read it: the
    entries before the window (attend_before: fused on CUDA for 16-bit caches, else chunked; a sequence with
    none) and the window's own entries, merged by log-partitions."""
    from holokv.compaction.softmax import attend_before, attend_chunked, merge

    g = torch.Generator().manual_seed(3)
    B, H, G, m, W, d = 3, 2, 4, 6, 1100, 64  # W past one chunk and not a multiple of 16
    q = torch.randn(B, H, G * m, d, generator=g)
    k, v = (torch.randn(B, H, W, d, generator=g).to(dtype) for _ in range(2))
    bias = (torch.rand(B, H, W, generator=g) * 2).to(dtype)
    lens = torch.tensor([W, 700, m])  # the last sequence has nothing before its window
    ref_out, ref_lse = window_reference(q, k, v, bias, lens, m, 0.125)
    first = lens - m
    cols = (first.view(B, 1, 1, 1) + torch.arange(m).view(1, 1, m, 1)).expand(B, H, m, 1)
    near = [x.gather(2, cols.expand(B, H, m, d)).float() for x in (k, v)]
    see = torch.arange(m) <= (torch.arange(G * m) % m)[:, None]
    parts = (attend_before(*(x.to(device) for x in (q, k, v, bias, first)), 0.125),
             attend_chunked(q.to(device), *(x.to(device) for x in near), bias.gather(2, cols[..., 0]).float().to(device),
                            see.to(device), 0.125))
    assert parts[0][0][2].abs().max() == 0 and parts[0][1][2].eq(-math.inf).all()  # nothing before: out 0, lse -inf
    out, lse = merge(*parts)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("method", ["softmax_ls", "seed"])
def test_summaries_of_padded_bins_are_those_of_the_real_ones(method):
    """A step of static shape pads its bins (entries' log-mass dtype min, ``bins`` the real count): the real
    bins get the centroids, log-masses and failures they get alone, whatever the padding holds."""
    from holokv.compaction.summarize import summarize_bins

    g = torch.Generator().manual_seed(5)
    Bq, H, m, n, rank, real = 2, 2, 8, 8, 2, 2
    q_ref = torch.randn(Bq, H, m, D, generator=g)
    context = torch.randn(Bq, H, m, D, generator=g), torch.randn(Bq, H, m, generator=g)
    k, v = (torch.randn(Bq, H, real + 1, n, D, generator=g) for _ in range(2))
    bias = torch.zeros(Bq, H, real + 1, n)
    alone = summarize_bins(method, q_ref, context, k[:, :, :real], v[:, :, :real], bias[:, :, :real], rank, 0.03)
    bias[:, :, real:] = torch.finfo(bias.dtype).min
    padded = summarize_bins(method, q_ref, context, k, v, bias, rank, 0.03, bins=torch.tensor(real))
    for a, b in zip(alone[:3], padded[:3]):
        torch.testing.assert_close(b[:, :, :real * rank], a, atol=1e-5, rtol=1e-5)
    assert torch.equal(alone[3], padded[3])


def test_entropy_chunked_matches_the_softmax_rows():
    """Row entropies over a cache read a chunk at a time (masked entries, a bias, rows seeing a few entries or one)
    equal the entropy of the whole softmax rows; NaN in a key gives NaN in the rows that see it."""
    from holokv.compaction.scores import entropy
    from holokv.compaction.softmax import entropy_chunked, logits

    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 70, 16, generator=g)
    bias = torch.rand(2, 3, 70, generator=g)
    mask = torch.arange(70) <= torch.tensor([0, 3, 30, 64, 69])[:, None]
    want = entropy(torch.softmax(logits(q, k.double(), bias.double(), mask, 0.3), -1))
    torch.testing.assert_close(entropy_chunked(q, k, bias, mask, 0.3, chunk=16), want)
    k[0, 0, 2, 0] = float("nan")
    got = entropy_chunked(q, k, bias, mask, 0.3, chunk=16)
    assert got[0, 0, 1:].isnan().all() and not got[0, 0, 0].isnan() and not got[1].isnan().any()
