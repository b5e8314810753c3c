"""SRC: Selection-Reconstruction-Compression of the KV cache (GitHub issue 4).

Evicted tokens are summarized into a few centroid entries with a log-mass bias;
see compact.compact (one-shot, prefill) and stream.SRCStream (while decoding);
graph.Graphed replays compact from a CUDA graph.
"""
from .attention import CompactKV, attend, pool_gqa
from .compact import compact, plan
from .graph import Graphed
from .linalg import check_info, ridge_solve, top_subspace, truncated_svd
from .selection import causal_stats, seed_score, split, window_mass
from .stream import SRCStream
from .summarize import seed_centroids, sigma_point_keys, softmax_ls_centroids

__all__ = ["CompactKV", "Graphed", "SRCStream", "attend", "causal_stats", "check_info", "compact", "plan",
           "pool_gqa", "ridge_solve", "seed_centroids", "seed_score", "sigma_point_keys", "softmax_ls_centroids",
           "split", "top_subspace", "truncated_svd", "window_mass"]
