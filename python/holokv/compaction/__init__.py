"""SRC's compaction: Selection (scores decide which entries stay exact), Reconstruction (least squares fits
what the rest contribute to softmax attention) and Compression (a few low-rank centroid entries with a
log-mass each), batched over sequences, heads and bins.

compact.compact compacts a prompt; the SRC cache (holokv.caches.src) also runs it while decoding;
graph.Graphed replays it from a CUDA graph.
"""
from .compact import compact, plan
from .graph import Graphed
from .linalg import check_info, ridge_solve, top_subspace, truncated_svd
from .scores import attention_mass, causal_stats, seed_score, split
from .softmax import CompactKV, attend, attend_chunked, pool_gqa
from .summarize import seed_centroids, sigma_point_keys, softmax_ls_centroids

__all__ = ["CompactKV", "Graphed", "attend", "attend_chunked", "attention_mass", "causal_stats", "check_info", "compact", "plan",
           "pool_gqa", "ridge_solve", "seed_centroids", "seed_score", "sigma_point_keys", "softmax_ls_centroids",
           "split", "top_subspace", "truncated_svd"]
