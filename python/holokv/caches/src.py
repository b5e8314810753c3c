"""SRC cache layer: the prompt compacted once with :func:`holokv.compaction.compact`, then compressed while decoding.

After the (exact) prefill each sequence's prompt becomes kept tokens plus centroid
entries with a log-mass bias, sized to ``ceil(tokens / ratio)`` token-equivalents
of bytes (bias included); SnapKV's observation window (the last ``window`` prompt
queries) scores the tokens and is what the centroids are fitted for. Decoded tokens
are appended exact (bias 0); every ``every`` of them a compression step
(:meth:`SRCLayer.step`) bins and summarizes those that left the recent window.
Decode reads the entries with ``torch.ops.holokv.holo_decode`` and no superposed
slots: softmax(scale·q·kᵀ + bias)·v. Entries are unordered, positions live in the
(RoPE'd) keys. On CUDA the prompt compaction is replayed from a CUDA graph
(:class:`holokv.compaction.Graphed`) shared by all layers: their prompts have the same shapes,
so one capture per prompt length serves the whole model.
"""
from __future__ import annotations

import math

import torch
from torch.nn.utils.rnn import pad_sequence

from ..compaction import Graphed, causal_stats, check_info, compact, plan, pool_gqa, seed_score
from ..compaction.graph import LiveGraphs
from ..compaction.softmax import attend_before, entropy_chunked, logits, merge
from ..compaction.compact import BIN_ORDERS, entry_elems, fit
from ..compaction.summarize import summarize_bins
from ..compaction.scores import attention_mass, protect_mask, take
from .base import FullLayer
from .expected import carried, expected_scores, prompt_gaussian
from .future_queries import SOURCES, Heard, gaussian, replayed
from .kvzip import ACROSS, ReadsBack
from .select import INF, head_budgets
from .store import rows

# what decides which prompt tokens stay exact: the window's attention mass, the seed's mass − λ·entropy, Expected
# Attention's expected scores or KVzip's reconstruction scores (the last two at the prompt only: steps use "mass")
SCORES = ("mass", "seed", "expected", "recon")
SHRINK_TO = ("window", "mean")  # what ridge shrinks the centroid values toward (summarize.softmax_ls_centroids)
MASSES = ("fit", "prior")  # the centroids' log-masses: fitted to the reference queries, or the bins' own
# The value fit's ridge, relative to mean diag(AᵀA): on the tuning text less shrinkage fits better at every ratio
# (8 > 1 > 0.125 > 0.03 ≈ 0.01 in perplexity), while the floor alone (0) breaks down at 2x
# (bench/results/eval_cpu_src_reference_tune*, eval_cpu_src_ridge_tune); 0.03 keeps a margin from that edge.
RIDGE = 0.03
CENTROID_SHARE = 1 / 8  # default bin size: centroids take about this share of the budget (bench/src_quality.py)
# every="auto": a compression step per this share of the prompt's budget in generated tokens, at least every
# MIN_EVERY. A step reads the whole cache, so its cost grows with the budget: spacing the steps alike keeps their
# amortized share of a decode step constant (a few percent on the H200 at 16 x 16K), while the tokens waiting
# for the next step stay within 1/STEP_SHARE of the budget.
STEP_SHARE, MIN_EVERY = 64, 16
COMPACT = Graphed(compact)  # one graph per prompt shape, replayed by every layer


def default_bin(rank: int, ratio: float) -> int:
    """The default bin size: centroids take about CENTROID_SHARE of a budget of 1/ratio of the tokens."""
    return max(2 * rank, math.ceil(rank * ratio / CENTROID_SHARE))


def ragged(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-sequence [1, H, n_b, ...] tensors -> [B, H, max n_b, ...], zero-filled past each n_b."""
    return pad_sequence([p[0].transpose(0, 1) for p in parts], batch_first=True).transpose(1, 2).contiguous()


class LateCheck:
    """Solver failures of a compression step, raised at the next step (the last step's at the next prompt,
    or by :meth:`flush`): by then the count's copy to the host has long finished, so reading it never waits
    on the GPU queue (check_info would drain it)."""

    def __init__(self):
        self.pending = None  # (count on the host, CUDA event of its copy or None)

    def __call__(self, info: torch.Tensor) -> None:
        self.flush()
        count = (info != 0).sum(dtype=torch.int32)
        if count.is_cuda:
            host, done = torch.empty((), dtype=count.dtype, pin_memory=True), torch.cuda.Event()
            host.copy_(count, non_blocking=True)
            done.record()
            self.pending = host, done
        else:
            self.pending = count, None

    def flush(self) -> None:
        """Raise on the pending count (waits for its copy only)."""
        if self.pending is not None:
            count, done = self.pending
            self.pending = None
            if done is not None:
                done.synchronize()
            if count.item():
                raise torch.linalg.LinAlgError(f"{count.item()} batched factorizations failed")


class SRCLayer(ReadsBack, FullLayer):
    """Options: ``method`` of the summary ("softmax_ls": fitted values and log-mass, or "seed": the source method's
    linear read-out), ``score`` deciding what stays exact ("mass": window attention, "seed": mass − ``lam``·row entropy,
    "expected": Expected Attention's scores with RoPE averaged over the next ``future`` positions, "recon": KVzip's
    scores from its reconstruction pass; the last two at the prompt only, decode-time steps score by "mass"), ``rank``
    centroids per bin of ``bin_size`` tokens evicted from the prompt (default: centroids take about 1/8 of the budget;
    "head", with adaptive budgets: of each head's own) or of ``decode_bin`` tokens evicted while decoding (default
    2·rank·ratio: centroids take about half the stream's budget, so that a filling bin, which is held exact, stays small
    against it), ``ridge`` of the value fit (default RIDGE) and ``shrink_to`` what it shrinks the values toward
    ("window": each bin's output averaged over the reference queries, or "mean": its plain mass-weighted mean value,
    which does not depend on them), ``mass`` the centroids' log-masses ("fit": shifted to the reference queries'
    log-partitions, or "prior": the bin's mass alone), ``window`` observation queries, ``sinks`` and ``recent`` tokens
    always kept exact, ``future_queries`` (default 0) stand-ins for the queries asked after the prompt that the prompt's
    summaries are also fitted for, from ``future_source`` (:mod:`~.future_queries`: "replay", prompt queries moved to
    positions spread over the next ``future``; "gaussian", draws from Expected Attention's query model placed there;
    "recon", queries of KVzip's reconstruction pass), ``every``: generated tokens (counted per layer) between
    decode-time compression steps: None (the default) for none, decoded tokens then staying exact (with 256-token
    continuations on the tuning text every step cost quality: bench/results/eval_cpu_src_decode_policy_tune/), "auto"
    for max(16, ceil(budget / 64)), budget = ceil(longest prompt / ratio) entries (see STEP_SHARE). A prompt fed in
    several chunks is compacted after its first one; the later chunks are decoded (and compressed) token by token. Where
    an option uses the reconstruction pass (score="recon", future_source="recon") the prompt is held whole until the
    pass (:class:`~.kvzip.KVzipCache` runs it after the prompt's forward, worded with its ``tokenizer``) and compacted
    after it (:meth:`compress`). ``adaptive`` (with every=None) shares each sequence's budget among its KV heads
    (AdaKV); ``across="model"`` (with score="recon") pools the shares over every head of every layer, as KVzip does
    (:meth:`~.kvzip.KVzipCache.pool_budgets`), so a layer holds what its heads win of the model's budget. ``bin_order``
    ("position", "key" or "tree", :func:`~holokv.compaction.compact`) is what puts evicted prompt tokens side by side in
    a bin.

    While decoding, each sequence's entries are [settled | bin | tail]: settled holds the compacted prompt
    and what earlier steps kept or summarized, the bin exact tokens waiting for summary (first in, first
    summarized), the tail the exact tokens not reviewed yet, in order: the prompt's recent window (when the
    prefill kept it whole, for every sequence), then the generated tokens. A step reviews the tail tokens
    that have left the recent window: the last ``window`` queries score them as at prefill; the top k stay
    exact, the rest join the bin, and each full bin becomes ``rank`` centroids fitted for those queries with
    every other entry as context.

    How many stay exact: the stream (that recent window, r0 tokens, plus the t generated ones) may hold what
    its tokens add to the budget, r0 + ⌊t / ratio⌋ token-equivalents (the prefill paid for the r0); the
    compacted prompt keeps its ceil(prompt / ratio), so together they stay within ceil(seen / ratio). Of the
    stream's entries, the tail comes first; the reviewed tokens get the rest under the prefill's rule
    (:func:`holokv.compaction.compact.fit`): the most kept exact such that kept + ⌈binned / decode_bin⌉·rank fits.
    k is that count minus the tokens kept before (never negative: kept tokens stay). Like the prefill's
    plan, this counts the filling bin as the ``rank`` centroids it will become, so the cache holds up to
    decode_bin − rank − 1 entries more while a bin fills, and up to every − 1 tokens more between steps;
    ratio 1 keeps everything. Where even the centroids do not fit (right after the prompt, or bins that
    compress less than the ratio) every reviewed token is binned. All counts are Python ints shared by the
    batch (the stream's budget does not depend on the prompt), so steps never sync with the host, their shapes
    depend on how many tokens they review alone (the other counts go to the device, :meth:`rebuild_end`: on CUDA
    each layer replays its steps from a graph), and a left-padded sequence is compressed as it would be alone (r0
    is the batch's smallest).

    :meth:`nbytes` counts, besides the entries, the queries the steps score with (the last ``window``; for
    score="seed" the whole tail's, for the row entropies): memory the other caches do not need. The budget
    rule above leaves them out, so SRC's bytes per token exceed 1/ratio by their share; never the full cache's:
    a batch with a prompt whose compaction does not pay for them and the decoded tokens' log-masses
    (:meth:`compacts`; a count shared by the batch, like r0) holds the full cache for that generation.

    With every=None no step ever bins a decoded token, so none needs a log-mass: they go to the store's slots
    (``exact_slots``), one token a slot under the phase key 1 (no superposition, no log-mass; holo_decode reads
    slots and entries in one softmax), and each costs exactly what it costs the full cache. Held in the entries,
    with the log-mass column the store keeps for every entry, they would each cost one element per KV head more,
    and a long enough generation would outgrow what the prompt's compaction saved.
    """

    def __init__(self, ratio: float = 1.0, method: str = "softmax_ls", score: str = "mass", rank: int = 4,
                 ridge: float = RIDGE, window: int = 32, bin_size: int | str | None = None, sinks: int = 4,
                 recent: int = 32, lam: float = 0.5, every: int | str | None = None, decode_bin: int | None = None,
                 future_queries: int = 0, future: int = 512, future_source: str = "replay", shrink_to: str = "window",
                 adaptive: float | None = None, across: str = "layer", bin_order: str = "position", mass: str = "fit",
                 rotary=None):
        FullLayer.__init__(self)
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        if method not in ("softmax_ls", "seed"):  # "evict" is the snapkv/topk cache
            raise ValueError(f"method must be 'softmax_ls' or 'seed', got {method!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        bin_size = bin_size or default_bin(rank, ratio)
        decode_bin = decode_bin or max(2 * rank, math.ceil(2 * rank * ratio))
        for name, size in (("bin_size", default_bin(rank, ratio) if bin_size == "head" else bin_size),
                           ("decode_bin", decode_bin)):
            if not 0 < rank < size:
                raise ValueError(f"need 0 < rank < {name}, got rank={rank}, {name}={size}")
        if not 0 < window <= recent:
            raise ValueError(f"need 0 < window <= recent (the observation window stays exact), got "
                             f"window={window}, recent={recent}")
        if every not in (None, "auto") and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every (generated tokens between compression steps) must be a positive int, 'auto' "
                             f"or None, got {every!r}")
        if future_source not in SOURCES:
            raise ValueError(f"future_source must be one of {SOURCES}, got {future_source!r}")
        if future_source != "replay" and not future_queries:
            raise ValueError(f"future_source={future_source!r} says where the future_queries stand-ins come from: it "
                             f"needs future_queries > 0")
        if shrink_to not in SHRINK_TO:
            raise ValueError(f"shrink_to must be one of {SHRINK_TO}, got {shrink_to!r}")
        if mass not in MASSES:
            raise ValueError(f"mass must be one of {MASSES}, got {mass!r}")
        if adaptive is not None and every is not None:
            raise ValueError(f"adaptive (head-adaptive budgets) needs every=None: decode-time compression steps keep "
                             f"one count per sequence, got every={every!r}")
        if across not in ACROSS:
            raise ValueError(f"across must be one of {ACROSS}, got {across!r}")
        if across == "model" and (score != "recon" or adaptive is None):
            raise ValueError(f"across='model' pools the head budgets of every layer by KVzip's scores: it needs "
                             f"score='recon' and adaptive (the share each head keeps at least), got score={score!r}, "
                             f"adaptive={adaptive!r}")
        if bin_order not in BIN_ORDERS:
            raise ValueError(f"bin_order must be one of {BIN_ORDERS}, got {bin_order!r}")
        self.adaptive, self.across, self.bin_order = adaptive, across, bin_order
        self.pooled = None  # [B, Hkv] token-equivalents per head, from the model-wide ranking (across="model")
        needs = self.rotary_for(score, future_queries, future_source)
        if needs and rotary is None:
            raise ValueError(f"SRC's {needs} moves prompt queries to future positions: it needs the model's rotary "
                             f"embedding (make_cache passes it)")
        self.future_queries, self.future, self.future_source = future_queries, future, future_source
        self.rotary, self.shrink_to, self.mass = rotary, shrink_to, mass
        self.reads_back = score == "recon" or (future_queries > 0 and future_source == "recon")
        # while the prompt waits for the reconstruction pass: its queries, and the pass's (future_source="recon")
        self.prompt_q = self.heard = None
        self.exact_slots = False  # whether decoded tokens go to the slots (every=None; see the class docstring)
        self.ratio, self.method, self.score, self.lam, self.every_option = ratio, method, score, lam, every
        self.every = None  # this generation's (compress_prompt): None while the layer holds the full cache
        self.rank, self.ridge, self.window, self.bin_size, self.decode_bin, self.sinks, self.recent = (
            rank, ridge, window, bin_size, decode_bin, sinks, recent)
        # seed centroids carry no log-mass, so only softmax_ls stores (and pays for) a bias per entry
        self.log_mass = method == "softmax_ls"
        self.late_check = LateCheck()
        self.step_graphs = LiveGraphs()  # the compression steps' graphs (on CUDA), on this layer's buffers

    @staticmethod
    def rotary_for(score: str = "mass", future_queries: int = 0, future_source: str = "replay", **_) -> str | None:
        """The option (as it reads in messages) that needs the model's rotary embedding, or None."""
        if score == "expected":
            return "score='expected'"
        return "future_queries" if future_queries and future_source != "recon" else None

    def steps_every(self, n: int) -> int | None:
        """Generated tokens between steps for a batch whose longest prompt has n tokens (the option resolved)."""
        if self.every_option != "auto":
            return self.every_option
        return max(MIN_EVERY, math.ceil(max(1, math.ceil(n / self.ratio)) / STEP_SHARE))

    def query_cap(self, every: int | None) -> int:
        """The scoring queries are state too (held, and counted in nbytes, while decoding): a ring of the tail's
        last queries, written in place by each decode step; this many."""
        return self.window if self.score != "seed" else self.recent + (every or 1)

    batch_state = FullLayer.batch_state + ("q_ring",)

    def prefill(self, q, k, v, mask, scale, pads):
        # stream counts (see the class docstring): recent window taken over from the prompt, generated,
        # reviewed and of those kept exact
        self.r0 = self.generated = self.reviewed = self.kept = 0
        self.step_graphs.clear()  # captured on the last prompt's buffers
        self.step_counts = torch.zeros(3, dtype=torch.long, device=self.device).unbind()  # a step's, filled by it
        return super().prefill(q, k, v, mask, scale, pads)

    @property
    def held_k(self) -> torch.Tensor:
        """[B, Hkv, width, d]: the entries as far as the longest sequence's (entries past lens are filler)."""
        return self.store.k[:, :, :self.width]

    @property
    def held_v(self) -> torch.Tensor:
        return self.store.v[:, :, :self.width]

    @property
    def held_bias(self) -> torch.Tensor | None:
        return None if self.store.bias is None else self.store.bias[:, :, :self.width]

    @property
    def lens(self) -> torch.Tensor:
        return self.store.lens

    def decode(self, q, k, v, scale):
        """Append one token per sequence (to the slots where ``exact_slots``), and its query to the ring; every
        sequence grows by one."""
        self.check_scored()
        self.count_token()
        if self.exact_slots:
            self.append_slot(k, v)
        else:
            self.store.append(k, v)
        if self.every:
            self.q_ring.index_copy_(2, self.q_at, q.unsqueeze(2))
            self.q_at.add_(1).remainder_(self.q_cap)
        return self.store.decode(q, scale)

    def append_slot(self, k, v) -> None:
        """One exact token per sequence, k, v [B, Hkv, d], in the store's next slot (in place; see exact_slots)."""
        s = self.store
        torch.ops.holokv.append_entries(rows(k), rows(v), s.k_slots, s.v_slots, s.slot_lens)

    def reserve(self, tokens: int, exact: bool = False) -> None:
        if not self.exact_slots:
            return super().reserve(tokens, exact)
        self.store.reserve(self.width, self.generated + tokens, exact)  # the entries are done: only slots grow

    def after_token(self) -> None:
        super().after_token()
        if not self.exact_slots:  # slots are not entries
            self.width += 1
        self.generated += 1
        self.q_written += 1
        if self.every and self.generated % self.every == 0:
            self.step(self.scale)

    def end_prefill(self) -> None:
        COMPACT.clear()  # the captured compactions hold their own memory pools

    def bound(self, seen: int) -> int:
        if self.scores is not None:  # the prompt held for the reconstruction pass, which stores nothing
            return self.width
        if not self.every:
            return self.width + seen - self.seen  # every decode step adds one entry
        # the steps to come, planned from the counts alone: each decode step adds an entry, each compression step
        # removes what it summarizes; its static window (rebuild_end) reads and writes up to decode_bin rows past
        # the end and its padded centroids up to one step's bins' past that
        width = most = self.width
        generated, reviewed, kept = self.generated, self.reviewed, self.kept
        for _ in range(seen - self.seen):
            width, generated = width + 1, generated + 1
            most = max(most, width)
            plan = self.plan_step(generated, reviewed, kept) if generated % self.every == 0 else None
            if plan is not None:
                n_new, n_keep, _, n_bins = plan
                width -= n_bins * (self.decode_bin - self.rank)
                reviewed, kept = reviewed + n_new, kept + n_keep
        return most + self.decode_bin + (self.decode_bin - 1 + self.every) // self.decode_bin * self.rank

    def kept_queries(self) -> int:
        """Queries the steps need: the observation window, or for score="seed" the whole tail's."""
        return self.window if self.score != "seed" else self.r0 + self.generated - self.reviewed

    @property
    def queries(self) -> torch.Tensor:
        """[B, Hq, m, d]: the last m = kept_queries() queries in order (the ring unrolled)."""
        m = min(self.q_written, self.kept_queries())
        oldest = (self.q_at + torch.arange(self.q_cap, device=self.device)) % self.q_cap  # the next write's first
        return self.q_ring.index_select(2, oldest[self.q_cap - m:])

    def nbytes(self) -> int:
        held = 0 if not self.every else min(self.q_written, self.kept_queries()) * self.q_ring[:, :, 0].nbytes
        return self.store.nbytes() + held

    def plan_step(self, generated: int, reviewed: int, kept: int) -> tuple[int, int, int, int] | None:
        """(n_new reviewed, n_keep of them kept exact, n_bin waiting in the bin before, n_bins full bins to
        summarize) of a step after ``generated`` tokens, ``reviewed`` and ``kept`` of them so far, or None where
        it reviews nothing: Python ints alone."""
        n_new = self.r0 + generated - reviewed - self.recent
        if n_new <= 0:
            return None
        n_keep, n_bin = self.n_exact(n_new, generated, reviewed, kept), (reviewed - kept) % self.decode_bin
        return n_new, n_keep, n_bin, (n_bin + n_new - n_keep) // self.decode_bin

    def n_exact(self, n_new: int, generated: int, reviewed: int, kept: int) -> int:
        """How many of the ``n_new`` tokens a step reviews stay exact (the rule of the class docstring)."""
        head_dim = self.store.k.shape[3]
        t, tail = generated, self.r0 + generated - reviewed - n_new
        if t <= math.floor(t / self.ratio):  # ratio 1: every token fits as it is
            return n_new
        room = self.r0 + math.floor(t / self.ratio) * 2 * head_dim // entry_elems(self.method, head_dim)
        try:
            target = fit(reviewed + n_new, room - tail, bin_size=self.decode_bin, rank=self.rank)[0]
        except ValueError:  # not even the bins' centroids fit yet (just after the prompt): bin them all
            target = 0
        return min(n_new, max(0, target - kept))

    def visible(self, m: int, width: int, group: int, rows: int | None = None) -> torch.Tensor:
        """[B, 1, group·rows, width]: the entries seen by the queries of the first ``rows`` (default all) of
        the tail's last m tokens, as pooled GQA rows: everything but the tail tokens after them and filler."""
        back = torch.arange(m - 1, m - 1 - (rows or m), -1, device=self.device).repeat(group).view(1, 1, -1, 1)
        return torch.arange(width, device=self.device) <= (self.lens - 1).view(-1, 1, 1, 1) - back

    def step(self, scale) -> None:
        """Review the tail tokens that have left the recent window: keep the top k exact, bin the rest,
        summarize full bins. The counts are Python ints (no host sync); the work (:meth:`rebuild_end`) reads them
        from the device and has shapes that depend only on how many tokens are reviewed, so on CUDA each layer
        replays it from a graph (:class:`~holokv.compaction.graph.LiveGraphs`) captured on its own buffers."""
        plan = self.plan_step(self.generated, self.reviewed, self.kept)
        if plan is None:
            return
        n_new, n_keep, n_bin, n_bins = plan
        self.reviewed += n_new
        self.kept += n_keep
        if n_keep == n_new and n_bin == 0:  # nothing binned: the reviewed tokens are settled where they are
            return
        for count, n in zip(self.step_counts, (n_keep, n_bin, n_bins)):
            count.fill_(n)
        work = lambda: self.rebuild_end(n_new, n_bins > 0, scale)
        if self.device.type == "cuda" and self.graphed:
            buffers = (self.store.k, self.store.v, self.store.bias, self.lens, self.q_ring, self.q_at)
            info = self.step_graphs((n_new, n_bins > 0, self.window_rows(), scale,
                                     *(x.data_ptr() for x in buffers if x is not None)), work)
        else:
            info = work()
        self.width -= n_bins * (self.decode_bin - self.rank)
        if n_bins:
            self.late_check(info)

    def rebuild_end(self, n_new: int, summarize: bool, scale) -> torch.Tensor | None:
        """A step's work, in place: every sequence's [bin | tail] end becomes [kept | centroids | rest of the bin |
        rest of the tail], its n_keep, n_bin and n_bins (bins to summarize, > 0 where ``summarize``) read from
        ``step_counts`` -> the summaries' failures (info [B, Hkv]) or None. Static shapes: the end is read and
        rewritten through a window of decode_bin − 1 + tail rows (any n_bin), the bins padded to the most n_new
        tokens can fill (their entries' log-mass dtype min: :func:`~holokv.compaction.summarize.summarize_bins`
        fits the real ones as if alone). The observation queries read the cache once: the entries before the window
        in one fused pass up to the capacity (masked by ``lens``), the window's in fp32; both the scores (over
        everything) and the centroids' context (everything but the binned tokens) come from that."""
        s, dev = self.store, self.device
        B, H, W, d = s.k.shape
        n_keep, n_bin, n_bins = self.step_counts
        tail, m = self.recent + n_new, self.window_rows()
        size, most = self.decode_bin - 1 + tail, (self.decode_bin - 1 + n_new) // self.decode_bin
        arange = lambda n: torch.arange(n, device=dev).expand(B, H, n)
        j = arange(size)
        start = (self.lens - n_bin - tail).view(B, 1, 1)
        rows = (start + j).clamp(max=W - 1)  # room is reserved (bound()): the clamp never moves a row in use
        window = [take(x, rows) for x in (s.k, s.v)]
        obs = self.observation()
        before = attend_before(obs, s.k, s.v, s.bias, start.view(B), scale)
        # query i of the observation window (row r: i = r mod m) is window entry n_bin + tail − m + i
        own = n_bin + tail - m + torch.arange(obs.shape[2], device=dev) % m
        near = logits(obs, window[0].float(), None if s.bias is None else take(s.bias, rows).float(),
                      j[0, 0] <= own[:, None], scale)  # [B, H, rows, size]
        lse = torch.logaddexp(before[1], near.logsumexp(-1))
        # the scores of the reviewed tokens, as at prefill: the attention mass the observation queries give them
        part = near.gather(-1, (n_bin + arange(n_new)).unsqueeze(2).expand(B, H, near.shape[2], n_new))
        score = (part - lse.unsqueeze(-1)).exp().sum(-2) * (H / self.q_ring.shape[1])  # window_mass's scale
        if self.score == "seed":
            score = seed_score(score, self.tail_entropy(tail, n_new, scale), self.lam)
        # Top-k with k = n_keep on the device: evicted then kept, each in entry order (as split() orders them)
        order = score.argsort(-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, arange(n_new))
        perm = (rank < n_keep).to(torch.int8).argsort(dim=-1, stable=True)
        pick = lambda i: n_bin + perm.gather(-1, i.clamp(0, n_new - 1))  # the i-th of perm, as a window row
        binned = lambda i: torch.where(i < n_bin, i, pick(i - n_bin))  # the bin's own tokens, then the evicted
        n_full, n_cent = n_bins * self.decode_bin, n_bins * self.rank
        n_left = n_bin + n_new - n_keep - n_full  # binned tokens left in the filling bin
        n_end = n_keep + n_cent + n_left + self.recent
        rest = j - n_keep - n_cent  # past the centroids
        src = torch.where(j < n_keep, pick(n_new - n_keep + j),
                          torch.where(rest < 0, j,  # the centroids' rows, written below
                                      torch.where(rest < n_left, binned(n_full + rest),
                                                  torch.where(j < n_end, n_bin + n_new + rest - n_left, j))))
        info = None
        if summarize:
            at = binned(arange(most * self.decode_bin).remainder(n_full.clamp(min=1)))  # padding repeats real bins
            bins = [x.gather(2, at[..., None].expand(B, H, at.shape[2], d)).float().view(B, H, most, -1, d)
                    for x in window]
            pad = (torch.arange(most, device=dev) >= n_bins).view(1, 1, most, 1)
            b_bins = torch.zeros(B, H, most, self.decode_bin, device=dev).masked_fill(pad, torch.finfo().min)
            context = None
            if self.method == "softmax_ls":  # the context: every entry but the binned ones
                hidden = torch.zeros(B, H, 1, size, dtype=torch.bool, device=dev).scatter_(3, at.unsqueeze(2), True)
                near = near.masked_fill(hidden, -math.inf)
                context = merge(before, (torch.softmax(near, -1) @ window[1].float(), near.logsumexp(-1)))
            kc, vc, bc, info = summarize_bins(self.method, obs, context, *bins, b_bins, self.rank, self.ridge, scale,
                                              shrink_to=self.shrink_to, mass=self.mass, bins=n_bins)
        for x, w in zip((s.k, s.v), window):
            x.scatter_(2, rows[..., None].expand(B, H, size, d), w.gather(2, src[..., None].expand(B, H, size, d)))
        if s.bias is not None:  # the end holds exact tokens only: bias 0 but for the centroids
            s.bias.scatter_(2, rows, 0.0)
        if summarize:
            c = arange(most * self.rank)
            at = (start + torch.where(c < n_cent, n_keep + c, n_end + c - n_cent)).clamp(max=W - 1)  # padding: past
            for x, y in zip((s.k, s.v), (kc, vc)):
                x.scatter_(2, at[..., None].expand(B, H, c.shape[2], d), y.to(x.dtype))
            if s.bias is not None:
                s.bias.scatter_(2, at, bc.to(s.bias.dtype))
        self.lens.copy_(start.view(B) + n_end)
        return info

    def window_rows(self) -> int:
        """m: the observation queries (the tail's last m tokens'), each a row per query head of its group."""
        return min(self.q_written, self.kept_queries(), self.window)

    def observation(self) -> torch.Tensor:
        """[B, Hkv, G·m, d] fp32: the last m queries, pooled per KV head (:func:`pool_gqa`)."""
        return pool_gqa(self.queries[:, :, -self.window:].float(), self.store.k.shape[1])

    def tail_entropy(self, tail: int, n_new: int, scale) -> torch.Tensor:
        """[B, Hkv, n_new] score="seed"'s entropy term: the entropy of each reviewed token's own attention row over
        the cache (up to its capacity, read in its dtype a chunk at a time; the tail's queries are all kept for
        "seed"), averaged over its group."""
        k = self.store.k
        H, G = k.shape[1], self.q_ring.shape[1] // k.shape[1]
        rows = pool_gqa(self.queries[:, :, :n_new].float(), H)
        h = entropy_chunked(rows, k, self.store.bias, self.visible(tail, k.shape[2], G, n_new), scale)
        return h.view(k.shape[0], H, G, n_new).mean(2)

    def compacts(self, n: int, every: int | None, heads: int, kv_heads: int, head_dim: int) -> bool:
        """Whether compacting an n-token prompt to ceil(n / ratio) token-equivalents saves the bytes the layer
        then holds besides its tokens' K and V, so that it never holds more than the full cache would: the scoring
        queries (up to :meth:`query_cap`, heads·head_dim elements each, a token being kv_heads·2·head_dim) and the
        log-mass (one element) of each decoded token it holds before its steps catch up. The steps hold at most their
        budget plus C = recent + decode_bin + every entries (the tail, a filling bin, a step's tokens), so the
        decoded tokens all stay only while t <= C·ratio / (ratio − 1). (With every=None the decoded tokens hold no
        log-mass, see exact_slots: any saving pays.) If it does not pay (ratio 1, short prompts) the layer holds the
        full cache: exact tokens, no log-mass, no queries, no steps."""
        saved = (n - max(1, math.ceil(n / self.ratio))) * kv_heads * 2 * head_dim
        if saved <= 0 or not every:
            return saved > 0
        held = math.ceil((self.recent + self.decode_bin + every) * self.ratio / (self.ratio - 1))
        return saved >= self.query_cap(every) * heads * head_dim + self.log_mass * held * kv_heads

    def compress_prompt(self, q, k, v, mask, scale, pads) -> None:
        """Compact each sequence's prompt (pads cut off, so each gets its own budget) and store them ragged,
        centroids first: the kept tokens follow in order, so the recent window ends every sequence and
        starts the decode stream's tail when the prefill kept it whole. Where the options use the reconstruction
        pass, hold the prompt for it instead (:meth:`compress` compacts it after)."""
        self.late_check.flush()  # the previous generation's last step: the prefill syncs anyway
        self.scale, self.exact_slots = scale, False
        valid = [k.shape[2] - pad for pad in self.pads]
        every = self.steps_every(max(valid))
        held = not all(self.compacts(n, every, q.shape[1], k.shape[1], k.shape[3]) for n in valid)  # batch's count
        if held or self.reads_back:
            self.every, self.store.bias = None, None
            self.width, self.q_written = max(valid), 0
            if held:
                return FullLayer.compress_prompt(self, q, k, v, mask, scale, pads)
            self.hold(q, k, v, mask, scale, pads)
            self.prompt_q = q
            self.heard = Heard(self.future_queries, valid) if self.future_source == "recon" else None
            return
        self.compact_prompt(q, k, v, every)

    def prompt_bin(self, share: int, budget: int) -> int:
        """Tokens a bin for a head whose ``share`` of the sequence's ``budget`` it compacts to: bin_size, or for
        "head" the default's rule at the head's own ratio, so that centroids take their share of its budget."""
        if self.bin_size != "head":
            return self.bin_size
        return default_bin(self.rank, self.ratio * budget / max(share, 1))

    def compact_heads(self, qb, kb, vb, budget: int, score, row_entropy, q_future, bin_size: int):
        """One sequence's prompt (or one KV head's, with its query heads) compacted to ``budget`` token-equivalents
        in bins of ``bin_size`` -> (keys, values, log-masses) [1, H, m, ...] with the centroids first, and the count
        kept exact."""
        n, d, method = kb.shape[2], kb.shape[3], self.method
        try:
            n_keep = plan(n, budget, method=method, head_dim=d, bin_size=bin_size, rank=self.rank)[0]
        except ValueError:  # too short a prompt for one bin's centroids: keep what the bytes allow
            budget, method = budget * 2 * d // entry_elems(method, d), "evict"
            n_keep = min(n, budget)
        c, info = COMPACT(qb[:, :, -self.window:], kb, vb, budget=budget, method=method, score=score,
                          row_entropy=row_entropy, lam=self.lam, bin_size=bin_size, rank=self.rank,
                          n_sink=self.sinks, n_recent=self.recent, ridge=self.ridge, shrink_to=self.shrink_to,
                          mass=self.mass, scale=self.scale, q_future=q_future, bin_order=self.bin_order)
        check_info(info)  # once per prompt and layer: the host sync is affordable
        return *(torch.cat([x[:, :, n_keep:], x[:, :, :n_keep]], 2) for x in (c.k, c.v, c.bias)), n_keep

    def head_shares(self, score: torch.Tensor, budget: int) -> list[int]:
        """``adaptive``: each KV head's budget, AdaKV's shares (:func:`~.select.head_budgets`) of the sequence's
        Hkv·budget by the scores [1, Hkv, n] that pick the exact tokens (the sinks and the recent window first)."""
        n = score.shape[2]
        pos = torch.arange(n, device=score.device)
        ranked = score.masked_fill(protect_mask(pos, self.sinks, n - self.recent), INF).sort(-1, descending=True)
        return head_budgets(ranked.values, torch.tensor([budget], device=score.device), self.adaptive)[0].tolist()

    def ranked_scores(self, scores, pos) -> torch.Tensor:
        """KVzip's scores [B, Hkv, n] (left-aligned, ``pos`` an entry's index from the first real token) as
        across="model" ranks them: the sinks and the recent window, which stay exact, first; pads last."""
        valid = self.n_valid.view(-1, 1, 1)
        return scores.masked_fill(protect_mask(pos, self.sinks, valid - self.recent), INF).masked_fill(pos >= valid,
                                                                                                       -INF)

    def reconstruct(self, q, k, v, scale) -> torch.Tensor:
        """The pass's queries read the held prompt (:class:`ReadsBack`); some are kept (:class:`Heard`)."""
        if self.heard is not None:
            self.heard.add(q, self.recon.tolist())  # the pass is part of the prefill: it may sync
        return super().reconstruct(q, k, v, scale)

    def compress(self) -> None:
        """After the reconstruction pass: the held prompt, back in the prompt's layout (left pads), is compacted
        with what the pass gave (its scores, its queries)."""
        n, pads = self.scores.shape[2], torch.tensor(self.pads, device=self.device)
        back = (torch.arange(n, device=self.device) - pads[:, None]).clamp(min=0)  # undoes left_aligned
        k, v = (take(x[:, :, :n], back) for x in (self.store.k, self.store.v))
        self.recon_scores, self.scores = take(self.scores, back), None  # KVzip's, for score="recon"
        self.store = self.new_store(k)
        self.compact_prompt(self.prompt_q, k, v, self.steps_every(max(n - p for p in self.pads)))
        self.prompt_q = self.recon_scores = self.heard = None

    def prompt_score(self, b: int, qb, kb, vb, scale):
        """What decides which of sequence b's prompt tokens stay exact (qb, kb, vb: its queries, keys and values,
        pads cut off): a score compact() computes ("mass", "seed"), or the scores [1, Hkv, n] themselves."""
        if self.score == "expected":
            n = kb.shape[2]
            model = prompt_gaussian(qb, torch.arange(n, device=kb.device).view(1, 1, n), self.rotary, self.sinks)
            return expected_scores(*carried(*model, self.rotary, self.future), kb, vb, scale)
        if self.score == "recon":
            return self.recon_scores[b: b + 1, :, self.pads[b]:]
        return self.score

    def stand_ins(self, b: int, qb) -> torch.Tensor | None:
        """[1, Hq, M, d]: the future_queries of future_source standing for those after sequence b's prompt (qb its
        queries, pads cut off), or None."""
        if not self.future_queries:
            return None
        if self.future_source == "recon":
            return self.heard.queries(b).float()
        make = replayed if self.future_source == "replay" else gaussian
        return make(qb, self.future_queries, self.sinks, self.future, self.rotary)

    def compact_prompt(self, q, k, v, every: int | None) -> None:
        """The prompt (q, k, v with left pads) compacted, sequence by sequence (with ``adaptive``, head by head, each
        to its share of the sequence's budget); ``every`` the steps' spacing."""
        scale = self.scale
        self.every, self.q_cap = every, self.query_cap(every)
        parts, tails = [], []
        for b, pad in enumerate(self.pads):
            # fp32: the solves (eigh, Cholesky) have no half-precision kernels
            qb, kb, vb = (x[b: b + 1, :, pad:].float() for x in (q, k, v))
            n = kb.shape[2]
            budget = max(1, math.ceil(n / self.ratio))
            score, q_future = self.prompt_score(b, qb, kb, vb, scale), self.stand_ins(b, qb)
            row_entropy = causal_stats(qb, kb, scale)[1] if self.score == "seed" else None
            if self.adaptive is None:
                *entries, n_keep = self.compact_heads(qb, kb, vb, budget, score, row_entropy, q_future,
                                                      self.prompt_bin(budget, budget))
                parts.append(entries)
                # all of the sinks and the recent window kept (the split keeps protected tokens first)
                tails.append(min(self.recent, n) if n_keep >= min(n, self.sinks + self.recent) else 0)
                continue
            if isinstance(score, str):  # computed once: it both shares the budget and picks each head's tokens
                mass = attention_mass(qb[:, :, -self.window:], kb, scale)
                score = seed_score(mass, row_entropy, self.lam) if score == "seed" else mass
            G, heads = qb.shape[1] // kb.shape[1], []
            shares = self.head_shares(score, budget) if self.pooled is None else self.pooled[b].tolist()
            for h, share in enumerate(shares):
                one = lambda x, g=1: x if x is None else x[:, h * g: (h + 1) * g]
                heads.append(self.compact_heads(one(qb, G), one(kb), one(vb), share, one(score), None,
                                                one(q_future, G), self.prompt_bin(share, budget))[:3])
            parts.append([ragged([x.transpose(0, 1) for x in head]).transpose(0, 1) for head in zip(*heads)])
            parts[-1].append(torch.tensor([[x[0].shape[2] for x in heads]], device=self.device))
        self.pooled = None
        keys, values, bias = (ragged([p[i] for p in parts]).to(k.dtype) for i in range(3))
        lens = (torch.tensor([p[0].shape[2] for p in parts], device=self.device) if self.adaptive is None
                else torch.cat([p[3] for p in parts]))
        self.store.write(keys, values, lens, bias)
        self.width, self.q_written, self.exact_slots = keys.shape[2], 0, not self.every and self.log_mass
        if self.every:
            self.r0 = min(tails)  # a count shared by the batch (see the class docstring)
            first = q[:, :, q.shape[2] - min(self.r0, self.kept_queries()):]
            self.q_ring = q.new_zeros(*q.shape[:2], self.q_cap, q.shape[3])
            self.q_written = first.shape[2]
            self.q_ring[:, :, :self.q_written] = first
            self.q_at = torch.tensor([self.q_written % self.q_cap], device=self.device)
