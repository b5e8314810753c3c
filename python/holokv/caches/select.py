"""Token selection, shared by the eviction baselines (one module each: streaming, topk, h2o, snapkv, expected):
each keeps, per KV head, the ``ceil(valid / ratio)`` highest-scoring tokens of each sequence and drops the rest.
One-shot methods compress once, after the prompt (later tokens are appended exact, as in their papers); the
others evict after every read, one entry a step, in place (the last entry moves into the evicted one's row).

The prompt is attended exactly (SDPA); scores that need attention weights compute them from the prompt's
queries (:func:`holokv.compaction.scores.attention_mass`). Budgets are per sequence, from its own length, so a
left-padded sequence is compressed as it would be alone. Decoding reads the kept entries through ``holo_decode``.
"""
from __future__ import annotations

import math

import torch

from ..compaction.scores import take
from ..compaction.softmax import logits, pool_gqa
from .base import FullLayer

INF = float("inf")


def budget(valid, ratio: float):
    """Entries a sequence of ``valid`` tokens may keep per head at compression ``ratio``: an int for an int,
    per sequence on the device for a tensor (the same float64 arithmetic)."""
    if isinstance(valid, torch.Tensor):
        return (valid.double() / ratio).ceil().long().clamp(min=1)
    return max(1, math.ceil(valid / ratio))


def head_budgets(ranked: torch.Tensor, keep: torch.Tensor, share: float) -> torch.Tensor:
    """AdaKV's head-adaptive budgets [B, Hkv]: from each head's scores ranked best first [B, Hkv, n] and each
    sequence's budget per head ``keep`` [B], each head's share of the Hkv·keep best scores of the layer, its first
    ``share``·keep counted in whatever they score (ties: head order, then rank)."""
    B, H, n = ranked.shape
    floor = (keep.double() * share).floor().long()
    sure = (torch.arange(n, device=ranked.device) < floor.view(B, 1, 1)).expand(B, H, n).reshape(B, H * n)
    # every head's floor first, then the best scores (protected ones are +inf too), each in a stable order
    best = ranked.reshape(B, H * n).argsort(dim=-1, descending=True, stable=True)
    best = best.gather(1, sure.gather(1, best).to(torch.int8).argsort(dim=-1, descending=True, stable=True))
    picked = torch.arange(H * n, device=ranked.device) < (H * keep).view(B, 1)
    return torch.zeros_like(picked).scatter_(1, best, picked).view(B, H, n).sum(-1)


class SelectionLayer(FullLayer):
    """Keeps the top-scoring entries per KV head; subclasses define the scores. ``adaptive`` (one-shot methods):
    None gives every KV head the sequence's budget; a share α in [0, 1] makes the budgets head-adaptive (AdaKV,
    Feng et al. 2024): the layer's Hkv·budget entries go to the best scores of all its heads together, each head
    keeping at least α of its budget, so heads whose attention is spread out get more entries."""

    def __init__(self, ratio: float = 1.0, adaptive: float | None = None):
        FullLayer.__init__(self)
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        self.ratio, self.adaptive = ratio, adaptive

    def compress_prompt(self, q, k, v, mask, scale, pads):
        """Per sequence its own budget of the highest prompt scores (pads never win), in position order."""
        n = k.shape[2]
        keep = [min(n - p, self.budget(n - p)) for p in self.pads]
        pos = torch.arange(n, device=k.device) - pads[:, None, None]  # [B, 1, n] index from the first real token
        s = self.prompt_scores(q, k, v, mask, scale, pos).masked_fill(pos < 0, -INF)
        # the best first; ties (SnapKV's max-pooled votes, protected tokens) go to the earlier token, by its index
        # from the first real one, so a padded sequence keeps what it keeps alone
        order = pos.expand_as(s).argsort(dim=-1, stable=True)
        ranked = order.gather(2, s.gather(2, order).argsort(dim=-1, descending=True, stable=True))
        lens = self.head_lens(s.gather(2, ranked), torch.tensor(keep, device=k.device))  # [B] or [B, Hkv]
        most = int(lens.max())  # once per prompt: the prefill may sync
        held = torch.arange(most, device=k.device) < lens.view(*lens.shape, *[1] * (3 - lens.dim()))
        chosen = torch.where(held, ranked[..., :most], n).sort(-1).values.clamp(max=n - 1)
        self.store.write(take(k, chosen), take(v, chosen), lens)
        self.prompt = n, most
        self.kept_prompt(chosen, pos)

    def head_lens(self, ranked: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Entries each head keeps: ``keep`` [B] for every head, or (``adaptive``) :func:`head_budgets`'s."""
        return keep if self.adaptive is None else head_budgets(ranked, keep, self.adaptive)

    def budget(self, valid):
        """Entries a sequence of ``valid`` tokens keeps per head (see :func:`budget`)."""
        return budget(valid, self.ratio)

    def kept_prompt(self, chosen: torch.Tensor, pos: torch.Tensor) -> None:
        """Per-entry state of the kept prompt tokens ``chosen`` [B, Hkv, m] (``pos``: index from the first real
        token of every prompt token)."""

    def bound(self, seen: int) -> int:
        n, kept = self.prompt  # one-shot: the kept prompt, then every decoded token
        return kept + seen - n

    def prompt_scores(self, q, k, v, mask, scale, pos) -> torch.Tensor:
        raise NotImplementedError


class EvictingLayer(SelectionLayer):
    """Evicts after every read. Per-entry state (``state``: ``rel``, the index from the first real token, for
    scores that read positions, and for H2O ``acc``, the accumulated score) is kept beside the store's entries,
    moved with them and counted in the bytes held.

    The state costs bytes the full cache does not hold, so a sequence holds it only once it evicts, from
    ``evicts_from`` tokens on: before, it keeps its tokens in order with no state (its bytes are the full
    cache's; ``rel`` is then each entry's row, derived, not held, and H2O's mass starts with the first query
    that evicts). From then on its budget is the ratio's, capped so that entries and their state fit in the full
    cache's bytes: entries·(T + S) <= valid·T, T an entry's K and V bytes, S its state's."""

    state = ("rel",)
    batch_state = FullLayer.batch_state + state

    def new_store(self, like):
        # the state, empty until the prompt is kept: its dtypes (acc: attention_mass's) give an entry's bytes
        dtypes = {"rel": torch.long, "acc": torch.promote_types(like.dtype, torch.float32)}
        for name in self.state:
            setattr(self, name, like.new_zeros(*like.shape[:2], 0, dtype=dtypes[name]))
        self.entry_bytes = 2 * like.shape[3] * like.element_size()
        self.state_bytes = sum(getattr(self, name).element_size() for name in self.state)
        self.evicts_from = self.first_eviction()
        return super().new_store(like)

    def first_eviction(self) -> float:
        """The length from which a sequence evicts and holds its state: where the ratio's budget first drops
        below its tokens, or earlier, at the longest length where a single eviction still frees the bytes of
        the state of the rest (valid·S <= T + S): a decode step evicts one entry at most. Never at ratio 1."""
        if self.ratio == 1:
            return INF
        if not self.state_bytes:
            return 1
        last, valid = 1 + self.entry_bytes // self.state_bytes, 1
        while valid < last and budget(valid, self.ratio) >= valid:
            valid += 1
        return valid

    def holds_state(self, valid):
        """Whether a sequence of ``valid`` tokens (an int, or a tensor per sequence) holds its state."""
        return valid >= self.evicts_from

    def budget(self, valid):
        """Every token until the sequence evicts; then the ratio's budget, at most what fits the full cache's
        bytes with the state. Nondecreasing, by one a token at most: one eviction a step keeps to it."""
        fits = valid * self.entry_bytes // (self.entry_bytes + self.state_bytes)
        if isinstance(valid, torch.Tensor):
            return torch.where(self.holds_state(valid), torch.minimum(budget(valid, self.ratio), fits), valid)
        return min(budget(valid, self.ratio), fits) if self.holds_state(valid) else valid

    def kept_prompt(self, chosen, pos):
        if "rel" in self.state:
            self.rel = self.grow(pos.expand(*chosen.shape[:2], -1).gather(2, chosen), self.store.capacity)
        if "acc" in self.state:
            self.acc = self.grow(self.prompt_mass(chosen), self.store.capacity)

    def nbytes(self) -> int:
        """The entries, and the state of the sequences that evict."""
        held = sum(n for n, p in zip(self.store.lens.tolist(), self.pads) if self.holds_state(self.seen - p))
        return self.store.nbytes() + held * self.store.k.shape[1] * self.state_bytes

    @staticmethod
    def grow(x: torch.Tensor, cap: int) -> torch.Tensor:
        return x if x.shape[2] >= cap else torch.cat([x, x.new_zeros(*x.shape[:2], cap - x.shape[2])], 2)

    def bound(self, seen: int) -> int:
        return self.budget(seen - min(self.pads)) + 1  # one over the budget until the read evicts it

    def reserve(self, tokens: int, exact: bool = False) -> None:
        super().reserve(tokens, exact)
        for name in self.state:
            setattr(self, name, self.grow(getattr(self, name), self.store.capacity))

    def decode(self, q, k, v, scale):
        s = self.store
        self.count_token()
        at = s.lens.view(-1, 1, 1).expand(-1, k.shape[1], 1)  # the row the new token goes to
        if "rel" in self.state:
            self.rel.scatter_(2, at, (self.n_valid - 1).view(-1, 1, 1).expand_as(at))
        if "acc" in self.state:
            self.acc.scatter_(2, at, 0.0)
        s.append(k, v)
        out = s.decode(q, scale)
        held = torch.arange(s.capacity, device=q.device) < s.lens.view(-1, 1, 1)
        scores = self.decode_scores(q, scale, held).masked_fill(~held, INF)
        # over budget (by one at most): the lowest-scoring entry goes, the last entry takes its row
        over = s.lens > self.budget(self.n_valid)
        last = (s.lens - 1).view(-1, 1, 1).expand(-1, k.shape[1], 1)
        row = torch.where(over.view(-1, 1, 1), scores.argmin(-1, keepdim=True), last)
        for x in (s.k, s.v, *(getattr(self, name) for name in self.state)):
            index = row.view(*row.shape, *[1] * (x.dim() - 3)).expand(*row.shape, *x.shape[3:])
            x.scatter_(2, index, x.gather(2, last.view(*last.shape, *[1] * (x.dim() - 3)).expand_as(index)))
        s.lens.sub_(over.long())
        return out

    def decode_scores(self, q, scale, held) -> torch.Tensor:
        raise NotImplementedError

    def read_weights(self, q, scale, held) -> torch.Tensor:
        """The weights [B, Hkv, G, capacity] the new query q [B, Hq, d] pays every entry ``held`` (0 elsewhere), in
        fp32, the cache converted a chunk at a time."""
        s = self.store
        rows = pool_gqa(q.unsqueeze(2).float(), s.k.shape[1])  # [B, Hkv, G, d]
        part = torch.cat([logits(rows, s.k[:, :, i: i + 4096].float(), scale=scale)
                          for i in range(0, s.capacity, 4096)], -1)
        return part.masked_fill(~held.unsqueeze(2), -INF).softmax(-1)


