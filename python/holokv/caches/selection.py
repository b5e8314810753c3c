"""Token-selection baselines: each keeps, per KV head, the ``ceil(valid / ratio)``
highest-scoring tokens and drops the rest. They differ in the score and in when
they evict: one-shot methods compress once, after the prompt (later tokens are
appended exact, as in their papers); the others evict after every read.

The prompt is attended exactly (SDPA); scores that need attention weights
compute them from the prompt's queries. Entries carry their sequence index
(``idx``), so a transformers mask over true positions still applies to them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from .base import FullLayer, apply_probs, attention_probs, budget, take, visible

INF = float("inf")


class SelectionLayer(FullLayer):
    """Keeps the top-scoring entries per KV head; subclasses define the scores."""

    one_shot = True
    state = ("keys", "values", "idx")

    def __init__(self, ratio: float = 1.0):
        super().__init__()
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        self.ratio = ratio

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.idx = torch.zeros(*key_states.shape[:2], 0, dtype=torch.long, device=self.device)

    def append(self, k, v):
        super().append(k, v)
        new = torch.arange(self.seen, self.seen + k.shape[2], device=self.device)
        self.idx = torch.cat([self.idx, new.expand(*k.shape[:2], -1)], 2)

    def read(self, q, mask, scale, start):
        if start == 0:  # the prompt: stored in order, so exact SDPA applies as is
            out = super().read(q, mask, scale, start)
            self.compress(lambda: self.prompt_scores(q, mask, scale))
            return out
        q_idx = torch.arange(start, self.seen, device=q.device)
        p = attention_probs(q, self.keys, visible(mask, q_idx, self.idx), scale)
        out = apply_probs(p, self.values, q.dtype)
        if not self.one_shot:
            self.compress(lambda: self.decode_scores(p))
        return out

    def compress(self, scores) -> None:
        """Keep the top ``budget`` entries per head by ``scores()`` [B, Hkv, n] (pads never win)."""
        keep = budget(self.valid(), self.ratio)
        if self.idx.shape[2] <= keep:
            return
        s = scores().masked_fill(self.idx < self.pads[:, None, None], -INF)
        chosen = s.topk(keep, -1).indices.sort(-1).values
        for name in self.state:
            setattr(self, name, take(getattr(self, name), chosen))

    def rel(self) -> torch.Tensor:
        """[B, Hkv, n] index of each entry counted from its sequence's first non-pad token."""
        return self.idx - self.pads[:, None, None]

    def prompt_scores(self, q, mask, scale) -> torch.Tensor:
        raise NotImplementedError

    def decode_scores(self, p) -> torch.Tensor:
        raise NotImplementedError


def prompt_attention_mass(layer: SelectionLayer, q, mask, scale, chunk: int = 256) -> torch.Tensor:
    """[B, Hkv, n]: attention each prompt token receives, summed over all prompt queries and the GQA group.
    Queries go in chunks so the weights never exceed [B, Hq, chunk, n]."""
    mass = 0
    for s in range(0, q.shape[2], chunk):
        q_idx = torch.arange(s, min(s + chunk, q.shape[2]), device=q.device)
        rows = None if mask is None else mask[:, :, s: s + chunk]
        mass = mass + attention_probs(q[:, :, s: s + chunk], layer.keys, visible(rows, q_idx, layer.idx),
                                      scale).sum((2, 3))
    return mass


class StreamingLayer(SelectionLayer):
    """StreamingLLM (Xiao et al. 2023): the first ``sinks`` tokens plus the most recent ones."""

    one_shot = False

    def __init__(self, ratio: float = 1.0, sinks: int = 4):
        super().__init__(ratio)
        self.sinks = sinks

    def position_scores(self):
        rel = self.rel()
        return torch.where(rel < self.sinks, INF, rel.float())

    def prompt_scores(self, q, mask, scale):
        return self.position_scores()

    def decode_scores(self, p):
        return self.position_scores()


class TopKLayer(SelectionLayer):
    """One-shot top-k by the attention mass the whole prompt gives each token."""

    def prompt_scores(self, q, mask, scale):
        return prompt_attention_mass(self, q, mask, scale)


class H2OLayer(SelectionLayer):
    """H2O (Zhang et al. 2023): heavy hitters by accumulated attention plus the recent half of the budget;
    evicts after every read, accumulating the weights each new query gives."""

    one_shot = False
    state = ("keys", "values", "idx", "acc")

    def __init__(self, ratio: float = 1.0, recent: float = 0.5):
        super().__init__(ratio)
        self.recent = recent  # share of the budget reserved for the most recent tokens

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.acc = torch.zeros(*key_states.shape[:2], 0, device=self.device)

    def append(self, k, v):
        super().append(k, v)
        self.acc = torch.cat([self.acc, self.acc.new_zeros(*k.shape[:2], k.shape[2])], 2)

    def scores(self):
        n_recent = int(budget(self.valid(), self.ratio) * self.recent)
        recent = self.rel() >= (self.valid() - n_recent)[:, None, None]
        return self.acc.masked_fill(recent, INF)

    def prompt_scores(self, q, mask, scale):
        self.acc = prompt_attention_mass(self, q, mask, scale)
        return self.scores()

    def decode_scores(self, p):
        self.acc = self.acc + p.sum((2, 3))
        return self.scores()


class SnapKVLayer(SelectionLayer):
    """SnapKV (Li et al. 2024): the last ``window`` prompt queries vote (attention summed over them and the
    GQA group, max-pooled over neighbouring tokens so clusters survive); the window itself is always kept."""

    def __init__(self, ratio: float = 1.0, window: int = 32, kernel: int = 7):
        super().__init__(ratio)
        self.window, self.kernel = window, kernel

    def prompt_scores(self, q, mask, scale):
        w = min(self.window, q.shape[2])
        q_idx = torch.arange(q.shape[2] - w, q.shape[2], device=q.device)
        rows = None if mask is None else mask[:, :, -w:]
        votes = attention_probs(q[:, :, -w:], self.keys, visible(rows, q_idx, self.idx), scale).sum((2, 3))
        B, H, n = votes.shape
        votes = F.max_pool1d(votes.view(B * H, 1, n), self.kernel, 1, self.kernel // 2).view(B, H, n)
        return votes.masked_fill(self.idx >= q_idx[0], INF)


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

    def query_model(self, q):
        """Mean [B, Hq, d] and covariance [B, Hq, d, d] of the pre-RoPE prompt queries past the sinks (pads
        excluded), both carried by RoPE averaged over each sequence's next ``future`` positions."""
        n = q.shape[2]
        pos = torch.arange(n, device=q.device) - self.pads[:, None]  # [B, n]; < 0 on pads
        q = q.float()
        cos, sin = self.rotary(q, pos.clamp_min(0))
        pre = turn(q, cos.unsqueeze(1), -sin.unsqueeze(1))  # RoPE at -pos undoes RoPE at pos
        w = (pos >= min(self.sinks, int((n - self.pads).min()) - 1)).float()  # sinks out, unless that is all
        w = (w / w.sum(-1, keepdim=True))[:, None, :, None]
        mu = (w * pre).sum(2)
        dev = pre - mu.unsqueeze(2)
        cov = (w * dev).mT @ dev
        ahead = (n - self.pads)[:, None] + torch.arange(self.future, device=q.device)  # [B, future]
        cos, sin = (x.mean(1) for x in self.rotary(q, ahead))  # [B, d]: the averaged rotation R̄
        mu = turn(mu, cos.unsqueeze(1), sin.unsqueeze(1))
        cos, sin = cos[:, None, None], sin[:, None, None]
        return mu, turn(turn(cov, cos, sin).mT, cos, sin)  # rows of ΣR̄ᵀ, transposed (Σ symmetric): R̄ΣR̄ᵀ

    def prompt_scores(self, q, mask, scale):
        mu, cov = self.query_model(q)
        B, Hkv, n, d = self.keys.shape
        G = q.shape[1] // Hkv
        k = self.keys.float()
        mu, cov = mu.view(B, Hkv, G, d), cov.view(B, Hkv, G, d, d)
        logit = scale * torch.einsum("bhgd,bhnd->bhgn", mu, k) + scale ** 2 / 2 * torch.einsum(
            "bhnd,bhgde,bhne->bhgn", k, cov, k)
        logit = logit.masked_fill((self.idx < self.pads[:, None, None]).unsqueeze(2), -INF)
        score = (logit.softmax(-1).mean(2) + self.epsilon) * self.values.float().norm(dim=-1)
        return score.masked_fill(self.rel() < self.sinks, INF)
