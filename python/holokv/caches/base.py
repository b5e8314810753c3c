"""Cache container, exact (full) layer and the helpers every compressed layer shares.

A layer stores new tokens in ``update`` and hands itself to the ``"holokv"``
attention function, which calls ``attend``: the layer reads its own storage and
then compresses it, so the bytes it holds really shrink. ``seen`` stays the true
sequence length: transformers derives RoPE positions and mask sizes from it while
fewer entries are stored. Left padding (``attention_mask``) is supported; a
sequence's pads are the columns its last prompt query cannot see.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import hand_over

NOT_READ = ("{} was not read by its attention: the model must use attn_implementation='holokv' "
            "(call holokv.caches.use_holokv_attention(model) first)")


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, ...] gathered along N with a per-sequence [B, M] or per-head [B, H, M] index."""
    if index.dim() == 2:
        index = index[:, None].expand(-1, x.shape[1], -1)
    return x.gather(2, index.view(*index.shape, *[1] * (x.dim() - 3)).expand(*index.shape, *x.shape[3:]))


def append_ragged(buf: torch.Tensor, buf_len: torch.Tensor, new: torch.Tensor, new_len, width: int | None = None):
    """Per sequence b: buf[b, :, :buf_len[b]] followed by new[b, :, :new_len[b]] (new_len [B] or an int).

    Sized ``width``, by default the longest result (found with a host sync: callers on a per-token path
    that know it pass it); entries past a sequence's own length are filler.
    """
    n_buf, n_new = buf.shape[2], new.shape[2]
    j = torch.arange(int((buf_len + new_len).max()) if width is None else width, device=buf.device)
    src = torch.where(j < buf_len[:, None], j, n_buf + j - buf_len[:, None])
    return take(torch.cat([buf, new], 2), src.clamp(max=n_buf + n_new - 1))


def visible(mask: torch.Tensor | None, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, q, n]: may each query (sequence index q_idx [q]) see each stored entry (index k_idx [B, Hkv, n])?

    ``mask`` is transformers' boolean [B, 1, q, seen] mask, or None when plainly causal.
    """
    if mask is None:
        return k_idx.unsqueeze(2) <= q_idx.view(1, 1, -1, 1)
    rows = mask[:, 0].unsqueeze(1).expand(-1, k_idx.shape[1], -1, -1)
    return rows.gather(3, k_idx.unsqueeze(2).expand(-1, -1, rows.shape[2], -1))


def attention_probs(q: torch.Tensor, k: torch.Tensor, vis: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention weights [B, Hkv, G, q, n] in fp32 (GQA: G query heads per KV head)."""
    B, Hq, m, d = q.shape
    Hkv = k.shape[1]
    s = torch.einsum("bhgmd,bhnd->bhgmn", q.reshape(B, Hkv, Hq // Hkv, m, d).float(), k.float()) * scale
    return s.masked_fill(~vis.unsqueeze(2), float("-inf")).softmax(-1)


def exact_attention(q, k, v, mask, scale) -> torch.Tensor:
    """SDPA of q [B, Hq, q, d] over k/v [B, Hkv, n, d] in sequence order -> [B, q, Hq, d]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          is_causal=mask is None and q.shape[2] > 1, enable_gqa=True).transpose(1, 2)


def apply_probs(p: torch.Tensor, v: torch.Tensor, dtype) -> torch.Tensor:
    """Weights [B, Hkv, G, q, n] times values [B, Hkv, n, d] -> [B, q, Hq, d] (transformers' output layout)."""
    out = torch.einsum("bhgmn,bhnd->bmhgd", p, v.float())
    return out.reshape(*out.shape[:2], -1, out.shape[-1]).to(dtype)


class FullLayer(CacheLayerMixin):
    """Exact cache: keeps every token (the reference the compressed layers are measured against)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    state = ("keys", "values")  # per-sequence tensors (batch first) that make up what the layer holds

    def __init__(self, ratio: float = 1.0):
        super().__init__()
        if ratio != 1:
            raise ValueError(f"{type(self).__name__} keeps every token; its ratio must be 1, got {ratio}")
        self.seen = 0  # true sequence length, pads included
        self.unread = 0  # tokens appended by update() that attend() has not read yet
        self.pads = None  # [B] left pads per sequence, known at the first read

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.unread:
            raise RuntimeError(NOT_READ.format(type(self).__name__))
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.append(key_states, value_states)
        self.unread = key_states.shape[2]
        hand_over(self, key_states)
        return key_states, value_states

    def append(self, k, v):
        self.keys = torch.cat([self.keys, k], 2)
        self.values = torch.cat([self.values, v], 2)

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Attention output [B, q, Hq, d] of the new tokens' queries q [B, Hq, q, d] over this layer."""
        start, self.unread = self.seen, 0
        self.seen += q.shape[2]
        if self.pads is None:
            self.pads = (torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if mask is None
                         else (~mask[:, 0, -1, : self.seen]).sum(-1))
        return self.read(q, mask, scale, start)

    def read(self, q, mask, scale, start):
        return exact_attention(q, self.keys, self.values, mask, scale)

    def valid(self) -> torch.Tensor:
        """[B] tokens seen per sequence, pads excluded."""
        return self.seen - self.pads

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in map(self.__getattribute__, self.state) if t is not None)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = self.unread = 0
        self.pads = None
        self.is_initialized = False  # the next update re-creates the state tensors

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self.state:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[indices])
        self.pads = self.pads[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.pads.shape[0], device=self.device).repeat_interleave(repeats))


class CompressedCache(Cache):
    """A transformers ``Cache`` whose layers are holokv layers; see :func:`holokv.caches.make_cache`."""

    def __init__(self, layers: list[FullLayer], method: str, ratio: float):
        super().__init__(layers=layers)
        self.method, self.ratio = method, ratio

    def nbytes(self) -> int:
        """Bytes the cache tensors hold right now (all layers, all sequences)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Bytes held per (non-pad) token seen, summed over layers."""
        return self.nbytes() / float(self.layers[0].valid().sum())


def budget(valid: torch.Tensor, ratio: float) -> int:
    """Entries a layer may keep per head after ``valid`` [B] tokens at compression ``ratio``."""
    return max(1, math.ceil(int(valid.max()) / ratio))
