"""Small matplotlib figures logged as trial artifacts (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def layer_oscillation_plot(history: list[dict], out: Path, title: str = "") -> Path:
    """Heatmap of the oscillating fraction per layer (rows) over epochs (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(history[-1]["layers"])
    epochs = [h["epoch"] for h in history]
    grid = np.array([[h["layers"].get(name, np.nan) for h in history] for name in layers])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(epochs) + 3), max(3, 0.25 * len(layers) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_title(f"oscillating weight fraction per layer {title}".strip())
    fig.colorbar(im, ax=ax, label="fraction oscillating")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
