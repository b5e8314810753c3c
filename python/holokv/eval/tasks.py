"""The evaluation tasks. Each takes the model and ``new_cache()`` (a fresh cache of the
method under test) and returns plain numbers. Compression happens when the context
is prefilled; everything after it reads the compressed cache at true positions."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .model import CACHE_KWARG


def _positions(start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)[None]


@torch.no_grad()
def continuation_nll(model, new_cache, window: torch.Tensor, context: int) -> dict:
    """The tokens after ``context`` in ``window``: their NLL summed (``nll_sum``) and counted (``tokens``);
    bytes per token held after the prefill and after the continuation; seconds the prefill took with its
    compression (``prefill_s``: KVzip's includes its reconstruction pass).

    The context is prefilled (and compressed); the continuation is then decoded one token at a
    time, teacher-forced, as in generation. The two byte counts differ for the one-shot methods
    (SnapKV, Top-K), which append decoded tokens exact, and for none of those that compress while
    decoding (StreamingLLM, H2O, SRC).
    """
    cache = new_cache()
    ids = window[None].to(model.device)
    start = time.perf_counter()
    logits = model(ids[:, :context], position_ids=_positions(0, context, ids.device), **{CACHE_KWARG: cache}).logits
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    prefill_s = time.perf_counter() - start
    held = cache.bytes_per_token()
    preds = [logits[:, -1]]
    for t in range(context, ids.shape[1] - 1):
        preds.append(model(ids[:, t: t + 1], position_ids=_positions(t, 1, ids.device),
                           **{CACHE_KWARG: cache}).logits[:, -1])
    nll = F.cross_entropy(torch.cat(preds).float(), ids[0, context:], reduction="sum")
    return dict(nll_sum=nll.item(), tokens=ids.shape[1] - context, bytes_per_token=held,
                end_bytes_per_token=cache.bytes_per_token(), prefill_s=prefill_s)


@dataclass
class Prompt:
    """A sample of a question-answering task (passkey, RULER): the context is prefilled and compressed, the
    question comes only after (query-agnostic compression)."""
    context: list[int]
    question: list[int]
    score: Callable[[str], float]  # of the decoded greedy answer, in [0, 1]
    max_new_tokens: int
    info: dict  # what the sample is, for results.json


@torch.no_grad()
def answer(model, new_cache, tokenizer, prompt: Prompt) -> str:
    """Prefill the context (compressing it), then ask; the greedy answer, decoded."""
    cache = new_cache()
    ctx = torch.tensor([prompt.context], device=model.device)
    model(ctx, position_ids=_positions(0, ctx.shape[1], ctx.device), **{CACHE_KWARG: cache})
    full = torch.cat([ctx, torch.tensor([prompt.question], device=ctx.device)], 1)
    out = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=prompt.max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id, **{CACHE_KWARG: cache})
    return tokenizer.decode(out[0, full.shape[1]:], skip_special_tokens=True)


def passkey_match(key: str, output: str) -> float:
    """1 if the output's first digits are the key."""
    return float("".join(c for c in output if c.isdigit())[: len(key)] == key)


def match_all(answers: list[str], output: str) -> float:
    """RULER's string_match_all: the share of ``answers`` found in the output, ignoring case."""
    output = output.lower()
    return sum(a.lower() in output for a in answers) / len(answers)


def _attention_outputs(model):
    """Hooks recording each layer's attention output (input of o_proj) into a list, and their handles."""
    seen = []
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].float()))
               for layer in model.model.layers]
    return seen, handles


@torch.no_grad()
def attention_outputs(model, new_cache, window: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """(per layer, the attention output of the decode query (last token of ``window``) after prefilling the
    rest; bytes per context token held after the prefill)."""
    cache = new_cache()
    ids = window[None].to(model.device)
    n = ids.shape[1] - 1
    model(ids[:, :n], position_ids=_positions(0, n, ids.device), **{CACHE_KWARG: cache})
    held = cache.bytes_per_token()
    seen, handles = _attention_outputs(model)
    try:
        model(ids[:, n:], position_ids=_positions(n, 1, ids.device), **{CACHE_KWARG: cache})
    finally:
        for h in handles:
            h.remove()
    return [s[0, -1] for s in seen], held


def fidelity(outputs: list[torch.Tensor], exact: list[torch.Tensor]) -> dict:
    """Per-layer cosine similarity and relative L2 error of attention outputs against the exact ones."""
    cos = [F.cosine_similarity(o, e, 0).item() for o, e in zip(outputs, exact)]
    rel = [((o - e).norm() / e.norm()).item() for o, e in zip(outputs, exact)]
    return dict(cosine=sum(cos) / len(cos), rel_l2=sum(rel) / len(rel), cosine_per_layer=cos,
                rel_l2_per_layer=rel)
