"""Table and plot of an evaluation grid."""
from __future__ import annotations

COLUMNS = [("method", "spec", "{}"), ("ratio", "ratio", "{:g}"), ("bytes/tok", "bytes_per_token", "{:.0f}"),
           ("achieved", "achieved_ratio", "{:.2f}x"), ("end bytes/tok", "end_bytes_per_token", "{:.0f}"),
           ("ppl", "ppl", "{:.3f}"), ("ppl 95% CI", "ppl_ci", "[{0[lo]:.3f}, {0[hi]:.3f}]"),
           ("ppl - full [95% CI]", "ppl_vs_full", "{0[diff]:+.3f} [{0[lo]:+.3f}, {0[hi]:+.3f}]"),
           # at the row's ratio: minus the lowest perplexity, or for the lowest, minus the runner-up's
           ("ppl - best [95% CI]", "ppl_vs_best", "{0[diff]:+.3f} [{0[lo]:+.3f}, {0[hi]:+.3f}]"),
           ("passkey", "passkey", "{:.2f}"),
           ("passkey - full [95% CI]", "passkey_vs_full", "{0[diff]:+.2f} [{0[lo]:+.2f}, {0[hi]:+.2f}]"),
           ("ruler", "ruler", "{:.2f}"),
           ("ruler - full [95% CI]", "ruler_vs_full", "{0[diff]:+.2f} [{0[lo]:+.2f}, {0[hi]:+.2f}]"),
           ("attn cos", "cosine", "{:.4f}"), ("attn relL2", "rel_l2", "{:.4f}"), ("prefill s", "prefill_s", "{:.3f}")]
# Plot panels: (key, title, y scale); a key with "{key}_ci" gets error bars.
PANELS = [("ppl", "continuation perplexity (lower is better)", "log"),  # compressed caches can be off by orders
          ("ppl_vs_full", "perplexity - full cache's, paired 95% CI", "symlog"),
          ("passkey", "passkey accuracy", "linear"), ("ruler", "RULER-style accuracy", "linear"),
          ("cosine", "attention-output cosine vs exact", "linear")]


def table(runs: list[dict], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    """``columns`` (title, key, format) that any row has, one line per row, blank where a row has none."""
    cols = [(title, key, fmt) for title, key, fmt in columns if any(key in r for r in runs)]
    rows = [[title for title, _, _ in cols]] + [[fmt.format(r[key]) if key in r else "" for _, key, fmt in cols]
                                                for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _value(run: dict, key: str) -> tuple[float, list[float]]:
    """(the run's ``key``, its error bar below and above: 0 where no interval was computed)."""
    value, ci = run[key], run.get(f"{key}_ci")
    if isinstance(value, dict):  # a difference to the full cache, with its interval
        value, ci = value["diff"], value
    # a percentile interval can miss its point estimate (skewed draws): clamp the bars
    return value, [max(value - ci["lo"], 0.0), max(ci["hi"] - value, 0.0)] if ci else [0.0, 0.0]


def plot(runs: list[dict], path, cfg) -> None:
    """Quality vs bytes per token, one panel per metric, one curve per method, the full cache starred; the error
    bars are the bootstrap 95% intervals. The legend takes a spare panel, or a band under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = [panel for panel in PANELS if panel[0] in runs[0]]
    if "bytes_per_token" not in runs[0] or not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    specs = list(dict.fromkeys(r["spec"] for r in runs[1:]))
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for spec in specs + ["full"]:
            pts = sorted((r["bytes_per_token"], *_value(r, key)) for r in runs if r["spec"] == spec)
            x, y, err = zip(*pts)
            style = dict(fmt="k*", markersize=14, label="full cache") if spec == "full" else dict(
                fmt="-o", label=_wrapped(spec))
            ax.errorbar(x, y, yerr=list(zip(*err)), capsize=3, **style)
        if key.endswith("_vs_full"):
            ax.axhline(0, color="k", linewidth=0.8)  # an interval that crosses it is no difference
        ax.set_xscale("log")
        # bytes span less than a decade: label 1, 2 and 5 times powers of ten, not every minor tick
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale(scale)
        if scale == "symlog":  # its locator may put ticks at the limits: short labels there
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_xlabel("bytes per token held (all layers)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    band = 0.0  # inches under the panels for the legend, where no panel is spare
    if len(panels) < axes.size:
        axes.flat[len(panels)].legend(handles, labels, loc="center", fontsize=8)
    else:
        ncol = min(3, len(labels))
        per_col = -(-len(labels) // ncol)  # the legend fills its columns in order
        lines = max(sum(l.count("\n") + 1 for l in labels[i: i + per_col]) for i in range(0, len(labels), per_col))
        band = 0.3 + 0.17 * lines
        fig.set_figheight(fig.get_figheight() + band)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(f"{cfg.model}, context {cfg.context} tokens", fontsize=11)
    fig.tight_layout(rect=(0, band / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _wrapped(spec: str, width: int = 48) -> str:
    """A method's spec on lines of at most ``width`` characters, broken before its option separators."""
    first, *options = spec.split(":")
    lines = [first]
    for piece in (":" + o for o in options):
        if len(lines[-1]) + len(piece) > width:
            lines.append(piece)
        else:
            lines[-1] += piece
    return "\n".join(lines)
