"""The tables of a distillation experiment folder (``scripts/distill_experiment.sh``): every training run's
``distill.json``, every ``holokv eval`` below it labelled by the adapter each row read, and the rows that answer
issue 12: at equal bytes, each cache untrained, with the control's adapter and with the adapter trained through
that cache itself, against the full cache; and summary.png, a plot of the held-out perplexity over training and of
those equal-bytes rows.

    python -m holokv.distill.report FOLDER      # writes FOLDER/summary.txt, summary.json and summary.png
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from ..eval.report import COLUMNS, table
from ..eval.runner import parse_method

TRAINING = [("run", "run", "{}"), ("method", "method", "{}"), ("k", "k", "{}"), ("mode", "mode", "{}"),
            ("ratio", "ratio", "{:g}"), ("steps", "steps", "{}"), ("tokens/s", "tokens_per_s", "{:.0f}"),
            ("KL start", "kl_start", "{:.4f}"), ("KL end", "kl_end", "{:.4f}"), ("ppl start", "ppl_start", "{:.3f}"),
            ("ppl end", "ppl_end", "{:.3f}"), ("teacher ppl", "ppl_teacher", "{:.3f}")]

EQUAL_BYTES = [("ratio", "ratio", "{:g}"), ("cache", "spec", "{}"), ("ppl untrained", "ppl", "{:.3f}"),
               ("ppl + control LoRA", "ppl_control", "{:.3f}"), ("ppl + own LoRA", "ppl_own", "{:.3f}"),
               ("own vs full", "own_vs_full", "{:+.1%}"), ("own LoRA", "own", "{}"),
               ("passkey untrained", "passkey", "{:.2f}"), ("passkey + own LoRA", "passkey_own", "{:.2f}")]


def trained_cache(cfg: dict) -> tuple:
    """(method, ratio, k, mode) of the cache a training run's student read (k and mode: HoloKV's only)."""
    if cfg["method"] == "full":
        return "full", 1.0, None, None
    if cfg["method"] == "holokv":
        return "holokv", float(cfg["ratio"] or cfg["k"]), cfg["k"], cfg["mode"]
    return cfg["method"], float(cfg["ratio"]), None, None


def evaluated_cache(row: dict) -> tuple:
    """The same for an evaluated row (HoloKV's mode defaults to aligned)."""
    name, options = parse_method(row["spec"])
    if name != "holokv":
        return name, float(row["ratio"]), None, None
    return name, float(row["ratio"]), options.get("k"), options.get("mode", "aligned")


def training_logs(folder: Path) -> dict[str, dict]:
    """run name -> its distill.json, in name order."""
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(folder.glob("*/distill.json"))}


def training_rows(logs: dict[str, dict]) -> list[dict]:
    rows = []
    for run, log in logs.items():
        cfg, first, last = log["config"], log["held_out"][0], log["held_out"][-1]
        method, ratio, k, mode = trained_cache(cfg)
        rows.append(dict(run=run, method=method, k=k, mode=mode, ratio=ratio, steps=log["steps_done"],
                         tokens_per_s=log["tokens_per_s"] or 0.0, kl_start=first["kl"], kl_end=last["kl"],
                         ppl_start=first["ppl"], ppl_end=last["ppl"], ppl_teacher=last["ppl_teacher"]))
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


def equal_bytes_rows(training: list[dict], evals: list[dict]) -> list[dict]:
    """Per cache evaluated untrained (by ratio): its perplexity untrained, with the control's adapter (trained
    through the exact cache) and with its own (trained through this very cache: method, ratio, HoloKV's k and
    mode), the last relative to the untrained full cache's; passkey untrained and with its own adapter."""
    caches = {row["run"]: (row["method"], row["ratio"], row["k"], row["mode"]) for row in training}
    control = [run for run, cache in caches.items() if cache[0] == "full"]
    full = next((r["ppl"] for r in evals if r["adapter"] == "none" and r["spec"] == "full" and "ppl" in r), None)
    rows = []
    for base in (r for r in evals if r["adapter"] == "none"):
        row = {key: base[key] for key in ("ratio", "spec", "ppl", "passkey") if key in base}
        for r in evals:
            if r["spec"] != base["spec"] or r["ratio"] != base["ratio"] or r["adapter"] not in caches:
                continue
            if r["adapter"] in control:
                row["ppl_control"] = r.get("ppl")
            elif caches[r["adapter"]] == evaluated_cache(r):
                row.update(own=r["adapter"], ppl_own=r.get("ppl"), passkey_own=r.get("passkey"))
                if full and r.get("ppl") is not None:
                    row["own_vs_full"] = r["ppl"] / full - 1
        rows.append(row)
    return rows


def shown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """table() of the ``columns`` some row has, formatted beforehand: "-" where a row has no value."""
    columns = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    text = [{key: "-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in columns} for r in rows]
    return table(text, [(title, key, "{}") for title, key, _ in columns])


def plot(curves: dict[str, list[dict]], equal: list[dict], path: Path) -> None:
    """Left: each run's held-out perplexity (``curves``: run -> its ``held_out``) over training, against its
    teacher's. Right: each cache of the equal-bytes rows untrained, with the control's LoRA and with its own,
    against the untrained full cache and 10% above it (issue 12's bar). Log y axes: compressed caches can be off
    by orders of magnitude. A panel without data is left out (with neither, no file); each panel's legend sits
    below it, off the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    bars = [(key, label) for key, label in (("ppl", "untrained"), ("ppl_control", "+ control LoRA"),
                                            ("ppl_own", "+ own LoRA")) if any(r.get(key) is not None for r in equal)]
    panels = [panel for panel, data in (("training", curves), ("equal", bars)) if data]
    if not panels:  # no training run and no perplexity evaluated
        return
    widths = dict(training=7.0, equal=max(6.0, 0.6 * len(equal)))
    fig = plt.figure(figsize=(sum(widths[p] for p in panels), 6.5), layout="constrained")
    # a subfigure per panel: its legend goes under its own axes, whatever their tick labels take
    figs = dict(zip(panels, fig.subfigures(1, len(panels), width_ratios=[widths[p] for p in panels],
                                           squeeze=False)[0]))
    if curves:
        ax = figs["training"].subplots()
        for run, held_out in curves.items():
            ax.plot([h["step"] for h in held_out], [h["ppl"] for h in held_out], "-o", markersize=3, label=run)
        teachers = {}  # a prompt-compressing run scores only the continuation: its teacher's perplexity differs
        for run, held_out in curves.items():
            teachers.setdefault(f"{held_out[-1]['ppl_teacher']:.4g}", []).append(run)
        for style, (ppl, runs) in zip(("--", "-.", ":") * len(teachers), teachers.items()):
            which = f" of {', '.join(runs)}" if len(teachers) > 1 else ""
            ax.axhline(float(ppl), color="k", linewidth=1, linestyle=style,
                       label=textwrap.fill(f"teacher (full cache, no adapter){which}", 50))
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out perplexity through the student's cache")
        ax.set_title("held-out perplexity during training", fontsize=10)
        ax.grid(alpha=0.3)
        figs["training"].legend(loc="outside lower center", ncol=2, fontsize=8)
    if bars:
        ax = figs["equal"].subplots()
        width = 0.8 / len(bars)
        for i, (key, label) in enumerate(bars):  # a row without the value lacks the bar
            at = [(g + (i - (len(bars) - 1) / 2) * width, r[key]) for g, r in enumerate(equal)
                  if r.get(key) is not None]
            ax.bar(*zip(*at), width, color=f"C{i}", label=label)
        full = next((r["ppl"] for r in equal if r["spec"] == "full" and r.get("ppl") is not None), None)
        if full is not None:
            ax.axhline(full, color="k", linewidth=1, linestyle="--", label="full cache, untrained")
            ax.axhline(1.1 * full, color="k", linewidth=1, linestyle=":", label="within 10% of the full cache")
        ax.set_xticks(range(len(equal)), [f"{_short(r['spec'])} {r['ratio']:g}x" for r in equal], rotation=35,
                      ha="right", fontsize=8)
        ax.set_ylabel("perplexity (holokv eval)")
        ax.set_title("at equal bytes (cache, ratio): untrained and with LoRA", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        figs["equal"].legend(loc="outside lower center", ncol=3, fontsize=8)
    for sub in figs.values():  # minor ticks in plain numbers: under a decade they are the only labels, else 2.54x10^2
        sub.axes[0].set_yscale("log")
        sub.axes[0].yaxis.set_minor_formatter(LogFormatter())
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(spec: str) -> str:
    """A method spec as words: holokv:k=2:mode=aligned:prefill=superposed -> holokv k=2 aligned superposed."""
    name, options = parse_method(spec)
    return " ".join([name, *(v if isinstance(v, str) else f"{k}={v}" for k, v in options.items())])


def summarize(folder) -> str:
    folder = Path(folder)
    logs = training_logs(folder)
    training, evals = training_rows(logs), eval_rows(folder)
    equal = equal_bytes_rows(training, evals)
    text = ""
    if training:
        text += "training (held-out KL and perplexity through the student's cache, at the first and last step;\n"
        text += "prompt-compressing methods: over the continuation's predictions)\n"
        text += shown(training, TRAINING) + "\n"
    if equal:
        text += "at equal bytes (ratio): each cache untrained, with the control's LoRA (trained through the exact\n"
        text += "cache) and with its own (trained through that cache); own vs full: against the untrained full cache\n"
        text += shown(equal, EQUAL_BYTES) + "\n"
    if evals:
        text += "evaluation (adapter: the training run merged into the model; none: the base model)\n"
        text += table(evals, [("adapter", "adapter", "{}"), *COLUMNS])
    (folder / "summary.json").write_text(json.dumps(dict(training=training, equal_bytes=equal, evaluation=evals),
                                                    indent=1))
    (folder / "summary.txt").write_text(text)
    plot({run: log["held_out"] for run, log in logs.items()}, equal, folder / "summary.png")
    return text


if __name__ == "__main__":
    print(summarize(sys.argv[1]), end="")
