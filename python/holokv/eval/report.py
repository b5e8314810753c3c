"""Table and plot of an evaluation grid."""
from __future__ import annotations

COLUMNS = [("method", "spec", "{}"), ("ratio", "ratio", "{:g}"), ("bytes/tok", "bytes_per_token", "{:.0f}"),
           ("achieved", "achieved_ratio", "{:.2f}x"), ("end bytes/tok", "end_bytes_per_token", "{:.0f}"),
           ("ppl", "ppl", "{:.3f}"), ("passkey", "passkey", "{:.2f}"),
           ("attn cos", "cosine", "{:.4f}"), ("attn relL2", "rel_l2", "{:.4f}"), ("prefill s", "prefill_s", "{:.3f}")]


def table(runs: list[dict], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    """``columns`` (title, key, format) that the first row has, one line per row."""
    cols = [(title, key, fmt) for title, key, fmt in columns if key in runs[0]]
    rows = [[title for title, _, _ in cols]] + [[fmt.format(r[key]) for _, key, fmt in cols] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path, cfg) -> None:
    """Quality vs bytes per token, one panel per metric, one curve per method, the full cache starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, label) for k, label in [("ppl", "continuation perplexity (lower is better)"),
                                            ("passkey", "passkey accuracy"),
                                            ("cosine", "attention-output cosine vs exact")] if k in runs[0]]
    if "bytes_per_token" not in runs[0] or not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    specs = list(dict.fromkeys(r["spec"] for r in runs[1:]))
    for ax, (key, label) in zip(axes[0], metrics):
        for spec in specs:
            pts = sorted((r["bytes_per_token"], r[key]) for r in runs if r["spec"] == spec)
            ax.plot(*zip(*pts), marker="o", label=spec)
        ax.plot(runs[0]["bytes_per_token"], runs[0][key], "k*", markersize=14, label="full cache")
        ax.set_xscale("log")
        if key == "ppl":
            ax.set_yscale("log")  # compressed caches can be off by orders of magnitude
        ax.set_xlabel("bytes per token held (all layers)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{cfg.model}, context {cfg.context} tokens", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
