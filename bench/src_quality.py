"""SRC quality on real attention: seed vs softmax_ls vs Top-K vs H2O at equal bytes.

Captures post-RoPE Q/K/V of a few SmolLM2-135M layers on pydoc text, compresses the
first --ctx tokens of each layer's cache to each budget, and scores every method by
the attention output of the *next* --future tokens' queries (held out: never used
for selection or fitting) over the compressed context against exact attention over
the full context. Budgets are token-equivalents (2·d stored elements per token);
methods storing a log-mass pay for it, so all rows of a budget use equal bytes.

    python bench/src_quality.py [--device cpu] [--ctx 1024] [--future 128]
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from holokv.eval.data import corpus
from holokv.eval.model import DEFAULT_MODEL, load_model
from holokv.provenance import provenance
from holokv.compaction import attend, causal_stats, compact, pool_gqa
from holokv.compaction.compact import entry_elems
from holokv.compaction.linalg import check_info


def capture(device, n_tokens, layers):
    """Post-RoPE q [L, Hq, T, d], k, v [L, Hkv, T, d] of the chosen layers (float32, CPU)."""
    model, tok = load_model(DEFAULT_MODEL, device)
    ids = tok(corpus(), return_tensors="pt").input_ids[:, :n_tokens].to(device)
    got = {}

    def hook(layer):
        def pre(mod, args, kwargs):  # recompute q/k/v exactly as LlamaAttention.forward does
            h = kwargs.get("hidden_states", args[0] if args else None)
            shape = (*h.shape[:-1], -1, mod.head_dim)
            q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (mod.q_proj, mod.k_proj, mod.v_proj))
            q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
            got[layer] = [x[0].float().cpu() for x in (q, k, v)]
        return pre

    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return [torch.stack([got[i][j] for i in layers]) for j in range(3)]


def errors(out, ref):
    """Mean row cosine and relative L2 (per KV head over its rows, then averaged)."""
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item()
    rel = ((out - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).mean().item()
    return cos, rel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--future", type=int, default=128)
    ap.add_argument("--layers", default="2,9,16,23,29")
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--window", type=int, default=32, help="observation window (SnapKV) = reference queries")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--ridge", type=float, default=1.0, help="softmax_ls value ridge, relative to mean diag(AᵀA)")
    ap.add_argument("--centroid-frac", type=float, default=0.125,
                    help="bin_size is chosen so that centroids take about this share of the budget")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "src_quality_cpu"))
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    dev = torch.device(args.device)
    C, F, w = args.ctx, args.future, args.window

    q, k, v = capture(dev, C + F, layers)
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    L, Hq, T, d = q.shape
    Hkv = k.shape[1]
    assert T == C + F, f"text too short: {T} tokens"
    qc, kc, vc = q[:, :, :C], k[:, :, :C], v[:, :, :C]
    q_fut = pool_gqa(q[:, :, C:], Hkv)  # held-out queries, [L, Hkv, G·F, d]
    exact, _ = attend(q_fut, kc, vc)
    h2o_mass, row_ent = causal_stats(qc, kc)
    common = dict(n_sink=args.n_sink, n_recent=w, rank=args.rank, ridge=args.ridge)

    rows = []
    for budget in [int(x) for x in args.budgets.split(",")]:
        bin_size = max(2 * args.rank, math.ceil(C * args.rank / (args.centroid_frac * budget)))
        one_shot = {
            "topk (window mass)": dict(method="evict", score="mass"),
            "h2o (one-shot accumulated mass)": dict(method="evict", score=h2o_mass),
            "seed": dict(method="seed", score="seed"),
            "softmax_ls (seed score)": dict(method="softmax_ls", score="seed"),
            "softmax_ls (window mass)": dict(method="softmax_ls", score="mass"),
            "softmax_ls (window mass, exact PCA)": dict(method="softmax_ls", score="mass", subspace="eigh"),
        }
        for name, kw in one_shot.items():
            t0 = time.perf_counter()
            cache, info = compact(qc[:, :, -w:], kc, vc, budget=budget, row_entropy=row_ent, bin_size=bin_size,
                                  **common, **kw)
            check_info(info)
            secs = time.perf_counter() - t0
            out, _ = attend(q_fut, cache.k, cache.v, cache.bias)
            rows.append(dict(budget=budget, method=name, mode="one-shot", entries=cache.k.shape[2],
                             bytes_per_token=cache.k.shape[2] * entry_elems(kw["method"], d) * kc.element_size() / C,
                             seconds=secs, bin_size=bin_size if kw["method"] != "evict" else None,
                             **dict(zip(("cosine", "rel_l2"), errors(out, exact)))))
        for r in rows[-len(one_shot):]:
            print(f"{budget:5d} {r['method']:42s} entries {r['entries']:4d} cos {r['cosine']:.4f} "
                  f"relL2 {r['rel_l2']:.4f} {r['seconds']:.2f}s")

    meta = dict(**provenance(dev), model=DEFAULT_MODEL, dtype="float32",
                layers=layers, ctx=C, future=F, window=w, rank=args.rank, ridge=args.ridge, centroid_frac=args.centroid_frac,
                n_sink=args.n_sink, q_shape=list(q.shape), kv_shape=list(k.shape), head_dim=d,
                bytes_note="fp32 storage; 2·d elements per K/V entry, "
                "+1 for the log-mass of softmax_ls entries")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"SmolLM2-135M, layers {layers}, {Hkv} KV heads each, context {C} tokens, {F} held-out future "
             f"queries x {Hq} heads, window {w}, rank {args.rank}, ridge {args.ridge}, device {dev}, commit {meta['commit']}.", "",
             "| budget (tok-eq) | method | entries | bytes/ctx token | cosine ↑ | rel-L2 ↓ | time s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['budget']} | {r['method']} | {r['entries']} | {r['bytes_per_token']:.1f} | {r['cosine']:.4f} "
              f"| {r['rel_l2']:.4f} | {r['seconds']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
