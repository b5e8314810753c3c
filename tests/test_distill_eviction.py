"""The students of the prompt-compressing caches (SnapKV, Top-K, Expected Attention, SRC) on a tiny random Llama:
every position's logits equal what the real cache serves when it prefills the prompt and decodes the continuation
(holokv eval's protocol), a wrong split or mask fails that comparison, gradients follow the documented rule, and
the loss decreases on a fixed batch."""
import types

import pytest
import torch
from test_eval import save_tiny_llama
from transformers import LlamaForCausalLM

from holokv.caches import make_cache, use_holokv_attention
from holokv.caches.hf_attention import CACHE_KWARG
from holokv.distill import objective, prompt_cache
from holokv.distill.prompt_cache import PROMPT_METHODS, PromptCacheReader
from holokv.distill.student import NAME, attending, with_lora

# a prompt whose kept entries do not fill the store's last block (filler to mask), long enough for SRC's
# centroids; the continuation as long as holokv eval's, so SRC runs a decode-time step (every 16 tokens)
PROMPT, CONTINUATION = 250, 32
SHARPEN, LOGIT_SCALE = 16.0, 30.0
TOL, WRONG = 1e-5, 1e-4  # logits within TOL of the cache's; a mutant's differ by more than WRONG somewhere


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny Llama with its queries and logits scaled up: random weights attend almost uniformly and predict
    almost uniformly, and then which tokens a cache keeps hardly matters."""
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path, 512)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN)
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(path)  # as the fixed-batch test loads it again
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, PROMPT + CONTINUATION), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def served(model, ids, method, ratio) -> torch.Tensor:
    """[B, N, vocab]: the prompt prefilled into a ``method`` cache, then the continuation decoded a token at a
    time, teacher-forced (holokv.eval.tasks.continuation_nll's protocol)."""
    use_holokv_attention(model)
    cache = make_cache(method, model.config, ratio=ratio)
    logits = [model(ids[:, :PROMPT], **{CACHE_KWARG: cache}).logits]
    for t in range(PROMPT, ids.shape[1]):
        logits.append(model(ids[:, t: t + 1], position_ids=torch.tensor([[t]]), **{CACHE_KWARG: cache}).logits)
    return torch.cat(logits, 1)


@torch.no_grad()
def student(model, ids, method, ratio, prompt=PROMPT) -> torch.Tensor:
    model.set_attn_implementation(NAME)
    with attending(PromptCacheReader(method, ratio, prompt, model.config)):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("ratio", [2, 4])
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_student_reads_what_the_cache_serves(model, ids, method, ratio):
    """Prompt rows exact, continuation rows the compressed prompt plus the exact continuation, at every layer
    (the logits are the last layer's); with a prompt one token longer or shorter the continuation differs."""
    expected = served(model, ids, method, ratio)
    torch.testing.assert_close(student(model, ids, method, ratio), expected, atol=TOL, rtol=TOL)
    for wrong in (PROMPT - 1, PROMPT + 1):
        tail = student(model, ids, method, ratio, wrong)[:, PROMPT + 1:]
        assert (tail - expected[:, PROMPT + 1:]).abs().max() > WRONG, wrong


def sees_the_future(mask, n):
    mask[..., -n:] = 0.0
    return mask


mask = prompt_cache.continuation_mask
MUTANTS = {
    "the continuation sees its future": lambda store, n: sees_the_future(mask(store, n), n),
    "filler entries visible": lambda store, n: mask(
        types.SimpleNamespace(k=store.k, bias=store.bias, lens=torch.full_like(store.lens, store.k.shape[2])), n),
    "log-mass dropped": lambda store, n: mask(types.SimpleNamespace(k=store.k, bias=None, lens=store.lens), n),
}


@pytest.mark.parametrize("mutant, method", [(m, method) for m in MUTANTS for method in ("snapkv", "src")
                                            if m != "log-mass dropped" or method == "src"])  # SRC's alone
def test_a_wrong_mask_fails_the_comparison(model, ids, method, mutant, monkeypatch):
    expected = served(model, ids, method, 2)
    monkeypatch.setattr(prompt_cache, "continuation_mask", MUTANTS[mutant])
    assert (student(model, ids, method, 2) - expected).abs().max() > WRONG


@pytest.mark.parametrize("method", ["snapkv", "src"])
def test_gradients_reach_the_prompt_through_selection_only(model, method):
    """The continuation's output reaches the prompt's keys and values through SnapKV's kept entries, not through
    SRC's fit (computed without gradient); the prompt rows are exact SDPA with gradient for both."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 80, 32, generator=g, requires_grad=True) for h in (4, 2, 2))
    read = PromptCacheReader(method, 2, 64, model.config)
    out = read(types.SimpleNamespace(layer_idx=0), q, k, v, None, 32 ** -0.5)
    out[:, 64:].square().sum().backward(retain_graph=True)
    assert q.grad[:, :, 64:].abs().sum() > 0 and q.grad[:, :, :64].abs().sum() == 0
    reached = [x.grad[:, :, :64].abs().sum() > 0 for x in (k, v)]
    assert reached == [PROMPT_METHODS[method]] * 2
    q.grad = None
    out[:, :64].square().sum().backward()
    assert q.grad[:, :, :64].abs().sum() > 0


@pytest.mark.parametrize("method", ["snapkv", "src"])
def test_loss_decreases_on_a_fixed_batch(model, ids, method):
    torch.manual_seed(0)
    lora = with_lora(LlamaForCausalLM.from_pretrained(model.name_or_path), 4, 8.0, 0.0, ["q_proj", "v_proj"])
    read = PromptCacheReader(method, 4, PROMPT, lora.config)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(10):
        loss, _ = objective.loss(lora, ids, read, temperature=1.0, mse_weight=1.0, first=PROMPT - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0 and losses[-1] < 0.75 * losses[0], losses
