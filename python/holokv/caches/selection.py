"""Token-selection baselines: each keeps, per KV head, the ``ceil(valid / ratio)`` highest-scoring
tokens of each sequence and drops the rest. They differ in the score and in when they evict:
one-shot methods compress once, after the prompt (later tokens are appended exact, as in their
papers); the others evict after every read, one entry a step, in place (the last entry moves
into the evicted one's row).

The prompt is attended exactly (SDPA); scores that need attention weights compute them from the
prompt's queries. Budgets are per sequence, from its own length, so a left-padded sequence is
compressed as it would be alone. Decoding reads the kept entries through ``holo_decode``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from .base import FullLayer, attention_probs, take

INF = float("inf")


def budget(valid: int, ratio: float) -> int:
    """Entries a sequence of ``valid`` tokens may keep per head at compression ``ratio``."""
    return max(1, math.ceil(valid / ratio))


def visible(mask: torch.Tensor | None, q_idx: torch.Tensor, n: int) -> torch.Tensor:
    """[B|1, 1, q, n]: may each prompt query (index q_idx [q]) see each prompt token? ``mask``: transformers'
    boolean [B, 1, q, seen] mask, or None when plainly causal."""
    if mask is None:
        return (torch.arange(n, device=q_idx.device) <= q_idx[:, None])[None, None]
    return mask[..., :n]


class SelectionLayer(FullLayer):
    """Keeps the top-scoring entries per KV head; subclasses define the scores."""

    one_shot = True

    def __init__(self, ratio: float = 1.0):
        FullLayer.__init__(self)
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        self.ratio = ratio

    def compress_prompt(self, q, k, v, mask, scale, pads):
        """Per sequence its own budget of the highest prompt scores (pads never win), in position order."""
        n = k.shape[2]
        keep = [min(n - p, budget(n - p, self.ratio)) for p in self.pads]
        pos = torch.arange(n, device=k.device) - pads[:, None, None]  # [B, 1, n] index from the first real token
        s = self.prompt_scores(q, k, v, mask, scale, pos).masked_fill(pos < 0, -INF)
        # the best first; ties (SnapKV's max-pooled votes, protected tokens) go to the earlier token, by its index
        # from the first real one, so a padded sequence keeps what it keeps alone
        order = pos.expand_as(s).argsort(dim=-1, stable=True)
        chosen = order.gather(2, s.gather(2, order).argsort(dim=-1, descending=True, stable=True)[..., :max(keep)])
        lens = torch.tensor(keep, device=k.device)
        rank = torch.arange(max(keep), device=k.device)
        chosen = torch.where(rank < lens[:, None, None], chosen, n).sort(-1).values.clamp(max=n - 1)
        self.store.write(take(k, chosen), take(v, chosen), lens)
        self.prompt = n, max(keep)
        self.kept_prompt(chosen, pos)

    def kept_prompt(self, chosen: torch.Tensor, pos: torch.Tensor) -> None:
        """Per-entry state of the kept prompt tokens ``chosen`` [B, Hkv, m] (``pos``: index from the first real
        token of every prompt token)."""

    def bound(self, seen: int) -> int:
        n, kept = self.prompt  # one-shot: the kept prompt, then every decoded token
        return kept + seen - n

    def prompt_scores(self, q, k, v, mask, scale, pos) -> torch.Tensor:
        raise NotImplementedError


class EvictingLayer(SelectionLayer):
    """Evicts after every read. Per-entry state (``state``: ``rel``, the index from the first real token, and
    for H2O ``acc``, the accumulated score) is kept beside the store's entries, moved with them and counted
    in the bytes held."""

    one_shot = False
    state = ("rel",)

    def kept_prompt(self, chosen, pos):
        self.rel = self.grow(pos.expand(*chosen.shape[:2], -1).gather(2, chosen), self.store.capacity)
        if "acc" in self.state:
            self.acc = self.grow(self.prompt_mass(chosen), self.store.capacity)

    def nbytes(self) -> int:
        per_entry = sum(getattr(self, name).element_size() for name in self.state)
        return self.store.nbytes() + int(self.store.lens.sum()) * self.store.k.shape[1] * per_entry

    @staticmethod
    def grow(x: torch.Tensor, cap: int) -> torch.Tensor:
        return x if x.shape[2] >= cap else torch.cat([x, x.new_zeros(*x.shape[:2], cap - x.shape[2])], 2)

    def bound(self, seen: int) -> int:
        return budget(seen - min(self.pads), self.ratio) + 1  # one over the budget until the read evicts it

    def reserve(self, tokens: int, exact: bool = False) -> None:
        super().reserve(tokens, exact)
        for name in self.state:
            setattr(self, name, self.grow(getattr(self, name), self.store.capacity))

    def decode(self, q, k, v, scale):
        s = self.store
        self.n_valid.add_(1)
        at = s.lens.view(-1, 1, 1).expand(-1, k.shape[1], 1)  # the row the new token goes to
        self.rel.scatter_(2, at, (self.n_valid - 1).view(-1, 1, 1).expand_as(at))
        if "acc" in self.state:
            self.acc.scatter_(2, at, 0.0)
        s.append(k, v)
        out = s.decode(q, scale)
        held = torch.arange(s.capacity, device=q.device) < s.lens.view(-1, 1, 1)
        scores = self.decode_scores(q, scale, held).masked_fill(~held, INF)
        # over budget (by one at most): the lowest-scoring entry goes, the last entry takes its row
        over = s.lens > (self.n_valid.double() / self.ratio).ceil().long().clamp(min=1)
        last = (s.lens - 1).view(-1, 1, 1).expand(-1, k.shape[1], 1)
        row = torch.where(over.view(-1, 1, 1), scores.argmin(-1, keepdim=True), last)
        for x in (s.k, s.v, *(getattr(self, name) for name in self.state)):
            index = row.view(*row.shape, *[1] * (x.dim() - 3)).expand(*row.shape, *x.shape[3:])
            x.scatter_(2, index, x.gather(2, last.view(*last.shape, *[1] * (x.dim() - 3)).expand_as(index)))
        s.lens.sub_(over.long())
        return out

    def decode_scores(self, q, scale, held) -> torch.Tensor:
        raise NotImplementedError


def prompt_attention_mass(q, k, mask, scale, chunk: int = 256) -> torch.Tensor:
    """[B, Hkv, n]: attention each prompt token receives, summed over all prompt queries and the GQA group.
    Queries go in chunks so the weights never exceed [B, Hq, chunk, n]."""
    mass, n = 0, k.shape[2]
    for s in range(0, q.shape[2], chunk):
        q_idx = torch.arange(s, min(s + chunk, q.shape[2]), device=q.device)
        rows = None if mask is None else mask[:, :, s: s + chunk]
        mass = mass + attention_probs(q[:, :, s: s + chunk], k, visible(rows, q_idx, n), scale).sum((2, 3))
    return mass


class StreamingLayer(EvictingLayer):
    """StreamingLLM (Xiao et al. 2023): the first ``sinks`` tokens plus the most recent ones."""

    def __init__(self, ratio: float = 1.0, sinks: int = 4):
        super().__init__(ratio)
        self.sinks = sinks

    def prompt_scores(self, q, k, v, mask, scale, pos):
        return torch.where(pos < self.sinks, INF, pos.float()).expand(*k.shape[:3])

    def decode_scores(self, q, scale, held):
        return torch.where(self.rel < self.sinks, INF, self.rel.float())


class TopKLayer(SelectionLayer):
    """One-shot top-k by the attention mass the whole prompt gives each token."""

    def prompt_scores(self, q, k, v, mask, scale, pos):
        return prompt_attention_mass(q, k, mask, scale)


class H2OLayer(EvictingLayer):
    """H2O (Zhang et al. 2023): heavy hitters by accumulated attention plus the recent half of the budget;
    evicts after every read, accumulating the weights each new query gives."""

    state = ("rel", "acc")

    def __init__(self, ratio: float = 1.0, recent: float = 0.5):
        super().__init__(ratio)
        self.recent = recent  # share of the budget reserved for the most recent tokens

    def protect_recent(self, acc, rel, valid) -> torch.Tensor:
        n_recent = ((valid.double() / self.ratio).ceil().clamp(min=1) * self.recent).long()
        return acc.masked_fill(rel >= (valid - n_recent).view(-1, 1, 1), INF)

    def prompt_scores(self, q, k, v, mask, scale, pos):
        self.mass = prompt_attention_mass(q, k, mask, scale)
        return self.protect_recent(self.mass, pos, self.n_valid)

    def prompt_mass(self, chosen):
        """The accumulated mass (without the recent window's protection) the kept prompt tokens start with."""
        mass, self.mass = self.mass, None
        return mass.gather(2, chosen)

    def decode_scores(self, q, scale, held):
        s = self.store
        self.acc.add_(attention_probs(q.unsqueeze(2), s.k, held.unsqueeze(2), scale).sum((2, 3)))
        return self.protect_recent(self.acc, self.rel, self.n_valid)


class SnapKVLayer(SelectionLayer):
    """SnapKV (Li et al. 2024): the last ``window`` prompt queries vote (attention summed over them and the
    GQA group, max-pooled over neighbouring tokens so clusters survive); the window itself is always kept."""

    def __init__(self, ratio: float = 1.0, window: int = 32, kernel: int = 7):
        super().__init__(ratio)
        self.window, self.kernel = window, kernel

    def prompt_scores(self, q, k, v, mask, scale, pos):
        n = q.shape[2]
        w = min(self.window, n)
        q_idx = torch.arange(n - w, n, device=q.device)
        rows = None if mask is None else mask[:, :, -w:]
        votes = attention_probs(q[:, :, -w:], k, visible(rows, q_idx, n), scale).sum((2, 3))
        B, H, _ = votes.shape
        votes = F.max_pool1d(votes.view(B * H, 1, n), self.kernel, 1, self.kernel // 2).view(B, H, n)
        return votes.masked_fill(torch.arange(n, device=q.device) >= n - w, INF)


def turn(x, cos, sin):
    """RoPE's pairwise rotation of x's last dimension (rotate-half layout) by angles given as cos, sin."""
    return x * cos + rotate_half(x) * sin


class ExpectedAttentionLayer(SelectionLayer):
    """Expected Attention (Devoto et al. 2025; kvpress's ExpectedAttentionPress): the attention that future
    queries are expected to pay each token. The prompt's queries past the first ``sinks``, brought back before
    RoPE, model a query as Gaussian per head (mean μ, covariance Σ); RoPE averaged over the next ``future``
    positions, R̄, carries it to where future queries will be: μ' = R̄μ, Σ' = R̄ΣR̄ᵀ. Under that model a key's
    expected exp(logit) is exp(s·kᵀμ' + s²·kᵀΣ'k / 2) (s = scale): its softmax over the tokens, averaged over
    the GQA group, plus ``epsilon``, times ‖v‖ is the score. The first ``sinks`` tokens are kept. One-shot,
    like SnapKV. ``rotary``: the model's rotary embedding (transformers' module; make_cache builds it), whose
    (cos, sin) must carry no attention scaling for the de-rotation to be exact."""

    def __init__(self, ratio: float = 1.0, rotary=None, sinks: int = 4, future: int = 512, epsilon: float = 0.0):
        super().__init__(ratio)
        if rotary is None:
            raise ValueError("expected attention needs the model's rotary embedding (make_cache passes it)")
        self.rotary, self.sinks, self.future, self.epsilon = rotary, sinks, future, epsilon

    def query_model(self, q, pos):
        """Mean [B, Hq, d] and covariance [B, Hq, d, d] of the pre-RoPE prompt queries past the sinks (pads
        excluded), both carried by RoPE averaged over each sequence's next ``future`` positions."""
        pos = pos[:, 0]  # [B, n]; < 0 on pads
        q = q.float()
        cos, sin = self.rotary(q, pos.clamp_min(0))
        pre = turn(q, cos.unsqueeze(1), -sin.unsqueeze(1))  # RoPE at -pos undoes RoPE at pos
        valid = pos.max(-1).values + 1  # [B]
        w = (pos >= (valid.clamp(max=self.sinks + 1) - 1)[:, None]).float()  # sinks out, unless that is all
        w = (w / w.sum(-1, keepdim=True))[:, None, :, None]
        mu = (w * pre).sum(2)
        dev = pre - mu.unsqueeze(2)
        cov = (w * dev).mT @ dev
        ahead = valid[:, None] + torch.arange(self.future, device=q.device)  # [B, future]
        cos, sin = (x.mean(1) for x in self.rotary(q, ahead))  # [B, d]: the averaged rotation R̄
        mu = turn(mu, cos.unsqueeze(1), sin.unsqueeze(1))
        cos, sin = cos[:, None, None], sin[:, None, None]
        return mu, turn(turn(cov, cos, sin).mT, cos, sin)  # rows of ΣR̄ᵀ, transposed (Σ symmetric): R̄ΣR̄ᵀ

    def prompt_scores(self, q, k, v, mask, scale, pos):
        mu, cov = self.query_model(q, pos)
        B, Hkv, n, d = k.shape
        G = q.shape[1] // Hkv
        kf = k.float()
        mu, cov = mu.view(B, Hkv, G, d), cov.view(B, Hkv, G, d, d)
        logit = scale * torch.einsum("bhgd,bhnd->bhgn", mu, kf) + scale ** 2 / 2 * torch.einsum(
            "bhnd,bhgde,bhne->bhgn", kf, cov, kf)
        logit = logit.masked_fill((pos < 0).unsqueeze(2), -INF)
        score = (logit.softmax(-1).mean(2) + self.epsilon) * v.float().norm(dim=-1)
        return score.masked_fill(pos < self.sinks, INF)
