"""Caches on a tiny random Llama (GQA), CPU: exactness at ratio 1, generate, bytes, positions,
padding, HoloKV's superposed prefill against its own decode steps, SRC's decode-time compression, bad inputs."""
import copy
import math

import pytest
import torch
from transformers import DynamicCache, GPT2Config, LlamaConfig, LlamaForCausalLM, MistralConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from holokv.caches import METHODS, make_cache, superposed_attention, use_holokv_attention
from holokv.caches.expected import ExpectedAttentionLayer
from holokv.caches.future_queries import replayed
from holokv.caches.src import COMPACT, SRCLayer
from holokv.caches.superposed import HoloSpec
from holokv.compaction.graph import GRAPHLESS
from holokv.runtime import Decoder, generate
from conftest import needs_cuda

COMPRESSED = [m for m in METHODS if m != "full"]
SELECTION = ["streaming", "topk", "h2o", "snapkv", "expected"]  # keep a subset of the tokens, each with its sequence index
# SRC with decode-time compression steps small enough to fire within a few dozen generated tokens
DECODE = dict(ratio=4, decode_bin=32, rank=2, sinks=2, recent=8, window=4, every=8)


def tiny_config(head_dim=32, **kw):
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024,
                       **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return use_holokv_attention(LlamaForCausalLM(tiny_config()).eval())


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    return ids, mask


@pytest.fixture(scope="module")
def reference(model, batch):
    """Greedy generation through transformers' own DynamicCache and SDPA."""
    ids, mask = batch
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=
                                  DynamicCache(), output_scores=True, return_dict_in_generate=True)
    finally:
        use_holokv_attention(model)


@pytest.mark.parametrize("method, options", [(m, {}) for m in METHODS] +
                         [("src", dict(every=1, recent=2, window=2))])  # a decode step after every token
def test_ratio_one_is_exact(model, batch, reference, method, options):
    ids, mask = batch
    cache = make_cache(method, model.config, ratio=1, **options)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache,
                             output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference.sequences)
    for s, r in zip(out.scores, reference.scores):
        torch.testing.assert_close(s, r, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1] + 5


@pytest.mark.parametrize("method", COMPRESSED)
def test_generate_compressed(model, batch, method):
    ids, mask = batch
    cache = make_cache(method, model.config, ratio=4)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert out.shape == (2, ids.shape[1] + 8)
    assert cache.get_seq_length() == ids.shape[1] + 7  # the last token is never fed back


@pytest.mark.parametrize("method", COMPRESSED)
@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_bytes_shrink(model, method, ratio):
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(2))
    held = {}
    # SRC also holds (and counts) its scoring queries; a 4-query window keeps them a small share here
    for m, r, options in (("full", 1, {}), (method, ratio, dict(window=4) if method == "src" else {})):
        cache = make_cache(m, model.config, ratio=r, **options)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        held[m] = cache.bytes_per_token()
    achieved = held["full"] / held[method]
    # index/score metadata and HoloKV's open slot cost a little on top of the budget
    assert 0.85 * ratio <= achieved <= 1.2 * ratio, achieved


def test_src_counts_its_scoring_queries(model):
    """The last ``window`` queries that decode-time steps score with are part of SRC's bytes."""
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(2))
    held = {}
    for window in (4, 32):
        cache = make_cache("src", model.config, ratio=4, window=window, every="auto")
        with torch.no_grad():
            model(ids, past_key_values=cache)
        held[window] = cache.nbytes()
    assert held[32] - held[4] == 28 * 4 * 32 * 4 * 2  # queries x query heads x head_dim x fp32 bytes x layers


@pytest.mark.parametrize("method", COMPRESSED)
def test_true_positions(model, method):
    """Compressed caches report the true length, kept entries are the full cache's (RoPE'd) keys, and the
    next token's implicit positions (from get_seq_length) are the true ones."""
    ids = torch.randint(0, 128, (1, 65), generator=torch.Generator().manual_seed(3))
    full, comp, twin = (make_cache(m, model.config, ratio=r) for m, r in (("full", 1), (method, 4), (method, 4)))
    with torch.no_grad():
        for cache in (full, comp, twin):
            model(ids[:, :64], past_key_values=cache)
        assert comp.get_seq_length() == 64
        layer = comp.layers[0]
        if method in SELECTION:
            assert layer.store.lens.tolist() == [16]
            kept, every = layer.store.k[:, :, :16], full.layers[0].store.k[:, :, :64]
            assert (kept.unsqueeze(3) == every.unsqueeze(2)).all(-1).any(-1).all()  # each kept key is a token's
        implicit = model(ids[:, 64:], past_key_values=comp).logits
        explicit = model(ids[:, 64:], position_ids=torch.tensor([[64]]), past_key_values=twin).logits
    torch.testing.assert_close(implicit, explicit)


@pytest.mark.parametrize("method", SELECTION + ["holokv"])  # SRC cuts pads off: see test_padding_matches_unpadded
def test_pads_never_kept_over_tokens(model, batch, method):
    ids, mask = batch
    cache = make_cache(method, model.config, ratio=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    full = make_cache("full", model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=full)
    layer, tokens = cache.layers[0].store, full.layers[0].store.k[:1, :, :48 - 7]  # the full cache cuts pads off
    if method == "holokv":
        assert layer.slot_lens.tolist()[0] + layer.lens.tolist()[0] == 48 - 7
    else:
        kept = layer.k[:1, :, :int(layer.lens[0])]
        assert (kept.unsqueeze(3) == tokens.unsqueeze(2)).all(-1).any(-1).all()


@pytest.mark.parametrize("method, options", [("holokv", dict(k=4, prefill="exact")),
                                             ("holokv", dict(k=4, prefill="superposed")), ("src", {})])
def test_padding_matches_unpadded(model, batch, method, options):
    ids, mask = batch
    runs = []
    for x, m in ((ids, mask), (ids[:1, 7:], mask[:1, 7:])):
        cache = make_cache(method, model.config, ratio=4, **options)
        with torch.no_grad():
            runs.append(model.generate(x, attention_mask=m, max_new_tokens=10, do_sample=False,
                                       past_key_values=cache, output_scores=True, return_dict_in_generate=True))
    for s, s0 in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(s[:1], s0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["aligned", "full"])
@pytest.mark.parametrize("sinks, window_slots", [(0, None), (3, None), (3, 2)])
def test_superposed_prefill_equals_decode_steps(model, mode, sinks, window_slots):
    """The superposed prefill reads, for every prompt query, exactly what holo_decode reads at that step (with a
    window: the slots still held)."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    opts = dict(ratio=3, k=4, sinks=sinks, mode=mode, slot_gain=2.0, window_slots=window_slots)
    pre = make_cache("holokv", model.config, prefill="superposed", **opts)
    steps = make_cache("holokv", model.config, **opts)
    with torch.no_grad():
        a = model(ids, past_key_values=pre).logits
        b = torch.cat([model(ids[:, i: i + 1], past_key_values=steps).logits for i in range(40)], 1)
        # several new tokens on a non-empty cache are read as decode steps too
        chunked = make_cache("holokv", model.config, **opts)
        model(ids[:, :1], past_key_values=chunked)
        c = model(ids[:, 1:], past_key_values=chunked).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, b[:, 1:], atol=1e-5, rtol=1e-5)
    assert pre.layers[1].store.slot_lens.item() > 0 and pre.layers[1].store.slot_lens.item() % 4 == 0


@pytest.mark.parametrize("options, length", [(dict(method="seed"), 48), (dict(score="seed"), 48),
                                             (dict(bin_size=8, rank=2, window=8, recent=16), 48),
                                             ({}, 10)])  # 10 tokens at ratio 8: no room for centroids, evicts
def test_src_variants_generate(model, batch, options, length):
    ids, mask = (x[:, -length:] for x in batch)
    # no decode-time steps (none would fire in 3 tokens): these prompts are too short to pay for their queries
    cache = make_cache("src", model.config, ratio=8, every=None, **options)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache,
                             output_scores=True, return_dict_in_generate=True)
    assert all(torch.isfinite(s).all() for s in out.scores)
    layer = cache.layers[0]
    # entries (each 2·d elements, +1 for a log-mass) fit ceil(prompt tokens / 8) tokens' bytes, plus 3 decoded, in
    # the slots where entries carry a log-mass
    per_entry = 2 * 32 + layer.log_mass
    assert layer.store.slot_lens.tolist() == [3 * layer.log_mass] * 2
    assert ((layer.lens + layer.store.slot_lens - 3) * per_entry <= (mask.sum(1) + 7) // 8 * 2 * 32).all()
    assert cache.get_seq_length() == length + 3


# SRC with steps small enough to pay for themselves on short prompts
SMALL_SRC = dict(window=4, recent=8, every=8, decode_bin=16, rank=2, sinks=2)


@pytest.mark.parametrize("method, options", [(m, {}) for m in METHODS] + [("src", SMALL_SRC)])
def test_never_more_than_full(model, method, options):
    """After the prompt and after each of 3 decode steps, a cache holds at most the bytes the full cache holds for
    the same tokens (per-entry state, log-masses and SRC's scoring queries counted), for prompts of 1..40 tokens
    and every ratio."""
    ids = torch.randint(0, 128, (1, 43), generator=torch.Generator().manual_seed(10))
    full = make_cache("full", model.config)
    with torch.no_grad():
        model(ids[:, :1], past_key_values=full)
    token = full.nbytes()  # the full cache's bytes per token
    over = []
    for ratio in [1] if method == "full" else [1, 1.5, 2, 4, 8]:
        for n in range(1, 41):
            cache = make_cache(method, model.config, ratio=ratio, **options)
            with torch.no_grad():
                model(ids[:, :n], past_key_values=cache)
                held = [cache.nbytes()]
                for t in range(n, n + 3):
                    model(ids[:, t: t + 1], past_key_values=cache)
                    held.append(cache.nbytes())
            over += [(ratio, n, step, bytes_, (n + step) * token) for step, bytes_ in enumerate(held)
                     if bytes_ > (n + step) * token]
    assert not over, over[:5]  # (ratio, prompt tokens, decode step, bytes held, the full cache's)


@pytest.mark.parametrize("ratio", [1.5, 2, 4, 8])
def test_src_never_more_than_full_while_decoding(model, ratio):
    """Through 96 decode steps: below the shortest prompt whose compaction pays for SRC's queries and log-masses the
    layer is the full cache (same bytes, same logits: exact tokens, no state); from that prompt on it compresses,
    never above the full cache's bytes (its steps fire and summarize bins), even where the prompt is compacted to
    no entry at all (the new token is appended before it is read)."""
    ids = torch.randint(0, 128, (1, 136), generator=torch.Generator().manual_seed(11))
    shape = (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim)
    rule = make_cache("src", model.config, ratio=ratio, **SMALL_SRC).layers[0]
    first = next(n for n in range(1, 41) if rule.compacts(n, rule.steps_every(n), *shape))
    for n in (first - 1, first, 40):
        caches = [make_cache("full", model.config), make_cache("src", model.config, ratio=ratio, **SMALL_SRC)]
        held, logits = [], []
        with torch.no_grad():
            for cache in caches:
                model(ids[:, :n], past_key_values=cache)
            for t in range(n, n + 96):
                logits.append([model(ids[:, t: t + 1], past_key_values=c).logits for c in caches])
                held.append([c.nbytes() for c in caches])
        assert all(src <= full for full, src in held), (n, held)
        assert all(torch.isfinite(src).all() for _, src in logits)
        layer = caches[1].layers[0]
        if n < first:
            assert layer.store.bias is None and layer.every is None and held[-1][0] == held[-1][1]
            for full, src in logits:
                torch.testing.assert_close(src, full, atol=1e-5, rtol=1e-5)
        else:
            assert layer.reviewed - layer.kept >= layer.decode_bin and held[-1][1] < 0.8 * held[-1][0]


@pytest.mark.parametrize("ratio", [1.1, 1.5, 2])
def test_src_every_none_never_more_than_full_over_long_generation(model, ratio):
    """every=None: no step ever bins a decoded token, so each is held as the full cache holds it, K and V and no
    log-mass (in the store's slots): through 200 decode steps after a 12-token prompt the layer never holds more
    than the full cache (a log-mass per decoded token would outgrow the prompt's saving after 64 tokens at ratio
    1.1), and it reads its slots as exact tokens."""
    ids = torch.randint(0, 128, (1, 212), generator=torch.Generator().manual_seed(12))
    caches = [make_cache("full", model.config), make_cache("src", model.config, ratio=ratio, every=None)]
    held = []
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :12], past_key_values=cache)
        for t in range(12, 212):
            for cache in caches:
                model(ids[:, t: t + 1], past_key_values=cache)
            held.append([c.nbytes() for c in caches])
    assert all(src <= full for full, src in held), next((t, h) for t, h in enumerate(held) if h[1] > h[0])
    s = caches[1].layers[0].store
    assert s.bias is not None and s.slot_lens.tolist() == [200] and (s.lens < 12).all()
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(13))
    none = s.k.new_zeros(1, 2, 0, 32)
    as_entries = [torch.cat([x[:, :, :int(s.lens)], y[:, :, :200]], 2) for x, y in ((s.k, s.k_slots), (s.v, s.v_slots))]
    bias = torch.cat([s.bias[:, :, :int(s.lens)], s.bias.new_zeros(1, 2, 200)], 2)
    want = torch.ops.holokv.holo_decode(q, none, none, s.phase, torch.zeros(1, dtype=torch.long), *as_entries,
                                        s.lens + 200, "full", 0.2, 1.0, bias, None)
    torch.testing.assert_close(s.decode(q, 0.2), want)


def test_src_every_none_runtime_reserves_its_slots(model, batch):
    """holokv.runtime reserves every planned token after the prefill; with every=None they are slots, so no buffer
    moves while it decodes, and it gives generate's tokens."""
    ids, mask = batch
    new = lambda: make_cache("src", model.config, ratio=2, every=None)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=new())
    dec = Decoder(model, new(), graph=False)
    logits = dec.prefill(ids, mask, max_new_tokens=10)
    store = dec.cache.layers[0].store
    buffers = [x.data_ptr() for x in (store.k, store.k_slots, store.v_slots)]
    tokens = [logits.argmax(-1)]
    for _ in range(9):
        tokens.append(dec.step(tokens[-1]).argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), want[:, ids.shape[1]:]) and store.slot_lens.tolist() == [9, 9]
    assert [x.data_ptr() for x in (store.k, store.k_slots, store.v_slots)] == buffers


@pytest.mark.parametrize("options", [DECODE, dict(SMALL_SRC, ratio=4, every=20)], ids=["bin32_every8", "bin16_every20"])
def test_src_steps_reserve_what_they_hold(model, batch, options):
    """The room holokv.runtime reserves for SRC's steps is planned from the counts alone (bound()): enough for the
    most entries a step ever holds (a decoded token before the step that follows it) plus its static window,
    and not a block more."""
    from holokv.caches.store import BLOCK

    ids, mask = batch
    dec = Decoder(model, make_cache("src", model.config, **options), graph=False)
    logits = dec.prefill(ids, mask, max_new_tokens=90)
    layer = dec.cache.layers[0]
    capacity, most = layer.store.capacity, layer.width
    for _ in range(90):
        logits = dec.step(logits.argmax(-1))
        most = max(most, layer.width + (layer.generated % layer.every == 0))  # before its step, if one ran
    room = layer.decode_bin + (layer.decode_bin - 1 + layer.every) // layer.decode_bin * layer.rank
    assert layer.reviewed - layer.kept > 2 * layer.decode_bin and layer.store.capacity == capacity
    assert most + room <= capacity < most + room + BLOCK


@needs_cuda
def test_src_every_none_cuda_decode_never_syncs():
    """every=None's slot appends: eager decode steps under sync debug mode 'error', and a CUDA graph replays them."""
    from test_runtime import eager_steps_without_sync, prompt, tiny

    model = tiny(head_dim=64, device="cuda", dtype=torch.bfloat16)
    ids, mask = prompt("cuda")
    new = lambda: make_cache("src", model.config, ratio=4, every=None)
    eager_steps_without_sync(model, new(), ids, mask)
    runs = [generate(model, new(), ids, mask, max_new_tokens=24, graph=graph) for graph in (False, True)]
    assert torch.equal(*runs)


def kv_bytes(cache) -> int:
    return sum(layer.store.nbytes() for layer in cache.layers)


def test_src_decode_bytes_track_ratio(model):
    """With decode-time steps the bytes held stay within ceil(seen / ratio) token-equivalents, up to the
    filling bin's excess over its centroids and one step's tokens (SRCLayer's rule); bins are summarized
    (the bytes fall). Without steps every decoded token stays and the excess keeps growing."""
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    token = 2 * 32 * 4 * 2 * 2  # one token's K and V: 2·d fp32 elements, 2 KV heads, 2 layers
    entry = token // 64 * 65  # an entry also holds its log-mass
    slack = (DECODE["decode_bin"] - DECODE["rank"] - 1 + DECODE["every"] - 1) * entry
    excess, falls = {}, {}
    for every in (DECODE["every"], None):
        cache = make_cache("src", model.config, **{**DECODE, "every": every})
        excess[every], falls[every] = [], 0
        with torch.no_grad():
            out = model(ids, past_key_values=cache)
            for _ in range(128):
                before = kv_bytes(cache)
                out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
                falls[every] += kv_bytes(cache) < before
                excess[every].append(kv_bytes(cache) - math.ceil(cache.get_seq_length() / 4) * token)
    assert max(excess[8]) <= slack
    assert falls[8] >= 3 and falls[None] == 0
    assert excess[None][-1] > 2 * slack


@pytest.mark.parametrize("options", [{}, dict(method="seed"), dict(score="seed")])
@pytest.mark.parametrize("rows", [1, 2], ids=["batch1", "padded2"])
def test_src_decode_compression_generates(model, batch, options, rows):
    ids, mask = (x[-rows:] for x in batch)
    cache = make_cache("src", model.config, **{**DECODE, "decode_bin": 8, "every": 4, **options})
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, past_key_values=cache,
                             output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (rows, ids.shape[1] + 24)
    assert all(torch.isfinite(s).all() for s in out.scores)
    assert cache.get_seq_length() == ids.shape[1] + 23  # positions: the true length, not the entries held
    for layer in cache.layers:
        assert layer.reviewed - layer.kept >= layer.decode_bin  # a bin was summarized
        n = int(layer.lens.max())
        assert torch.isfinite(layer.held_k[:, :, :n]).all() and torch.isfinite(layer.held_v[:, :, :n]).all()


def test_src_decode_padded_matches_alone(model, batch):
    """Decode-time steps on a left-padded batch: each sequence holds and reads what it does alone (its counts
    are the batch's, its entries its own; filler past its length is never scored, fitted to or read)."""
    ids, mask = batch
    options = dict(ratio=2, every=4, recent=4, window=2, sinks=2, decode_bin=8, rank=1)
    runs, caches = [], []
    for x, m in ((ids, mask), (ids[:1, 7:], mask[:1, 7:]), (ids[1:], mask[1:])):
        caches.append(make_cache("src", model.config, **options))
        with torch.no_grad():
            runs.append(model.generate(x, attention_mask=m, max_new_tokens=32, do_sample=False,
                                       past_key_values=caches[-1], output_scores=True, return_dict_in_generate=True))
    first = caches[0].layers[0]
    assert 0 < first.kept < first.reviewed - first.decode_bin  # the scores chose; bins were summarized
    assert first.r0 > 0
    for row in (0, 1):
        for s, s0 in zip(runs[0].scores, runs[1 + row].scores):
            torch.testing.assert_close(s[row: row + 1], s0, atol=1e-5, rtol=1e-5)
        for layer, alone in zip(caches[0].layers, caches[1 + row].layers):
            n = int(alone.lens[0])
            assert int(layer.lens[row]) == n
            for name in ("held_k", "held_v", "held_bias"):  # the filler's pull on the fits is ~1e-6 (values ~1e-2)
                torch.testing.assert_close(getattr(layer, name)[row, :, :n], getattr(alone, name)[0, :, :n],
                                           atol=5e-7, rtol=1e-5)


def test_src_decode_attention_close_to_exact(model):
    """After decode-time steps, layer 0's attention output (its input is the same in both runs) stays close
    to exact attention over the whole history. Measured ~0.9998; zeroing the centroids' values or dropping
    the summarized bins gives ~0.95."""
    ids = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(6))
    outs = {}
    for method, options in (("full", {}), ("src", DECODE)):
        got = []
        hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: got.append(a[0][0, -1]))
        cache = make_cache(method, model.config, **options)
        with torch.no_grad():
            model(ids[:, :64], past_key_values=cache)
            for t in range(64, 128):
                model(ids[:, t: t + 1], past_key_values=cache)
        hook.remove()
        outs[method] = torch.stack(got[-32:])
    layer = cache.layers[0]
    assert layer.reviewed - layer.kept >= layer.decode_bin
    cos = torch.nn.functional.cosine_similarity(outs["src"], outs["full"], dim=-1)
    assert cos.mean() > 0.99, cos


@pytest.mark.parametrize("score", ["mass", "seed"])
def test_src_steps_keep_heavy_hitters_exact(score):
    """Generated tokens that every query attends (keys along the queries' common direction) stay exact when
    they leave the recent window, while about half of the others are binned."""
    g = torch.Generator().manual_seed(8)
    n, d, scale = 112, 32, 32 ** -0.5
    u = torch.randn(d, generator=g)
    q, k, v = u + 0.5 * torch.randn(1, 4, n, d, generator=g), torch.randn(1, 2, n, d, generator=g), \
        torch.randn(1, 2, n, d, generator=g)
    heavy = [70, 85, 100]
    k[:, :, heavy] = 0.6 * u + 0.05 * torch.randn(1, 2, 3, d, generator=g)
    layer = SRCLayer(ratio=2, every=8, decode_bin=16, rank=1, recent=8, window=4, sinks=2, score=score)
    for t in [slice(0, 48)] + [slice(t, t + 1) for t in range(48, n)]:
        layer.update(k[:, :, t], v[:, :, t])
        layer.attend(q[:, :, t], None, scale)
    exact = lambda t: (layer.held_k[0, :, :int(layer.lens[0])] == k[0, :, t, None]).all(-1).any(-1)  # per KV head
    assert all(exact(t).all() for t in heavy)
    others = sum(int(exact(t).sum()) for t in range(48, 104) if t not in heavy)
    assert 0.25 < others / (2 * 53) < 0.75, others
    assert layer.reviewed - layer.kept >= 2 * layer.decode_bin


def test_src_step_keeps_what_its_window_reads():
    """softmax_ls with more centroids than reference rows and ridge ~ 0: right after a step that summarizes a
    bin, the observation query reads what it read before the step (masks, placeholders and the write-back
    of the centroids all line up)."""
    g = torch.Generator().manual_seed(7)
    n, d, scale = 112, 32, 32 ** -0.5
    q, k, v = torch.randn(1, 4, n, d, generator=g), torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, n, d,
                                                                                                        generator=g)
    layer = SRCLayer(ratio=4, every=8, decode_bin=8, rank=4, recent=8, window=1, sinks=2, ridge=1e-9)
    layer.update(k[:, :, :48], v[:, :, :48])
    layer.attend(q[:, :, :48], None, scale)
    none, steps = k[:, :, :0], 0
    for t in range(48, n):
        summarized = layer.reviewed - layer.kept
        layer.update(k[:, :, t: t + 1], v[:, :, t: t + 1])
        before = layer.attend(q[:, :, t: t + 1], None, scale)[:, 0]
        after = torch.ops.holokv.holo_decode(q[:, :, t].contiguous(), none, none, k.new_ones(1, d),
                                             torch.zeros_like(layer.lens), layer.store.k, layer.store.v, layer.lens,
                                             "full", scale, 1.0, layer.store.bias)
        if (layer.reviewed - layer.kept) // 8 > summarized // 8:
            steps += 1
            torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert steps >= 4


def test_src_half_precision(model, batch):
    """The compaction's solves run in fp32; the cache stores and decodes in the model's dtype."""
    ids, mask = batch
    half = copy.deepcopy(model).to(torch.bfloat16)
    cache = make_cache("src", half.config, ratio=4, window=4)  # 41 tokens pay for 4 scoring queries, not 32
    with torch.no_grad():
        out = half.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache,
                            output_scores=True, return_dict_in_generate=True)
    assert all(torch.isfinite(s).all() for s in out.scores)
    assert cache.layers[0].held_k.dtype == cache.layers[0].held_bias.dtype == torch.bfloat16


@needs_cuda
def test_src_cuda_matches_cpu(batch):
    """On CUDA the prompt compaction replays a CUDA graph captured once per prompt shape and shared by the
    layers (two sequences of different lengths: two graphs for two layers), the decode-time steps and
    decode run as kernels (head_dim 64: a size the CUDA decode supports); the generation agrees with the CPU."""
    ids, mask = batch
    torch.manual_seed(0)
    model = use_holokv_attention(LlamaForCausalLM(tiny_config(head_dim=64)).eval())
    COMPACT.graphs.clear()
    outs = []
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(dev)
        cache = make_cache("src", m.config, **DECODE)
        with torch.no_grad():
            outs.append(m.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=24, do_sample=False,
                                   past_key_values=cache, output_scores=True, return_dict_in_generate=True))
    assert len(COMPACT.graphs) == (0 if GRAPHLESS else 2)
    assert torch.equal(outs[0].sequences, outs[1].sequences.cpu())
    # fp32 on both, but two eigensolvers and Cholesky paths: centroids differ at ~1e-4, logits up to ~1e-3
    for a, b in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(b.cpu(), a, atol=1e-2, rtol=1e-2)


@needs_cuda
@pytest.mark.parametrize("score", ["mass", "seed"])
def test_src_cuda_steps_replay_graphs(batch, monkeypatch, score):
    """Each layer's decode-time steps replay CUDA graphs captured on its own buffers, one per static shape (bins
    to summarize or none: two here); the generation equals the eager steps' on the same device."""
    ids, mask = (x.cuda() for x in batch)
    torch.manual_seed(0)
    model = use_holokv_attention(LlamaForCausalLM(tiny_config(head_dim=64)).eval()).cuda()
    outs = []
    for graphless in (False, True):
        monkeypatch.setattr("holokv.compaction.graph.GRAPHLESS", graphless or GRAPHLESS)
        cache = make_cache("src", model.config, **DECODE, score=score)
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=120, do_sample=False,
                                       past_key_values=cache, output_scores=True, return_dict_in_generate=True))
        if not graphless:
            assert [len(layer.step_graphs.graphs) for layer in cache.layers] == [0 if GRAPHLESS else 2] * 2
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_expected_attention_models_the_next_query():
    """Every prompt query is one pre-RoPE query at positions 0..n-1: brought back before RoPE they coincide
    (covariance 0), and with future=1 the model is that query at position n, so the scores are the
    attention it pays each token (GQA group mean) times ‖v‖."""
    g = torch.Generator().manual_seed(8)
    n, d, scale = 24, 32, 32 ** -0.5
    rotary = LlamaRotaryEmbedding(tiny_config())
    rope = lambda x, pos: apply_rotary_pos_emb(x, x, *rotary(x, pos))[0]
    base = torch.randn(1, 4, 1, d, generator=g)
    q = rope(base.expand(1, 4, n, d), torch.arange(n)[None])
    k, v = torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, n, d, generator=g)
    layer = ExpectedAttentionLayer(ratio=1, rotary=rotary, sinks=0, future=1)
    layer.update(k, v)
    layer.attend(q, None, scale)
    pos = torch.arange(n)[None, None]
    mu, cov = layer.query_model(q, pos)
    q_next = rope(base, torch.tensor([[n]]))[:, :, 0]
    torch.testing.assert_close(mu, q_next, atol=1e-5, rtol=1e-5)
    assert cov.abs().max() < 1e-5
    p = torch.softmax(scale * q_next.view(1, 2, 2, 1, d) @ k.unsqueeze(2).mT, -1).mean(2).squeeze(2)
    torch.testing.assert_close(layer.prompt_scores(q, k, v, None, scale, pos), p * v.norm(dim=-1), atol=1e-6,
                               rtol=1e-5)


def test_superposed_attention_is_differentiable():
    spec = HoloSpec(k=4, ratio=4, sinks=2)
    q = torch.randn(1, 4, 20, 32, requires_grad=True)
    k = torch.randn(1, 2, 20, 32, requires_grad=True)
    v = torch.randn(1, 2, 20, 32, requires_grad=True)
    phase = torch.ops.holokv.phase_keys(4, 32, "half")
    superposed_attention(spec, phase, q, k, v, torch.zeros(1, dtype=torch.long), 32 ** -0.5).square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_holokv_window_share():
    spec = HoloSpec(k=8, ratio=4, sinks=4)
    valid = torch.arange(0, 4000)
    closed = spec.closed(valid)
    assert (closed.diff() >= 0).all() and (closed % 8 == 0).all()
    held = valid - closed + closed / 8
    assert math.isclose(held[-1].item() / 4000, 1 / 4, rel_tol=0.02)


def test_requires_holokv_attention(batch):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    cache = make_cache("streaming", plain.config, ratio=2)
    ids, _ = batch
    with torch.no_grad():
        plain(ids, past_key_values=cache)
        with pytest.raises(RuntimeError, match="attn_implementation='holokv'"):
            plain(ids[:, :1], past_key_values=cache)


@pytest.mark.parametrize("method, config, options, match", [
    ("nope", tiny_config(), {}, "unknown method"),
    ("h2o", tiny_config(), {"ratio": 0.5}, "ratio must be >= 1"),
    ("full", tiny_config(), {"ratio": 2}, "keeps every token"),
    ("holokv", tiny_config(), {"ratio": 8, "k": 4}, "reaches ratios"),
    ("holokv", tiny_config(), {"mode": "sideways"}, "mode must be"),
    ("holokv", tiny_config(), {"prefill": "lazy"}, "prefill must be"),
    ("holokv", tiny_config(), {"k": 32}, "k \\(tokens per slot\\)"),
    ("holokv", LlamaConfig(hidden_size=48, num_attention_heads=2, head_dim=24, num_hidden_layers=1), {"k": 8},
     "head_dim divisible"),
    ("src", tiny_config(), {"ratio": 0.5}, "ratio must be >= 1"),
    ("src", tiny_config(), {"method": "evict"}, "method must be"),
    ("src", tiny_config(), {"score": "h2o"}, "score must be"),
    ("src", tiny_config(), {"rank": 8, "bin_size": 8}, "0 < rank < bin_size"),
    ("src", tiny_config(), {"rank": 4, "decode_bin": 4}, "0 < rank < decode_bin"),
    ("src", tiny_config(), {"window": 64}, "window <= recent"),
    ("src", tiny_config(), {"every": 0}, "every \\(generated tokens between compression steps\\) must be"),
    ("src", tiny_config(), {"every": 2.5}, "every .* must be a positive int"),
    ("full", GPT2Config(), {}, "not supported"),
    ("full", MistralConfig(sliding_window=16, num_hidden_layers=1), {}, "full-attention"),
    ("full", tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     {}, "part of the head"),
])
def test_bad_inputs(method, config, options, match):
    with pytest.raises(ValueError, match=match):
        make_cache(method, config, **options)


def assert_batched_as_alone(model, new_cache, ids, mask, pads: int, tokens: int) -> None:
    """Greedy generation of a 2-sequence batch (row 0 left-padded by ``pads``) gives each row the scores it gets
    alone, with a fresh ``new_cache()`` per run."""
    runs = []
    for x, m in ((ids, mask), (ids[:1, pads:], mask[:1, pads:]), (ids[1:], mask[1:])):
        with torch.no_grad():
            runs.append(model.generate(x, attention_mask=m, max_new_tokens=tokens, do_sample=False,
                                       past_key_values=new_cache(), output_scores=True, return_dict_in_generate=True))
    for row in (0, 1):
        for s, s0 in zip(runs[0].scores, runs[1 + row].scores):
            torch.testing.assert_close(s[row: row + 1], s0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", COMPRESSED)
def test_batch_invariance(model, batch, method):
    """A left-padded sequence gets the logits it gets alone, for every cache: budgets are per sequence."""
    ids, mask = batch
    options = dict(every=4, recent=8, window=4, decode_bin=16, rank=2) if method == "src" else {}
    assert_batched_as_alone(model, lambda: make_cache(method, model.config, ratio=2, **options), ids, mask, 7, 12)


@pytest.mark.parametrize("method", ["topk", "snapkv", "expected"])
def test_head_adaptive_budgets(model, batch, method):
    """adaptive=1 is the uniform budget; a smaller share moves entries between the heads of a layer (AdaKV):
    each layer still holds Hkv·budget entries per sequence, each head at least its share, and a padded sequence
    keeps and reads what it does alone."""
    ids, mask = batch
    outs = {}
    for adaptive in (None, 1.0, 0.2):
        cache = make_cache(method, model.config, ratio=4, adaptive=adaptive)
        with torch.no_grad():
            outs[adaptive] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                            past_key_values=cache, output_scores=True, return_dict_in_generate=True)
        for layer in cache.layers:
            lens = layer.store.lens  # after the prompt and 5 decoded tokens
            budget = torch.tensor([math.ceil(41 / 4), math.ceil(48 / 4)]) + 5
            if adaptive is None:
                assert torch.equal(lens, budget)
            else:
                assert torch.equal(lens.sum(-1), 2 * budget)
                assert (lens >= ((budget - 5) * adaptive).floor()[:, None] + 5).all()
    for s, s1 in zip(outs[None].scores, outs[1.0].scores):
        torch.testing.assert_close(s, s1, rtol=0, atol=0)
    alone = make_cache(method, model.config, ratio=4, adaptive=0.2)
    with torch.no_grad():
        single = model.generate(ids[:1, 7:], attention_mask=mask[:1, 7:], max_new_tokens=6, do_sample=False,
                                past_key_values=alone, output_scores=True, return_dict_in_generate=True)
    for s, s0 in zip(outs[0.2].scores, single.scores):
        torch.testing.assert_close(s[:1], s0, atol=1e-5, rtol=1e-5)


def test_head_adaptive_shares_follow_the_scores():
    """A head whose attention is spread out gets the entries a concentrated head does not need, down to the
    concentrated head's floor."""
    from holokv.caches.snapkv import SnapKVLayer
    ranked = torch.tensor([[[0.9, 0.05, 0.02, 0.01, 0.0, 0.0], [0.2, 0.2, 0.2, 0.15, 0.15, 0.1]]])
    keep = torch.tensor([3])
    assert SnapKVLayer(ratio=2, adaptive=0.0).head_lens(ranked, keep).tolist() == [[1, 5]]
    assert SnapKVLayer(ratio=2, adaptive=0.5).head_lens(ranked, keep).tolist() == [[1, 5]]
    assert SnapKVLayer(ratio=2, adaptive=0.7).head_lens(ranked, keep).tolist() == [[2, 4]]
    assert SnapKVLayer(ratio=2, adaptive=1.0).head_lens(ranked, keep).tolist() == [[3, 3]]


@pytest.mark.parametrize("method", COMPRESSED)
def test_reordered_batch_decodes_as_reordered(model, batch, method):
    """batch_select_indices (beam search's reorder) moves every per-sequence tensor: after swapping the two
    sequences, the next steps give the swapped logits."""
    ids, mask = batch
    options = dict(every=2, recent=8, window=4, decode_bin=16, rank=2) if method == "src" else {}
    caches = [make_cache(method, model.config, ratio=2, **options) for _ in range(2)]
    steps = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(9))
    outs = []
    with torch.no_grad():
        for cache in caches:
            model(ids, attention_mask=mask, past_key_values=cache)
        caches[1].reorder_cache(torch.tensor([1, 0]))
        for cache, order in zip(caches, ([0, 1], [1, 0])):
            outs.append(torch.stack([model(steps[order, t: t + 1], past_key_values=cache,
                                           position_ids=torch.tensor([[41 + t], [48 + t]])[order]).logits[:, -1]
                                     for t in range(6)]))
    torch.testing.assert_close(outs[1], outs[0][:, [1, 0]], atol=1e-5, rtol=1e-5)


def test_src_auto_every_spaces_steps_with_the_budget(model):
    """every="auto": a step per 1/64 of the prompt's budget, at least every 16 tokens; an int or None (the default)
    is taken as given; anything else is refused by name."""
    assert make_cache("src", model.config, ratio=4).layers[0].every_option is None
    layer = make_cache("src", model.config, ratio=4, every="auto").layers[0]
    assert [layer.steps_every(n) for n in (100, 4096, 4097 * 4, 16384 * 4)] == [16, 16, 65, 256]
    assert make_cache("src", model.config, ratio=4, every=5).layers[0].steps_every(10 ** 6) == 5
    assert make_cache("src", model.config, ratio=4, every=None).layers[0].steps_every(10 ** 6) is None
    with pytest.raises(ValueError, match="every.*'auto'"):
        make_cache("src", model.config, ratio=4, every="often")


def test_src_future_queries_are_prompt_queries_at_future_positions(model):
    """future_queries: prompt queries, RoPE undone and redone at positions spread over the next ``future``
    (checked against transformers' RoPE applied at those positions); they change the fitted summaries, not
    the bytes; the option needs rotate-half RoPE and a count >= 0."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = make_cache("src", model.config, ratio=4, future_queries=8, future=64).layers[0]
    q_pre = torch.randn(1, 4, 20, 32, generator=torch.Generator().manual_seed(0))
    q, _ = apply_rotary_pos_emb(q_pre, q_pre, *layer.rotary(q_pre, torch.arange(20)[None]))
    src, at = torch.linspace(4, 19, 8).round().long(), 20 + torch.linspace(0, 63, 8).round().long()  # past 4 sinks
    want, _ = apply_rotary_pos_emb(q_pre[:, :, src], q_pre[:, :, src], *layer.rotary(q_pre, at[None]))
    torch.testing.assert_close(replayed(q, 8, layer.sinks, layer.future, layer.rotary), want, atol=1e-5, rtol=1e-5)

    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    held = []
    for options in ({}, dict(future_queries=16)):
        cache = make_cache("src", model.config, ratio=4, **options)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        held.append((cache.nbytes(), cache.layers[0].held_v.clone()))
    assert held[0][0] == held[1][0] and not torch.equal(held[0][1], held[1][1])
    with pytest.raises(ValueError, match="future_queries"):
        make_cache("src", model.config, ratio=4, future_queries=-1)
