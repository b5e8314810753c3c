"""Head-adaptive budgets (AdaKV) for SRC: each KV head compacted to its share of the sequence's budget, lengths
per KV head in the store, the layer's bytes unchanged; a share of 1 is the uniform split exactly; pooled over the
whole model (KVzip's), the model's bytes unchanged."""
import copy

import pytest
import torch

from holokv.caches import make_cache
from holokv.caches.hf_attention import CACHE_KWARG
from holokv.runtime import generate
from conftest import needs_cuda, tiny_llama

SRC = dict(every=None, window=8)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :30] = 0  # left padding
    return ids, mask


def scored(model, ids, mask, **options):
    cache = make_cache("src", model.config, ratio=4, **SRC, **options)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **{CACHE_KWARG: cache})
    return out, cache


def test_heads_get_their_shares_at_the_same_bytes(model, batch):
    _, uniform = scored(model, *batch)
    _, adaptive = scored(model, *batch, adaptive=0.2)
    lens = adaptive.layers[0].store.lens
    assert lens.shape == (2, 2) and (lens[:, 0] != lens[:, 1]).any()
    assert adaptive.nbytes() == pytest.approx(uniform.nbytes(), rel=0.02)


def test_share_one_is_the_uniform_split(model, batch):
    """Every head's floor is the whole budget: head by head, each compacts what the uniform split compacts."""
    a, _ = scored(model, *batch)
    b, cache = scored(model, *batch, adaptive=1.0)
    assert cache.layers[0].store.lens.dim() == 2
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_padded_sequence_reads_what_it_reads_alone(model, batch):
    ids, mask = batch
    both, _ = scored(model, ids, mask, adaptive=0.2)
    alone, _ = scored(model, ids[:1, 30:], mask[:1, 30:], adaptive=0.2)
    for s, s0 in zip(both.scores, alone.scores):
        torch.testing.assert_close(s[:1], s0, atol=1e-4, rtol=1e-4)


def test_graphless_runtime_decodes_what_generate_does(model, batch):
    out, _ = scored(model, *batch, adaptive=0.2)
    cache = make_cache("src", model.config, ratio=4, adaptive=0.2, **SRC)
    assert torch.equal(generate(model, cache, *batch, max_new_tokens=8, graph=False), out.sequences)


def test_model_wide_budgets_move_bytes_between_layers(model, batch):
    """across="model": every head of every layer ranked together by KVzip's scores, so layers hold different
    bytes while the model holds what the per-layer split holds."""
    caches = {across: scored(model, *batch, score="recon", adaptive=0.0, across=across)[1]
              for across in ("layer", "model")}
    per_layer = {a: [layer.nbytes() for layer in c.layers] for a, c in caches.items()}
    assert per_layer["layer"][0] == pytest.approx(per_layer["layer"][1], rel=0.02)
    assert per_layer["model"][0] != per_layer["model"][1]
    assert sum(per_layer["model"]) == pytest.approx(sum(per_layer["layer"]), rel=0.03)


def test_model_wide_padded_sequence_reads_what_it_reads_alone(model, batch):
    ids, mask = batch
    both, _ = scored(model, ids, mask, score="recon", adaptive=0.2, across="model")
    alone, _ = scored(model, ids[:1, 30:], mask[:1, 30:], score="recon", adaptive=0.2, across="model")
    for s, s0 in zip(both.scores, alone.scores):
        torch.testing.assert_close(s[:1], s0, atol=1e-4, rtol=1e-4)


def test_model_wide_needs_recon_scores_and_adaptive(model):
    for options in (dict(adaptive=0.2), dict(score="recon")):
        with pytest.raises(ValueError, match="across='model'"):
            make_cache("src", model.config, ratio=4, across="model", **SRC, **options)


def test_needs_every_none(model):
    with pytest.raises(ValueError, match="adaptive.*every=None"):
        make_cache("src", model.config, ratio=4, adaptive=0.2, every="auto")
    with pytest.raises(ValueError, match="adaptive"):
        make_cache("src", model.config, ratio=4, every=None, adaptive=1.5)


@needs_cuda
def test_cuda_matches_cpu(batch):
    """Per-head lengths read by the CUDA holo_decode (head_dim 64: a size it supports), runtime replays included."""
    model = tiny_llama(head_dim=64)
    runs = []
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(dev)
        cache = make_cache("src", m.config, ratio=4, adaptive=0.2, **SRC)
        runs.append(generate(m, cache, *(x.to(dev) for x in batch), max_new_tokens=16, graph=dev == "cuda").cpu())
    # fp32 on both, two eigensolvers: the tokens agree
    assert torch.equal(runs[0], runs[1])


def centroids(layer) -> torch.Tensor:
    """[B, Hkv] centroid entries of a layer (the entries with a log-mass)."""
    store = layer.store
    held = torch.arange(store.bias.shape[2]) < store.lens.unsqueeze(-1)
    return ((store.bias != 0) & held).sum(-1)


def test_bins_per_head_budget(model, batch):
    """bin_size="head": the default's bins at each head's own ratio. Under the uniform split that is the default;
    with model-wide shares a head below the sequence's per-head budget gets no more centroids (larger bins), one
    above it no fewer, and some head a different count."""
    a, _ = scored(model, *batch, adaptive=1.0, rank=1)
    b, _ = scored(model, *batch, adaptive=1.0, rank=1, bin_size="head")
    assert torch.equal(a.sequences, b.sequences)
    pooled = dict(score="recon", adaptive=0.0, across="model", rank=1)  # shares far apart
    _, default = scored(model, *batch, **pooled)
    _, head = scored(model, *batch, **pooled, bin_size="head")
    budget = (batch[1].sum(-1, keepdim=True) / 4).ceil()  # [B, 1] token-equivalents per head, evenly split
    changed = False
    for x, y in zip(default.layers, head.layers):
        assert torch.equal(x.store.lens, y.store.lens)  # the same bytes per head
        below, above = x.store.lens < budget, x.store.lens > budget
        assert (centroids(y)[below] <= centroids(x)[below]).all() and (centroids(y)[above] >= centroids(x)[above]).all()
        changed |= bool((centroids(y) != centroids(x)).any())
    assert changed
