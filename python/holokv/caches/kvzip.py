"""KVzip's cache: the tokens the model reads back when it is asked to repeat the context.

Scoring needs the whole model, not one layer: after the prompt's forward, :class:`KVzipCache` runs a second
forward (``after_forward``, called by the hook that :func:`~.hf_attention.use_holokv_attention` puts on the
model) over a request to repeat the context followed by the context itself, reading the held prompt. Every layer
records, per prompt entry, the largest weight a reconstruction query pays it (:class:`ReadsBack`), then keeps its
best-scored entries. Long prompts are reconstructed ``chunk`` tokens per pass, as in the paper. SRC uses the same
pass for its reference queries and scores (its ``future_source`` and ``score`` options).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compaction.softmax import logits, pool_gqa
from .base import CompressedCache, FullLayer
from .hf_attention import CACHE_KWARG
from .select import INF, SelectionLayer, budget, head_budgets

FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk a later chunk's request quotes, so the model knows where to resume
QUERIES = 256  # reconstruction queries scored at a time: memory O(QUERIES · G · prompt)
ACROSS = ("model", "layer")  # what head-adaptive budgets pool over, the default first
# the share of its budget a head keeps whatever it scores: the paper's 0.2 was behind 0.4 at 4x and 8x on the tuning
# text (bench/results/eval_cpu_kvzip_pooled_tune_floor/: +1.10 / +3.33 against +1.23 / +3.58; 0.6 +0.87 / +3.44)
ADAPTIVE = 0.4
UNSCORED = ("the prompt was not scored: its reconstruction pass (KVzip's) runs after the prompt's forward through "
            "the hook holokv.caches.use_holokv_attention(model) installs; call the model it was given to")


def requests(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the request to repeat the first chunk, of the request to go on with a later one, and of what
    closes a request (the chat template's turn to the assistant, else a newline); all empty without a tokenizer,
    where the model just reads the context a second time."""
    if tokenizer is None:
        return [], [], []
    close = "\n"
    if getattr(tokenizer, "chat_template", None):
        mark = "\u2063"  # invisible, so no template rewrites it: what follows it closes the user's turn
        close = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                              tokenize=False).split(mark, 1)[1]
    return [tokenizer.encode(text, add_special_tokens=False) for text in (FIRST, LATER, close)]


class ReadsBack:
    """A layer's part in the reconstruction pass, mixed in before its FullLayer base: :meth:`hold` keeps the whole
    prompt (pads cut off) for the pass; while it runs (``recon`` set by :class:`KVzipCache`) the new tokens' queries
    read it (:meth:`reconstruct`) and ``scores`` rises to KVzip's score; then the cache calls the layer's
    ``compress``. A layer still holding its prompt must not decode (:meth:`check_scored`)."""

    scores = None  # [B, Hkv, n] fp32 while the held prompt waits for its reconstruction pass
    across = "layer"  # KVzip's option: where head-adaptive budgets pool (SRC's layers pool nothing)
    recon = None  # [B] left pads of the reconstruction input while a pass runs

    def hold(self, q, k, v, mask, scale, pads) -> None:
        """Hold the whole prompt (pads cut off) until the reconstruction pass has scored it."""
        FullLayer.compress_prompt(self, q, k, v, mask, scale, pads)
        self.scores = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)

    def check_scored(self) -> None:
        if self.scores is not None:
            raise RuntimeError(UNSCORED)

    def attend(self, q, mask, scale):
        if self.recon is None:
            return super().attend(q, mask, scale)
        (k, v), self.pending = self.pending, None
        return self.reconstruct(q, k, v, scale)

    def reconstruct(self, q, k, v, scale) -> torch.Tensor:
        """The reconstruction queries q [B, Hq, m, d] read the held prompt and, causally, their own tokens k, v
        [B, Hkv, m, d] (pads hidden): the output [B, m, Hq, d] goes on through the model, and each prompt entry's
        score rises to the largest weight a real query of its group pays it. Nothing is stored; fp32."""
        s, pads = self.store, self.recon.view(-1, 1, 1)
        B, Hkv, m, d = k.shape
        n, G = self.scores.shape[2], q.shape[1] // Hkv
        keys, vals = (torch.cat([x[:, :, :n], y], 2).float() for x, y in ((s.k, k), (s.v, v)))
        col = torch.arange(n + m, device=k.device)
        outs = []
        for a in range(0, m, QUERIES):
            row = torch.arange(a, min(m, a + QUERIES), device=k.device)[:, None]  # [c, 1]
            seen = torch.where(col < n, col < self.n_valid.view(-1, 1, 1), (col - n >= pads) & (col - n <= row))
            w = logits(pool_gqa(q[:, :, a: a + QUERIES].float(), Hkv), keys, mask=seen.unsqueeze(1).repeat(1, 1, G, 1),
                       scale=scale).softmax(-1)  # [B, Hkv, G·c, n + m]: rows group after group
            outs.append((w @ vals).view(B, q.shape[1], len(row), d))
            real = (row.view(1, -1) >= pads.view(-1, 1)).view(B, 1, 1, -1, 1)
            best = w[..., :n].view(B, Hkv, G, len(row), n).masked_fill(~real, 0).amax((2, 3))
            torch.maximum(self.scores, best, out=self.scores)
        return torch.cat(outs, 2).transpose(1, 2).to(q.dtype)


class KVzipLayer(ReadsBack, SelectionLayer):
    """KVzip (Kim et al. 2025), query-agnostic: a prompt entry's score is the largest weight any query of its GQA
    group pays it while the model reconstructs the context (:class:`KVzipCache`); the first ``sinks`` tokens are
    kept. One-shot, like SnapKV; ``adaptive`` gives head-adaptive budgets, pooled over the layer's heads
    (``across="layer"``) or, as in the paper, over every head of every layer (``across="model"``, the default: the
    cache ranks all the layers' scores together once the pass has run, so a layer holds what its heads win).
    The defaults (model-wide, each head at least ADAPTIVE of its share) were chosen on the tuning text
    (bench/results/eval_cpu_kvzip_pooled_tune*/: per-layer budgets were far behind at every ratio)."""

    def __init__(self, ratio: float = 1.0, sinks: int = 4, adaptive: float | None = ADAPTIVE, across: str = ACROSS[0]):
        super().__init__(ratio, adaptive)
        if across not in ACROSS:
            raise ValueError(f"across must be one of {ACROSS}, got {across!r}")
        if across == "model" and adaptive is None:
            raise ValueError("across='model' pools head-adaptive budgets: it needs adaptive (the share each head "
                             "keeps at least, 0 for none); with adaptive=None give across='layer'")
        self.sinks, self.across = sinks, across
        self.pooled = None  # [B, Hkv] entries per head, from the model-wide ranking (across="model")

    compress_prompt = ReadsBack.hold

    def compress(self) -> None:
        """Keep the best-scored entries of the held prompt (left-aligned: an entry's row is its index from the
        sequence's first real token) in a store of their size."""
        n = self.scores.shape[2]
        k, v = self.store.k[:, :, :n], self.store.v[:, :, :n]
        self.store = self.new_store(k)
        SelectionLayer.compress_prompt(self, None, k, v, None, None, torch.zeros_like(self.n_valid))

    def prompt_scores(self, q, k, v, mask, scale, pos):
        scores, self.scores = self.scores, None
        return self.ranked_scores(scores, pos)

    def ranked_scores(self, scores, pos) -> torch.Tensor:
        """KVzip's scores with the sinks first and pads (``pos`` past the valid tokens) last."""
        return scores.masked_fill(pos >= self.n_valid.view(-1, 1, 1), -INF).masked_fill(pos < self.sinks, INF)

    def head_lens(self, ranked, keep):
        if self.pooled is None:
            return super().head_lens(ranked, keep)
        lens, self.pooled = self.pooled, None
        return lens

    def bound(self, seen: int) -> int:
        if self.scores is not None:  # not scored yet: the prompt and nothing more (a reconstruction stores nothing)
            return self.scores.shape[2] - min(self.pads)
        return super().bound(seen)

    def decode(self, q, k, v, scale):
        self.check_scored()
        return super().decode(q, k, v, scale)


class KVzipCache(CompressedCache):
    """The cache of layers that take part in the reconstruction pass (:class:`ReadsBack`: KVzip's, and SRC's where
    its options use the pass). ``tokenizer`` words the request to repeat the context (without one the model reads
    the context a second time, unasked); ``chunk``: context tokens reconstructed per forward."""

    cache_options = ("tokenizer", "chunk")

    def __init__(self, layers: list[KVzipLayer], method: str, ratio: float, tokenizer=None, chunk: int = 2048):
        super().__init__(layers, method, ratio)
        self.first, self.later, self.close = requests(tokenizer)
        self.chunk = chunk

    @torch.no_grad()
    def after_forward(self, model, input_ids: torch.Tensor | None) -> None:
        """After the prompt's forward (``input_ids`` [B, n], left-padded): score it by reconstruction, compress."""
        head = self.layers[0]
        if head.scores is None or head.recon is not None:  # nothing waits, or this is a reconstruction's forward
            return
        if input_ids is None:
            raise ValueError("kvzip repeats the prompt's tokens: give the prompt as input_ids, not inputs_embeds")
        contexts = [ids[p:] for ids, p in zip(input_ids, head.pads)]
        for c in range(-(-max(len(t) for t in contexts) // self.chunk)):
            self.reconstruct(model, [self.request(t, c) for t in contexts])
        if head.across == "model":
            self.pool_budgets()
        for layer in self.layers:
            layer.compress()

    def pool_budgets(self) -> None:
        """across="model": the budgets of every head of every layer pooled (:func:`~.select.head_budgets` over the
        layers' heads side by side), each layer's share handed to it for its compression."""
        head = self.layers[0]
        n, H = head.scores.shape[2], head.scores.shape[1]
        pos = torch.arange(n, device=head.scores.device).view(1, 1, n)
        ranked = torch.cat([layer.ranked_scores(layer.scores, pos).sort(-1, descending=True).values
                            for layer in self.layers], 1)  # [B, L·Hkv, n]
        lens = head_budgets(ranked, budget(head.n_valid, self.ratio), head.adaptive)
        for i, layer in enumerate(self.layers):
            layer.pooled = lens[:, i * H: (i + 1) * H]

    def request(self, tokens: torch.Tensor, c: int) -> torch.Tensor:
        """A sequence's reconstruction input for chunk ``c``: the request, then the chunk (empty past its end)."""
        a = c * self.chunk
        part = tokens[a: a + self.chunk]
        if not len(part):
            return part
        ask = self.first if c == 0 else self.later + tokens[max(0, a - OVERLAP): a].tolist()
        return torch.cat([part.new_tensor(ask + self.close), part])

    def reconstruct(self, model, inputs: list[torch.Tensor]) -> None:
        """One forward over each sequence's ``inputs`` (left-padded), placed after its prompt."""
        m = max(len(x) for x in inputs)
        ids = torch.stack([F.pad(x, (m - len(x), 0)) for x in inputs])
        pads = torch.tensor([m - len(x) for x in inputs], device=ids.device)
        positions = (self.layers[0].n_valid[:, None] + torch.arange(m, device=ids.device) - pads[:, None]).clamp(min=0)
        for layer in self.layers:
            layer.recon = pads
        try:
            model(ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: self})
        finally:
            for layer in self.layers:
                layer.recon = None
