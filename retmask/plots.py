"""Plots (matplotlib, headless): heatmaps written by detection and the NIAH check, DPO training curves."""

from __future__ import annotations

from pathlib import Path


def _heatmap(data, path: str | Path, title: str, *, xlabel: str, ylabel: str, label: str, size, ticks=None,
             **imshow) -> None:
    """Draw `data` (rows x columns) with a colour bar and save it; `ticks(ax)` sets custom ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(data, aspect="auto", **imshow)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ticks is not None:
        ticks(ax)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_heatmap(scores, path: str | Path, title: str) -> None:
    """Layer x head heatmap of mean retrieval scores ((layers, heads) array-like)."""
    rows = [list(map(float, r)) for r in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    L, H = len(rows), len(rows[0])
    _heatmap(rows, path, title, xlabel="query head", ylabel="layer", label="mean retrieval score",
             size=(max(4, 0.25 * H + 2), max(3, 0.25 * L + 1.5)), cmap="viridis", origin="lower", vmin=0)


def niah_heatmap(table: dict, path: str | Path, title: str) -> None:
    """Depth x length heatmap of NIAH recall (percent), from `niah.niah_table`."""
    grid = [[float("nan") if v is None else v for v in row] for row in table["recall"]]  # (lengths, depths)
    data = list(map(list, zip(*grid)))  # (depths, lengths)

    def ticks(ax):
        ax.set_xticks(range(len(table["lengths"])), [str(x) for x in table["lengths"]], rotation=60, fontsize=7)
        ax.set_yticks(range(len(table["depths"])), [f"{d:.0f}" for d in table["depths"]], fontsize=7)

    _heatmap(data, path, title, xlabel="context length (tokens)", ylabel="needle depth (%)",
             label="ROUGE-1 recall (%)", size=(max(4, 0.4 * len(table["lengths"]) + 2), 3.6), ticks=ticks,
             cmap="RdYlGn", vmin=0, vmax=100, origin="upper")


TRAIN_SERIES = {"loss": ("loss", "DPO loss"), "rewards/chosen": ("rewards", "chosen"),
                "rewards/rejected": ("rewards", "rejected"), "rewards/margins": ("rewards", "margin")}


def train_curves(history: list[dict], path: str | Path, title: str) -> dict[str, list[tuple[float, float]]]:
    """DPO loss (left) and the chosen / rejected rewards and their margin (right) per optimizer step,
    from the trainer's log history (one dict per logged step). Returns the (step, value) points drawn
    per series, read back from the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("train_curves: the log history is empty (no optimizer step was logged)")
    fig, (ax_loss, ax_rew) = plt.subplots(1, 2, figsize=(9, 3.4))
    axes = {"loss": ax_loss, "rewards": ax_rew}
    drawn = {}
    for key, (panel, label) in TRAIN_SERIES.items():
        pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if pts:
            (line,) = axes[panel].plot(*zip(*pts), label=label, marker="." if len(pts) < 40 else None)
            drawn[key] = list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))
    ax_loss.axhline(0.6931, color="grey", lw=0.8, ls=":")  # log 2: the loss before any step
    ax_loss.set(xlabel="optimizer step", ylabel="DPO loss", title="loss")
    ax_rew.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax_rew.set(xlabel="optimizer step", ylabel="implicit reward (beta x log-ratio)", title="rewards")
    ax_rew.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
