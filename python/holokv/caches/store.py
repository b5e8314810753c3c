"""What every cache layer holds and ``holo_decode`` reads, in preallocated buffers.

One format serves every method: entries (exact tokens, or SRC's compacted ones with a
log-mass ``bias``) with lengths per sequence ``[B]`` or per KV head ``[B, Hkv]``, plus,
for HoloKV, superposed slots; HoloKV's entries then form a ring (its oldest exact tokens
leave by moving the ring's ``start``, see ``torch.ops.holokv.holo_append``). Lengths live
on the device, appends write in place, and nothing on the per-token path synchronizes
with the host. Capacity grows geometrically in whole blocks, and only where the host
already knows the room it needs (layers bound their lengths with Python ints), so a
captured decode step keeps its buffers.
"""
from __future__ import annotations

import torch

BLOCK = 64  # entries: capacity grows in whole blocks


def rows(x: torch.Tensor) -> torch.Tensor:
    """New tokens [B, H, d] as the append ops take them: any batch and head strides (a model's v is a view into
    its fused projection's output, which a copy would cost a launch a layer), rows contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _grown(capacity: int, need: int, exact: bool) -> int:
    """Capacity for ``need``: whole blocks, at least doubling unless ``exact`` (the caller knows the end)."""
    need = -(-need // BLOCK) * BLOCK
    return capacity if need <= capacity else need if exact else max(need, 2 * capacity)


class Store:
    """Entries k, v ``[B, H, cap, d]`` (+ ``bias [B, H, cap]``), ``lens``, optional ring ``start`` and slots."""

    def __init__(self, like: torch.Tensor, *, bias: bool = False, per_head: bool = False,
                 phase: torch.Tensor | None = None):
        B, H, _, d = like.shape
        empty = like.new_empty(B, H, 0, d)
        self.k, self.v = empty, empty.clone()
        self.bias = like.new_zeros(B, H, 0) if bias else None
        self.lens = torch.zeros((B, H) if per_head else (B,), dtype=torch.long, device=like.device)
        # HoloKV: slots, superposed tokens per sequence (held, and dropped by a window), the entries as a ring
        self.phase = like.new_ones(1, d) if phase is None else phase.to(like.device, like.dtype)
        self.k_slots, self.v_slots = empty.clone(), empty.clone()
        self.slot_lens = torch.zeros(B, dtype=torch.long, device=like.device)
        self.start = self.slot_lens.clone() if phase is not None else None
        self.evicted = self.slot_lens.clone() if phase is not None else None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, entries: int, slots: int = 0, exact: bool = False) -> None:
        """Room for ``entries`` entries and ``slots`` slots: grows (in blocks, geometrically unless ``exact``)
        where short."""
        cap = _grown(self.capacity, entries, exact)
        if cap > self.capacity:
            rows = None
            if self.start is not None and self.capacity:  # unroll the ring: entry i moves to row i
                rows = (self.start.view(-1, 1) + torch.arange(self.capacity, device=self.k.device)) % self.capacity
                self.start.zero_()
            self.k, self.v = (self._regrow(x, cap, rows) for x in (self.k, self.v))
            if self.bias is not None:
                self.bias = self._regrow(self.bias, cap, rows)
        scap = _grown(self.k_slots.shape[2], slots, exact)
        if scap > self.k_slots.shape[2]:
            self.k_slots, self.v_slots = (self._regrow(x, scap) for x in (self.k_slots, self.v_slots))

    @staticmethod
    def _regrow(x: torch.Tensor, cap: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x with room for ``cap`` entries; rows [B, n]: where each sequence's entry i was (a ring)."""
        new = x.new_zeros(*x.shape[:2], cap, *x.shape[3:])
        if rows is not None:
            x = x.gather(2, rows.view(*rows.shape[:1], 1, -1, *[1] * (x.dim() - 3)).expand(*x.shape))
        new[:, :, : x.shape[2]] = x
        return new

    def write(self, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Replace the entries by k, v ``[B, H, n, d]`` (entries past ``lens`` are filler), bias ``[B, H, n]``; lens
        per sequence fill per-head lengths alike."""
        n = k.shape[2]
        self.reserve(n, exact=True)
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        if self.bias is not None:
            self.bias[:, :, :n] = 0 if bias is None else bias
        self.lens.copy_(lens.view(*lens.shape, *[1] * (self.lens.dim() - lens.dim())).expand_as(self.lens))
        if self.start is not None:
            self.start.zero_()

    def write_slots(self, k_slots: torch.Tensor, v_slots: torch.Tensor, slot_lens: torch.Tensor,
                    evicted: torch.Tensor) -> None:
        n = k_slots.shape[2]
        self.reserve(self.capacity, n, exact=True)
        self.k_slots[:, :, :n], self.v_slots[:, :, :n] = k_slots, v_slots
        self.slot_lens.copy_(slot_lens)
        self.evicted.copy_(evicted)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """One entry per sequence (or head), k, v ``[B, H, d]``, written in place after each one's last (log-mass 0)."""
        torch.ops.holokv.append_entries(rows(k), rows(v), self.k, self.v, self.lens, self.bias)

    def decode(self, q: torch.Tensor, scale: float, mode: str = "full", slot_gain: float = 1.0) -> torch.Tensor:
        """Attention of one query per sequence, q ``[B, Hq, d]``, over everything held -> ``[B, Hq, d]``."""
        return torch.ops.holokv.holo_decode(q.contiguous(), self.k_slots, self.v_slots, self.phase, self.slot_lens,
                                            self.k, self.v, self.lens, mode, scale, slot_gain, self.bias, self.start)

    def nbytes(self) -> int:
        """Bytes of what is held: the entries in use (K, V and a log-mass each) and the slots in use."""
        H, d, size = self.k.shape[1], self.k.shape[3], self.k.element_size()
        per_entry = (2 * d + (self.bias is not None)) * size
        entries = int(self.lens.sum()) * (1 if self.lens.dim() == 2 else H)
        slots = int((-(-self.slot_lens // self.phase.shape[0])).sum()) * H  # 0 without superposition
        return entries * per_entry + slots * 2 * d * size

    def select(self, index: torch.Tensor) -> None:
        """Keep the sequences ``index`` (beam search reorders, batch repeats)."""
        for name in ("k", "v", "bias", "lens", "k_slots", "v_slots", "slot_lens", "start", "evicted"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[index])
