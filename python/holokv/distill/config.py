"""What a distillation run is, and every option checked before any model work (errors name the CLI flag)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..caches import HoloSpec, make_cache
from ..caches.options import choice, integer, real
from ..eval.model import DEFAULT_MODEL
from ..eval.runner import EvalConfig
from .prompt_cache import PROMPT_METHODS

# "full": the control, the same LoRA trained while the student reads the exact cache; the prompt-compressing
# caches' students read a compressed prompt from their continuation (prompt_cache.py)
METHODS = ("holokv", "full", *PROMPT_METHODS)
# Options a resumed run may change; any other must match the checkpoint's.
RESUMABLE = ("steps", "save_every", "time_limit", "resume", "device")


@dataclass
class DistillConfig:
    model: str = DEFAULT_MODEL
    method: str = "holokv"
    k: int = 4  # tokens per slot; k=1 superposes nothing (the same as method "full")
    ratio: float | None = None  # bytes budget of the cache the student reads; None: k for holokv (every stream
    # token superposed), required for the prompt-compressing methods (ratio k: HoloKV's bytes at k)
    continuation: int | None = None  # prompt-compressing methods: the last tokens of each sequence, read after the
    # compressed prompt; None: holokv eval's continuation
    mode: str = "aligned"
    sinks: int = 4
    slot_gain: float = 1.0
    window_slots: int | None = None  # the most recent slots the cache holds; None: all
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    steps: int = 1000
    batch: int = 8
    seq_len: int = 512
    lr: float = 2e-4
    warmup: int = 50  # linear warmup steps, then cosine decay to 0 at ``steps``
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient norm clip
    temperature: float = 1.0  # of both distributions in the KL (the loss is scaled by T^2)
    mse_weight: float = 0.0  # weight of the per-layer attention-output MSE against the teacher's
    train_text: str | None = None  # UTF-8 file; default: the training side of the pydoc topics split
    eval_text: str | None = None  # UTF-8 file; default: the held-out pydoc topics
    eval_seqs: int = 32  # held-out sequences for KL and perplexity
    save_every: int = 250  # checkpoint (and held-out evaluation) every so many steps
    time_limit: float | None = None  # seconds of training after which the run stops early (checkpointed)
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str = "holokv-distill"

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.out, "checkpoint.pt")

    def spec(self) -> HoloSpec | None:
        """The HoloKV cache the student reads; None where it reads another."""
        if self.method != "holokv" or self.k == 1:
            return None
        return HoloSpec(k=self.k, ratio=self.ratio or self.k, sinks=self.sinks, mode=self.mode,
                        slot_gain=self.slot_gain, window_slots=self.window_slots or 0)

    def prompt_len(self) -> int | None:
        """Prompt-compressing methods: the tokens of a sequence read as the prompt, the rest being the
        continuation; None for the others, whose every position reads the student's cache."""
        if self.method not in PROMPT_METHODS:
            return None
        continuation = self.continuation or EvalConfig.continuation
        if continuation >= self.seq_len:
            raise ValueError(f"--continuation {continuation} leaves no prompt in --seq-len {self.seq_len}")
        return self.seq_len - continuation

    def first_scored(self) -> int:
        """The first position whose prediction the loss and the held-out measures count: for prompt-compressing
        methods the last prompt position (it predicts the continuation's first token, which holokv eval scores;
        it reads the prompt exactly), so only the predictions of continuation tokens count; else 0."""
        prompt = self.prompt_len()
        return 0 if prompt is None else prompt - 1


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


CHECKS = {
    "method": choice(*METHODS),
    "k": integer(1), "sinks": integer(0), "rank": integer(1), "steps": integer(1), "batch": integer(1),
    "seq_len": integer(2), "warmup": integer(0), "eval_seqs": integer(1), "save_every": integer(1),
    "seed": integer(0), "window_slots": integer(1, none_ok=True), "continuation": integer(1, none_ok=True),
    "ratio": real(1, none_ok=True), "slot_gain": real(0, lo_open=True), "alpha": real(0, lo_open=True),
    "lora_dropout": real(0, 0.99), "lr": real(0, lo_open=True), "weight_decay": real(0), "clip": real(0, lo_open=True),
    "temperature": real(0, lo_open=True), "mse_weight": real(0), "time_limit": real(0, lo_open=True, none_ok=True),
    "dtype": choice("float32", "bfloat16"),  # float16 would need loss scaling
}


def check(cfg: DistillConfig) -> None:
    """Everything that needs no model: each bad value raises a ValueError naming its flag."""
    for name, test in CHECKS.items():
        test(flag(name), getattr(cfg, name))
    if not cfg.targets or not all(isinstance(t, str) and t for t in cfg.targets):
        raise ValueError(f"--targets must name at least one module, got {cfg.targets!r}")
    for name in ("train_text", "eval_text"):
        path = getattr(cfg, name)
        if path is not None:
            try:
                open(path, encoding="utf-8").close()
            except OSError as e:
                raise ValueError(f"{flag(name)} {path}: {e.strerror or e}") from e
    if cfg.train_text and cfg.eval_text and os.path.samefile(cfg.train_text, cfg.eval_text):
        raise ValueError("--train-text and --eval-text are the same file: evaluation text must be held out")
    try:
        cfg.spec()
    except ValueError as e:
        raise ValueError(f"--k/--ratio/--mode: {e}") from e
    if cfg.method in PROMPT_METHODS:
        if cfg.ratio is None:
            raise ValueError(f"--method {cfg.method} needs --ratio, its bytes budget (--ratio k holds what HoloKV "
                             "holds at k tokens per slot)")
        cfg.prompt_len()
    elif cfg.continuation is not None:
        raise ValueError(f"--continuation is for the students of {', '.join(PROMPT_METHODS)}: a --method "
                         f"{cfg.method} student reads its cache at every position")
    if cfg.resume and not os.path.exists(cfg.checkpoint):
        raise ValueError(f"--resume: no checkpoint in --out {cfg.out}")
    if not cfg.resume and os.path.exists(cfg.checkpoint):
        raise ValueError(f"--out {cfg.out} holds a checkpoint: pass --resume to continue it, or choose another --out")


def check_against(cfg: DistillConfig, config) -> None:
    """What needs the model's config (no weights): the student's cache for this model, the sequence length."""
    spec = cfg.spec()
    if spec is not None:
        make_cache("holokv", config, ratio=spec.ratio, k=spec.k, mode=spec.mode, sinks=spec.sinks,
                   slot_gain=spec.slot_gain, window_slots=cfg.window_slots)
    if cfg.method in PROMPT_METHODS:
        try:
            make_cache(cfg.method, config, ratio=cfg.ratio)
        except ValueError as e:
            raise ValueError(f"--method {cfg.method} --ratio {cfg.ratio:g}: {e}") from e
    most = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    if most is not None and cfg.seq_len > most:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's {most} positions")
