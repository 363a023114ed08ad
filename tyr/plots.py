"""Plots written next to results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fusion_weights(layers: list[dict], path: str | Path, title: str = "") -> Path | None:
    """HyWIA's fine-grained weight α_fine per layer, for attention heads and MLP channels."""
    series = {}
    for kind, key in (("attention heads", "attn_info"), ("MLP channels", "mlp_info")):
        pts = [(r["layer"], r[key]["alpha_fine"]) for r in layers if "alpha_fine" in r.get(key, {})]
        if pts:
            series[kind] = pts
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("α fine  (1 − α coarse)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "HyWIA fusion weight of the fine-grained score")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
