"""The graphed decode loop (holokv.runtime) reads what transformers' generate reads through the same caches,
keeps its buffers while decoding, and on CUDA runs whole steps from a CUDA graph with no host sync."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from holokv import row_argmax
from holokv.caches import METHODS, make_cache, use_holokv_attention
from holokv.runtime import Decoder, generate, greedy

from conftest import dtype_id, needs_cuda

# SRC with compression steps that fire within a few dozen tokens
OPTIONS = {"src": dict(every=4, recent=8, window=4, decode_bin=16, rank=2), "holokv": dict(k=4)}


def tiny(head_dim=32, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=2 * head_dim * 2, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=1024, eos_token_id=None)
    return use_holokv_attention(LlamaForCausalLM(config).eval().to(device, dtype))


def prompt(device="cpu"):
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    return ids, mask


def cache(method, model):
    return make_cache(method, model.config, ratio=1 if method == "full" else 4, **OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", METHODS)
def test_matches_transformers_generate(method):
    model = tiny()
    ids, mask = prompt()
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                              past_key_values=cache(method, model))
    assert torch.equal(generate(model, cache(method, model), ids, mask, max_new_tokens=24, graph=False), want)


def test_buffers_stay_put():
    """Room for every planned token is reserved after the prefill: no store buffer moves while decoding."""
    model = tiny()
    ids, mask = prompt()
    for method in METHODS:
        c = cache(method, model)
        dec = Decoder(model, c, graph=False)
        logits = dec.prefill(ids, mask, max_new_tokens=40)
        where = [(layer.store.k.data_ptr(), layer.store.k_slots.data_ptr()) for layer in c.layers]
        for _ in range(40):
            logits = dec.step(logits.argmax(-1))
        assert where == [(layer.store.k.data_ptr(), layer.store.k_slots.data_ptr()) for layer in c.layers], method
        with pytest.raises(RuntimeError, match="room"):
            dec.step(logits.argmax(-1))


@pytest.mark.parametrize("method", METHODS)
def test_layers_share_one_token_counter_while_deferred(method):
    """The decoder's steps advance one n_valid for all layers (they read the same tokens), which stays each
    sequence's true count; undeferred, each layer counts its own again."""
    model = tiny()
    ids, mask = prompt()
    c = cache(method, model)
    dec = Decoder(model, c, graph=False)
    logits = dec.prefill(ids, mask, max_new_tokens=5)
    for _ in range(5):
        logits = dec.step(greedy(logits))
    want = (mask.sum(-1) + 5).to(c.layers[0].n_valid)
    assert all(layer.n_valid is c.layers[0].n_valid for layer in c.layers)
    assert torch.equal(c.layers[0].n_valid, want)
    c.defer(False)
    assert all(torch.equal(layer.n_valid, want) and layer.counts for layer in c.layers)
    assert c.layers[1].n_valid is not c.layers[0].n_valid


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_cuda_graph_matches_eager(method, dtype):
    model = tiny(head_dim=64, device="cuda", dtype=dtype)
    ids, mask = prompt("cuda")
    eager = generate(model, cache(method, model), ids, mask, max_new_tokens=40, graph=False)
    graphed = generate(model, cache(method, model), ids, mask, max_new_tokens=40, graph=True)
    assert torch.equal(graphed, eager)


def eager_steps_without_sync(model, cache, ids, mask, steps: int = 20) -> None:
    """``steps`` eager decode steps (each op checked) under sync debug mode 'error', after the prefill."""
    dec = Decoder(model, cache, graph=False)
    tokens = dec.prefill(ids, mask, max_new_tokens=steps).argmax(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            tokens = dec.step(tokens).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_decode_steps_never_sync(method):
    """Every cache's decode step (eager, so each op is checked) runs under sync debug mode 'error'; SRC's
    compression steps too."""
    model = tiny(head_dim=64, device="cuda", dtype=torch.bfloat16)
    ids, mask = prompt("cuda")
    eager_steps_without_sync(model, cache(method, model), ids, mask)


@needs_cuda
def test_cuda_replays_allocate_nothing():
    model = tiny(head_dim=64, device="cuda", dtype=torch.bfloat16)
    ids, mask = prompt("cuda")
    dec = Decoder(model, cache("holokv", model), graph=True)
    logits = dec.prefill(ids, mask, max_new_tokens=64)
    for _ in range(4):
        logits = dec.step(logits.argmax(-1))
    before = torch.cuda.memory_allocated()
    for _ in range(60):
        logits = dec.step(logits.argmax(-1))
    assert torch.cuda.memory_allocated() == before


WINDOW = dict(k=4, window_slots=2)  # HoloKV keeping its last 2 slots: the prompt already overflows them


def test_window_matches_transformers_generate():
    model = tiny()
    ids, mask = prompt()
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                              past_key_values=make_cache("holokv", model.config, ratio=4, **WINDOW))
    got = generate(model, make_cache("holokv", model.config, ratio=4, **WINDOW), ids, mask, max_new_tokens=24,
                   graph=False)
    assert torch.equal(got, want)


@needs_cuda
def test_cuda_window_graph_matches_eager_and_never_syncs():
    model = tiny(head_dim=64, device="cuda", dtype=torch.bfloat16)
    ids, mask = prompt("cuda")
    caches = [make_cache("holokv", model.config, ratio=4, **WINDOW) for _ in range(3)]
    eager = generate(model, caches[0], ids, mask, max_new_tokens=40, graph=False)
    assert torch.equal(generate(model, caches[1], ids, mask, max_new_tokens=40, graph=True), eager)
    eager_steps_without_sync(model, caches[2], ids, mask)
    assert all((layer.store.evicted > 0).all() for layer in caches[2].layers)


def teacher_forced_logits(model, cache, ids, mask, tokens, graph: bool, compile: bool, fuse: bool) -> torch.Tensor:
    """Logits of every step of a Decoder fed ``tokens`` [steps, B] -> [steps + 1, B, V]."""
    dec = Decoder(model, cache, graph=graph, compile=compile, fuse=fuse)
    out = [dec.prefill(ids, mask, max_new_tokens=len(tokens)).clone()]
    for t in tokens:
        out.append(dec.step(t).clone())
    return torch.stack(out)


@pytest.mark.parametrize("method", ["full", "holokv", "src"])
def test_compiled_layers_match_eager(method):
    """compile=True fuses every layer (one graph of the attention's projections per layer, so none fell back to
    eager past the recompile limit) and, with the linears that share an input fused, decodes what the eager
    model decodes; the prefill and anything run afterwards stay eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny()
    ids, mask = prompt()
    tokens = torch.randint(0, 128, (12, 2), generator=torch.Generator().manual_seed(2))
    eager = teacher_forced_logits(model, cache(method, model), ids, mask, tokens, graph=False, compile=False,
                                  fuse=False)
    fused = teacher_forced_logits(model, cache(method, model), ids, mask, tokens, graph=False, compile=True,
                                  fuse=True)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= model.config.num_hidden_layers + 3
    assert not any("forward" in vars(m) for m in model.modules())


@needs_cuda
@pytest.mark.parametrize("method", ["full", "holokv", "src"])
def test_cuda_compiled_graph_matches_eager(method):
    model = tiny(head_dim=64, device="cuda")
    ids, mask = prompt("cuda")
    tokens = torch.randint(0, 128, (40, 2), generator=torch.Generator().manual_seed(2)).cuda()
    eager = teacher_forced_logits(model, cache(method, model), ids, mask, tokens, graph=False, compile=False,
                                  fuse=False)
    fused = teacher_forced_logits(model, cache(method, model), ids, mask, tokens, graph=True, compile=True,
                                  fuse=True)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("vocab", [128256, 49152, 2048, 128, 4099, 1])  # Llama 3, SmolLM2, one chunk, a prime
def test_greedy_is_argmax(device, dtype, vocab):
    """Ties go to the first maximum and a NaN to the first NaN, as with argmax (on CUDA: the Triton passes); rows
    all -inf, a maximum in the last logit, the rows of a strided view (the model's last position)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 5, (8, 2, vocab), generator=g).to(device, dtype)[:, 1]  # many ties; rows strided
    logits[2, vocab // 3] = float("nan")
    logits[2, vocab // 2] = float("nan")
    logits[3] = 4
    logits[4] = -math.inf
    logits[5, -1] = 9
    logits[6, vocab // 2:] = float("nan")  # NaNs from the middle of another chunk on
    assert row_argmax.takes(logits) == (device == "cuda")
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert greedy(logits)[2] == vocab // 3 and greedy(logits)[5] == vocab - 1
    assert torch.equal(greedy(logits[:1]), logits[:1].argmax(-1))  # one sequence
