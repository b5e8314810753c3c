"""Distillation of LoRA adapters that let a model read a compressed (HoloKV) cache (``holokv distill``)."""
from .config import DistillConfig
from ..caches.prefill_attention import holo_prefill_attention
from .train import distill

__all__ = ["DistillConfig", "distill", "holo_prefill_attention"]
