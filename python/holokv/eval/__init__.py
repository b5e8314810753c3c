"""Quality-vs-memory evaluation of the caches in :mod:`holokv.caches` (``holokv eval``)."""
from .runner import TASKS, EvalConfig, run_eval

__all__ = ["TASKS", "EvalConfig", "run_eval"]
