"""One table of a distillation experiment folder (``scripts/distill_experiment.sh``): every training run's
``distill.json`` and every ``holokv eval`` below it, labelled by the adapter each row read.

    python -m holokv.distill.report FOLDER      # writes FOLDER/summary.txt and FOLDER/summary.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..eval.report import COLUMNS, table

TRAINING = [("run", "run", "{}"), ("method", "method", "{}"), ("k", "k", "{}"), ("mode", "mode", "{}"),
            ("steps", "steps", "{}"), ("tokens/s", "tokens_per_s", "{:.0f}"), ("KL start", "kl_start", "{:.4f}"),
            ("KL end", "kl_end", "{:.4f}"), ("ppl start", "ppl_start", "{:.3f}"), ("ppl end", "ppl_end", "{:.3f}"),
            ("teacher ppl", "ppl_teacher", "{:.3f}")]


def training_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*/distill.json")):
        log = json.loads(path.read_text())
        cfg, first, last = log["config"], log["held_out"][0], log["held_out"][-1]
        rows.append(dict(run=path.parent.name, method=cfg["method"], k=cfg["k"], mode=cfg["mode"],
                         steps=log["steps_done"], tokens_per_s=log["tokens_per_s"] or 0.0, kl_start=first["kl"],
                         kl_end=last["kl"], ppl_start=first["ppl"], ppl_end=last["ppl"],
                         ppl_teacher=last["ppl_teacher"]))
    return rows


def eval_rows(folder: Path) -> list[dict]:
    """Every evaluated (method, ratio) once, with ``adapter``: the training run whose adapter it read, or none;
    by ratio, then method, so that one method's rows with and without adapters sit together."""
    rows = {}
    for path in sorted(folder.glob("**/results.json")):
        result = json.loads(path.read_text())
        adapter = result["config"].get("adapter")
        label = Path(adapter).parent.name if adapter else "none"
        for run in result["runs"]:  # every eval runs the full cache: the same row again
            rows.setdefault((run["ratio"], run["spec"], label),
                            dict(adapter=label, **{k: v for k, v in run.items() if not isinstance(v, (list, dict))}))
    return [rows[key] for key in sorted(rows)]


def summarize(folder) -> str:
    folder = Path(folder)
    training, evals = training_rows(folder), eval_rows(folder)
    text = ""
    if training:
        text += "training (held-out KL and perplexity through the student's cache, at the first and last step)\n"
        text += table(training, TRAINING) + "\n"
    if evals:
        text += "evaluation (adapter: the training run merged into the model; none: the base model)\n"
        text += table(evals, [("adapter", "adapter", "{}"), *COLUMNS])
    (folder / "summary.json").write_text(json.dumps(dict(training=training, evaluation=evals), indent=1))
    (folder / "summary.txt").write_text(text)
    return text


if __name__ == "__main__":
    print(summarize(sys.argv[1]), end="")
