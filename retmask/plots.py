"""Heatmaps written by detection and the NIAH check (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def head_heatmap(scores, path: str | Path, title: str) -> None:
    """Layer x head heatmap of mean retrieval scores ((layers, heads) array-like)."""
    plt = _plt()
    rows = [list(map(float, r)) for r in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    L, H = len(rows), len(rows[0])
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * H + 2), max(3, 0.25 * L + 1.5)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis", origin="lower", vmin=0)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean retrieval score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def niah_heatmap(table: dict, path: str | Path, title: str) -> None:
    """Depth x length heatmap of NIAH recall (percent), from `detect.niah_table`."""
    plt = _plt()
    grid = [[float("nan") if v is None else v for v in row] for row in table["recall"]]  # (lengths, depths)
    data = list(map(list, zip(*grid)))  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(table["lengths"]) + 2), 3.6))
    im = ax.imshow(data, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100, origin="upper")
    ax.set_xticks(range(len(table["lengths"])), [str(x) for x in table["lengths"]], rotation=60, fontsize=7)
    ax.set_yticks(range(len(table["depths"])), [f"{d:.0f}" for d in table["depths"]], fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="ROUGE-1 recall (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
