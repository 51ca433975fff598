"""The expert-load file ``--expert-load PATH`` writes: JSON ``{"load": [[...]]}`` (one row per MoE layer, one
column per logical expert) and a PNG heatmap beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_expert_load(path: str, load: list[list[int]], **about: Any) -> list[str]:
    """Write ``load [L][E]`` (plus ``about``, e.g. the calls it sums) as JSON and its heatmap at ``path`` with
    ``.png``; returns one line per file for the user."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load": load, **about}) + "\n")
    png = out.with_suffix(".png")
    return [f"expert load written to {out} ({len(load)} x {len(load[0])})", plot_heatmap(load, str(png))]


def plot_heatmap(load: list[list[int]], path: str) -> str:
    """Layers x experts, (token, expert) pairs per cell, as a PNG; returns a line saying where it went."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "heatmap skipped: matplotlib is not installed (pip install -e '.[bench]')"
    layers, experts = len(load), len(load[0])
    fig, ax = plt.subplots(figsize=(min(16, 4 + experts / 24), min(10, 1.8 + 0.25 * layers)))
    image = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="(token, expert) pairs")
    ax.set_xlabel("logical expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(layers) if layers <= 16 else range(0, layers, max(1, layers // 8)))
    ax.set_title(f"expert load: {layers} layer{'s' if layers > 1 else ''} x {experts} experts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"heatmap written to {path}"
