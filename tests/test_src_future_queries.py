"""SRC's queries and scores standing for the future (caches/future_queries.py), tiny random Llama, CPU: draws from
Expected Attention's query model, Expected Attention's and KVzip's scores, the reconstruction pass's queries; each
option changes the summaries but not the bytes; a held prompt compacts as it would alone, and never decodes unscored."""
import pytest
import torch
from test_caches import assert_batched_as_alone, tiny_config
from test_tova_kvzip import Words
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from holokv.caches import make_cache, use_holokv_attention
from holokv.caches.base import FullLayer
from holokv.caches.expected import ExpectedAttentionLayer, prompt_gaussian
from holokv.caches.future_queries import gaussian
from holokv.caches.kvzip import FIRST, KVzipLayer
from holokv.caches.src import SRCLayer

ROTARY = LlamaRotaryEmbedding(tiny_config())
# each way of standing for the future, as SRC options (the "recon" ones need the reconstruction pass's words)
OPTIONS = [dict(score="expected"), dict(score="recon", tokenizer=Words()),
           dict(future_queries=16, future_source="gaussian"),
           dict(future_queries=16, future_source="recon", tokenizer=Words()), dict(shrink_to="mean")]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return use_holokv_attention(LlamaForCausalLM(tiny_config()).eval())


def prompt(n, seed=1):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def rope(x, pos):
    return apply_rotary_pos_emb(x, x, *ROTARY(x, pos))[0]


def test_gaussian_draws_are_the_query_model_ahead():
    """Prompt queries that are one pre-RoPE query give that query at every future position drawn; others give draws
    whose mean and covariance (brought back before RoPE) are the prompt's, past the sinks."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1, 4, 1, 32, generator=g)
    q = rope(base.expand(1, 4, 30, 32), torch.arange(30)[None])
    at = 30 + torch.linspace(0, 63, 6).round().long()
    torch.testing.assert_close(gaussian(q, 6, 2, 64, ROTARY), rope(base.expand(1, 4, 6, 32), at[None]), atol=1e-5,
                               rtol=1e-5)

    pre = torch.randn(1, 4, 300, 32, generator=g) * torch.linspace(0.2, 2, 32) + 1
    q = rope(pre, torch.arange(300)[None])
    draws = gaussian(q, 20000, 4, 1, ROTARY)  # future=1: every draw at position 300
    back = rope(draws, torch.full((1, 1), -300))
    mu, cov, _ = prompt_gaussian(q, torch.arange(300).view(1, 1, 300), ROTARY, 4)
    torch.testing.assert_close(back.mean(2), mu, atol=0.05, rtol=0)
    dev = back - back.mean(2, keepdim=True)
    torch.testing.assert_close(dev.mT @ dev / 20000, cov, atol=0.1, rtol=0.05)


def test_expected_score_is_expected_attentions():
    """score="expected" ranks the prompt's tokens by Expected Attention's scores over the same queries."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 40, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g), torch.randn(1, 2, 40, 32,
                                                                                                    generator=g)
    src = SRCLayer(ratio=4, score="expected", sinks=0, future=16, rotary=ROTARY)
    ea = ExpectedAttentionLayer(ratio=4, rotary=ROTARY, sinks=0, future=16)
    torch.testing.assert_close(src.prompt_score(0, q, k, v, 0.2),
                               ea.prompt_scores(q, k, v, None, 0.2, torch.arange(40).view(1, 1, 40)))


def test_recon_gives_kvzips_scores_and_its_queries(model, monkeypatch):
    """score="recon" ranks by KVzip's scores, and future_source="recon" fits for queries of the reconstruction pass:
    rows of the queries a plain forward over the prompt, the request to repeat it and the prompt again asks there."""
    ids, words = prompt(40), Words()
    asked, scores, stand_ins = [], {}, []
    record = lambda name, f: lambda *a: scores.setdefault(name, []).append(f(*a)) or scores[name][-1]
    monkeypatch.setattr(KVzipLayer, "prompt_scores", record("kvzip", KVzipLayer.prompt_scores))
    monkeypatch.setattr(SRCLayer, "prompt_score", record("src", SRCLayer.prompt_score))
    ask = SRCLayer.stand_ins
    monkeypatch.setattr(SRCLayer, "stand_ins", lambda *a: stand_ins.append(ask(*a)) or stand_ins[-1])
    with torch.no_grad():
        model(ids, past_key_values=make_cache("kvzip", model.config, ratio=4, sinks=0, tokenizer=words))
        model(ids, past_key_values=make_cache("src", model.config, ratio=4, score="recon", future_queries=8,
                                              future_source="recon", tokenizer=words, every=None))
        request = torch.tensor(words.encode(FIRST) + words.encode("\n"))
        prefill = FullLayer.prefill
        monkeypatch.setattr(FullLayer, "prefill", lambda self, q, *a: asked.append(q) or prefill(self, q, *a))
        model(torch.cat([ids[0], request, ids[0]])[None], past_key_values=make_cache("full", model.config))
    for kvzip, src in zip(scores["kvzip"], scores["src"]):
        torch.testing.assert_close(src, kvzip)
    for got, q in zip(stand_ins, asked):
        assert got.shape == (1, 4, 8, 32)
        gap = (got[0].unsqueeze(2) - q[0, :, 40:].unsqueeze(1)).abs().amax(-1)  # [Hq, 8, recon rows]
        assert (gap.amin(-1) < 1e-4).all() and (gap < 1e-4).int().argmax(-1).diff(dim=-1).gt(0).all()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(k for k in o if k != "tokenizer"))
def test_options_change_the_summaries_not_the_bytes(model, options):
    """Each option changes what the compacted prompt holds (not a no-op), never how many bytes it holds."""
    held = []
    for extra in ({}, options):
        cache = make_cache("src", model.config, ratio=4, **extra)
        with torch.no_grad():
            model(prompt(200, seed=4), past_key_values=cache)
        layer = cache.layers[1]
        held.append((cache.nbytes(), torch.cat([layer.held_k, layer.held_v], -1)))
    assert held[0][0] == held[1][0] and not torch.equal(held[0][1], held[1][1])


def test_recon_padded_batch_matches_alone(model):
    """A left-padded sequence, held for the pass, compacted after it and compressed while decoding, reads what it
    does alone."""
    ids = torch.cat([prompt(60, seed=5), prompt(60, seed=6)])
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    new = lambda: make_cache("src", model.config, ratio=3, score="recon", future_queries=8, future_source="recon",
                             tokenizer=Words(), chunk=16, every=4, recent=8, window=4, decode_bin=16, rank=2)
    assert_batched_as_alone(model, new, ids, mask, 9, 12)


def test_recon_without_its_pass_says_so(model):
    """Prefilled through the inner model (no hook), the prompt waits for its pass: decoding says so."""
    cache = make_cache("src", model.config, ratio=2, score="recon", every=None)
    with torch.no_grad():
        model.model(prompt(20), past_key_values=cache)
        with pytest.raises(RuntimeError, match="not scored"):
            model(prompt(1), past_key_values=cache)
