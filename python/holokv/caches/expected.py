"""Expected Attention's cache: the tokens future queries are expected to attend."""
from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from .select import INF, SelectionLayer


def turn(x, cos, sin):
    """RoPE's pairwise rotation of x's last dimension (rotate-half layout) by angles given as cos, sin."""
    return x * cos + rotate_half(x) * sin


def prompt_gaussian(q, pos, rotary, sinks: int):
    """Mean [B, Hq, d] and covariance [B, Hq, d, d] (fp32) of the prompt queries q [B, Hq, n, d] brought back before
    RoPE, past the first ``sinks`` (unless that is all) and pads (``pos`` [B, 1, n], < 0 on pads), and each
    sequence's length [B]. ``rotary``: the model's rotary embedding, whose (cos, sin) must carry no attention
    scaling for the de-rotation to be exact."""
    pos = pos[:, 0]  # [B, n]
    q = q.float()
    cos, sin = rotary(q, pos.clamp_min(0))
    pre = turn(q, cos.unsqueeze(1), -sin.unsqueeze(1))  # RoPE at -pos undoes RoPE at pos
    valid = pos.max(-1).values + 1  # [B]
    w = (pos >= (valid.clamp(max=sinks + 1) - 1)[:, None]).float()  # sinks out, unless that is all
    w = (w / w.sum(-1, keepdim=True))[:, None, :, None]
    mu = (w * pre).sum(2)
    dev = pre - mu.unsqueeze(2)
    return mu, (w * dev).mT @ dev, valid


def carried(mu, cov, valid, rotary, future: int):
    """μ' = R̄μ, Σ' = R̄ΣR̄ᵀ: the pre-RoPE model (:func:`prompt_gaussian`) carried by RoPE averaged over each
    sequence's next ``future`` positions, R̄."""
    ahead = valid[:, None] + torch.arange(future, device=mu.device)  # [B, future]
    cos, sin = (x.mean(1) for x in rotary(mu, ahead))  # [B, d]: the averaged rotation R̄
    mu = turn(mu, cos.unsqueeze(1), sin.unsqueeze(1))
    cos, sin = cos[:, None, None], sin[:, None, None]
    return mu, turn(turn(cov, cos, sin).mT, cos, sin)  # rows of ΣR̄ᵀ, transposed (Σ symmetric): R̄ΣR̄ᵀ


def expected_scores(mu, cov, k, v, scale, epsilon: float = 0.0, hidden=None) -> torch.Tensor:
    """[B, Hkv, n] fp32: under the query model (mean mu [B, Hq, d], covariance cov [B, Hq, d, d]) a key's expected
    exp(logit) is exp(s·kᵀμ + s²·kᵀΣk / 2) (s = scale); its softmax over the tokens (``hidden`` [B, 1, n]: True
    where none), averaged over the GQA group, plus ``epsilon``, times ‖v‖."""
    B, Hkv, n, d = k.shape
    G = mu.shape[1] // Hkv
    kf = k.float()
    mu, cov = mu.view(B, Hkv, G, d), cov.view(B, Hkv, G, d, d)
    logit = scale * torch.einsum("bhgd,bhnd->bhgn", mu, kf) + scale ** 2 / 2 * torch.einsum(
        "bhnd,bhgde,bhne->bhgn", kf, cov, kf)
    if hidden is not None:
        logit = logit.masked_fill(hidden.unsqueeze(2), -INF)
    return (logit.softmax(-1).mean(2) + epsilon) * v.float().norm(dim=-1)


class ExpectedAttentionLayer(SelectionLayer):
    """Expected Attention (Devoto et al. 2025; kvpress's ExpectedAttentionPress): the attention that future
    queries are expected to pay each token. The prompt's queries past the first ``sinks``, brought back before
    RoPE, model a query as Gaussian per head (mean μ, covariance Σ); RoPE averaged over the next ``future``
    positions, R̄, carries it to where future queries will be: μ' = R̄μ, Σ' = R̄ΣR̄ᵀ. Under that model a key's
    expected exp(logit) is exp(s·kᵀμ' + s²·kᵀΣ'k / 2) (s = scale): its softmax over the tokens, averaged over
    the GQA group, plus ``epsilon``, times ‖v‖ is the score. The first ``sinks`` tokens are kept. One-shot,
    like SnapKV. ``rotary``: the model's rotary embedding (transformers' module; make_cache builds it), whose
    (cos, sin) must carry no attention scaling for the de-rotation to be exact."""

    def __init__(self, ratio: float = 1.0, rotary=None, sinks: int = 4, future: int = 512, epsilon: float = 0.0,
                 adaptive: float | None = None):
        super().__init__(ratio, adaptive)
        if rotary is None:
            raise ValueError("expected attention needs the model's rotary embedding (make_cache passes it)")
        self.rotary, self.sinks, self.future, self.epsilon = rotary, sinks, future, epsilon

    def query_model(self, q, pos):
        """Mean [B, Hq, d] and covariance [B, Hq, d, d] of the pre-RoPE prompt queries past the sinks (pads
        excluded), both carried by RoPE averaged over each sequence's next ``future`` positions."""
        return carried(*prompt_gaussian(q, pos, self.rotary, self.sinks), self.rotary, self.future)

    def prompt_scores(self, q, k, v, mask, scale, pos):
        score = expected_scores(*self.query_model(q, pos), k, v, scale, self.epsilon, pos < 0)
        return score.masked_fill(pos < self.sinks, INF)
