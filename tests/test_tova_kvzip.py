"""TOVA and KVzip on tiny problems, CPU: TOVA's evictions against a hand computation, KVzip's scores against the
attention weights of one plain forward over the prompt and its reconstruction request, budgets and bytes, batch
invariance, the runtime's decode loop, and the error when the reconstruction pass never ran."""
import math

import pytest
import torch
from test_caches import assert_batched_as_alone

from holokv.caches import make_cache, use_holokv_attention
from holokv.caches.kvzip import FIRST, LATER, OVERLAP, KVzipLayer
from holokv.caches.tova import TOVALayer
from holokv.runtime import generate
from conftest import tiny_llama


class Words:
    """A tokenizer as KVzip's request needs it: one id per character, no chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 128 for c in text]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def prompt(n, seed=1):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def group_mean_weights(q, k, scale):
    """Softmax weights of queries q [Hq, d] over keys k [Hkv, n, d], averaged over every query head -> [n]."""
    g = q.shape[0] // k.shape[0]
    return torch.softmax(torch.einsum("hd,hnd->hn", q, k.repeat_interleave(g, 0)) * scale, -1).mean(0)


def test_tova_evicts_the_least_weighted_token():
    """The prompt keeps the tokens its last query weighs most (averaged over all heads); then every decode step
    reads everything held plus its own token, and the entry it weighs least leaves every KV head."""
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, n, d, scale = 4, 2, 12, 16, 0.25
    layer = TOVALayer(ratio=3)
    k, v, q = (torch.randn(1, h, n, d, generator=g) for h in (Hkv, Hkv, Hq))
    layer.update(k, v)
    layer.attend(q, None, scale)
    held = group_mean_weights(q[0, :, -1], k[0], scale).topk(4).indices.sort().values.tolist()
    keys, values = [k[0, :, i] for i in held], [v[0, :, i] for i in held]
    for step in range(5):
        k1, v1, q1 = (torch.randn(1, h, 1, d, generator=g) for h in (Hkv, Hkv, Hq))
        layer.update(k1, v1)
        out = layer.attend(q1, None, scale)
        keys, values = keys + [k1[0, :, 0]], values + [v1[0, :, 0]]
        K, V = torch.stack(keys, 1), torch.stack(values, 1)  # [Hkv, held, d]
        p = torch.softmax(torch.einsum("hd,hnd->hn", q1[0, :, 0], K.repeat_interleave(2, 0)) * scale, -1)
        torch.testing.assert_close(out[0, 0], torch.einsum("hn,hnd->hd", p, V.repeat_interleave(2, 0)))
        budget = math.ceil((n + step + 1) / 3)
        if len(keys) > budget:
            gone = int(group_mean_weights(q1[0, :, 0], K, scale).argmin())
            del keys[gone], values[gone]
        s = layer.store
        assert s.lens.tolist() == [len(keys)] == [budget]
        stored = s.k[0, :, :len(keys)]  # rows move on eviction: compare as sets of keys
        assert (stored.unsqueeze(2) == torch.stack(keys, 1).unsqueeze(1)).all(-1).any(-1).all()


@pytest.mark.parametrize("method", ["tova", "kvzip"])
@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_bytes_are_the_budget(model, method, ratio):
    """Both hold exactly ceil(n / ratio) entries per KV head (KVzip: on average over the model's heads, which it
    pools), and nothing else: no per-entry metadata."""
    cache = make_cache(method, model.config, ratio=ratio)
    with torch.no_grad():
        model(prompt(100), past_key_values=cache)
    keep = math.ceil(100 / ratio)
    lens = torch.cat([layer.store.lens.view(1, -1) for layer in cache.layers], 1)
    if method == "tova":
        assert lens.tolist() == [[keep, keep]]  # each layer's, for the sequence
    else:
        assert lens.sum() == keep * 2 * 2  # layers x KV heads, each its own share
    assert cache.nbytes() == 2 * 2 * keep * 2 * 32 * 4  # layers x KV heads x entries x (K, V) x head_dim x fp32


def reconstruction_scores(model, ids, requests):
    """Per layer [Hkv, n]: the largest weight a query of each request (a forward over the prompt ``ids`` [1, n]
    and the request, from scratch, with eager attention) pays each prompt token, over the heads of its group."""
    n, out = ids.shape[1], None
    model.set_attn_implementation("eager")
    try:
        for request in requests:
            with torch.no_grad():
                att = model(torch.cat([ids, request[None]], 1), output_attentions=True).attentions
            best = [a[0, :, n:, :n].reshape(2, 2, -1, n).amax((1, 2)) for a in att]
            out = best if out is None else [torch.maximum(x, y) for x, y in zip(out, best)]
    finally:
        use_holokv_attention(model)
    return out


@pytest.mark.parametrize("chunk", [2048, 16])
def test_kvzip_scores_are_the_reconstruction_attention(model, monkeypatch, chunk):
    """KVzip scores each prompt token by the largest attention the reconstruction queries pay it (chunked: a
    request per chunk, the later ones quoting the previous chunk's end) and keeps the best ones per KV head."""
    recorded = []
    scores = KVzipLayer.prompt_scores
    monkeypatch.setattr(KVzipLayer, "prompt_scores", lambda *a: recorded.append(scores(*a)) or recorded[-1])
    ids, words, n = prompt(40), Words(), 40
    cache = make_cache("kvzip", model.config, ratio=4, sinks=0, chunk=chunk, tokenizer=words, adaptive=None,
                       across="layer")
    full = make_cache("full", model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=full)
    close, t = words.encode("\n"), ids[0]
    requests = [torch.tensor(words.encode(FIRST if a == 0 else LATER) + (t[a - OVERLAP: a].tolist() if a else [])
                             + close) for a in range(0, n, chunk)]
    requests = [torch.cat([r, t[a: a + chunk]]) for r, a in zip(requests, range(0, n, chunk))]
    expected = reconstruction_scores(model, ids, requests)
    for layer, got, want, exact in zip(cache.layers, recorded, expected, full.layers):
        torch.testing.assert_close(got[0], want, atol=1e-6, rtol=1e-5)
        kept = want.topk(10).indices.sort().values[..., None].expand(-1, -1, 32)  # [Hkv, 10, head_dim]
        assert layer.store.lens.tolist() == [10]
        torch.testing.assert_close(layer.store.k[0, :, :10], exact.store.k[0].gather(1, kept))


def test_kvzip_padded_batch_matches_alone(model):
    """A left-padded sequence, reconstructed in chunks next to a longer one, keeps and reads what it does alone."""
    ids = torch.cat([prompt(52, seed=3), prompt(52, seed=4)])
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    assert_batched_as_alone(
        model, lambda: make_cache("kvzip", model.config, ratio=3, chunk=16, tokenizer=Words(), adaptive=0.5), ids,
        mask, 13, 6)


@pytest.mark.parametrize("method", ["tova", "kvzip"])
def test_runtime_decodes_as_generate(model, method):
    """holokv.runtime's decode loop (its prefill is a plain forward, so KVzip's hook runs) gives generate's tokens."""
    ids = torch.cat([prompt(30, seed=5), prompt(30, seed=6)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              past_key_values=make_cache(method, model.config, ratio=2))
    got = generate(model, make_cache(method, model.config, ratio=2), ids, mask, max_new_tokens=8, graph=False)
    assert torch.equal(got, want)


def test_kvzip_without_its_pass_says_so(model):
    """Prefilled through the inner model (no hook), KVzip's prompt is unscored: decoding names the missing pass."""
    cache = make_cache("kvzip", model.config, ratio=2)
    with torch.no_grad():
        model.model(prompt(20), past_key_values=cache)
        with pytest.raises(RuntimeError, match="not scored"):
            model(prompt(1), past_key_values=cache)


def test_kvzip_pools_budgets_across_the_model(model, monkeypatch):
    """across="model": every head of every layer ranked together, each keeping what it wins of the model's total
    (the uniform split's), by the same scores; across="layer" pools a layer's heads only."""
    recorded = []
    scores = KVzipLayer.prompt_scores
    monkeypatch.setattr(KVzipLayer, "prompt_scores", lambda *a: recorded.append(scores(*a)) or recorded[-1])
    ids, n, keep = prompt(40), 40, 10
    lens = {}
    for across in ("layer", "model"):
        cache = make_cache("kvzip", model.config, ratio=4, sinks=0, tokenizer=Words(), adaptive=0.0, across=across)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        lens[across] = torch.cat([layer.store.lens for layer in cache.layers], 1)[0]  # [L·Hkv]
    every = torch.cat(recorded[-2:], 1)[0]  # the model run's scores [L·Hkv, n]
    best = every.flatten().topk(every.shape[0] * keep).indices // n
    assert lens["model"].tolist() == torch.bincount(best, minlength=every.shape[0]).tolist()
    assert lens["model"].sum() == lens["layer"].sum() == every.shape[0] * keep
    assert lens["model"].tolist() != lens["layer"].tolist()
    assert (lens["layer"].view(2, -1).sum(1) == 2 * keep).all()  # pooled within each layer only


def test_kvzip_model_pooling_padded_batch_matches_alone(model):
    ids = torch.cat([prompt(52, seed=3), prompt(52, seed=4)])
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    assert_batched_as_alone(
        model, lambda: make_cache("kvzip", model.config, ratio=3, chunk=16, tokenizer=Words(), adaptive=0.2,
                                  across="model"), ids, mask, 13, 6)
