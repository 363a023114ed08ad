"""Plots written next to results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fusion_weights(layers: list[dict], path: str | Path, title: str = "") -> Path | None:
    """HyWIA's fusion weights per layer, for attention heads and MLP channels: α_fine with two
    components (α_coarse = 1 − α_fine), every α with more."""
    series = {}
    for kind, key in (("attention heads", "attn_info"), ("MLP channels", "mlp_info")):
        names = sorted({k[6:] for r in layers for k in r.get(key, {}) if k.startswith("alpha_")})
        shown = ["fine"] if names == ["coarse", "fine"] else names
        for name in shown:
            pts = [(r["layer"], r[key][f"alpha_{name}"]) for r in layers if f"alpha_{name}" in r.get(key, {})]
            if pts:
                series[(kind, name)] = pts
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = {"attention heads": "C0", "MLP channels": "C1"}
    styles = {"fine": "-", "coarse": ":", "compensated": "--"}
    many = any(name != "fine" for _, name in series)
    for (kind, name), pts in series.items():
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            ms=3,
            color=colors[kind],
            ls=styles.get(name, "-"),
            label=f"{kind}, α {name}" if many else kind,
        )
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("α" if many else "α fine  (1 − α coarse)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "HyWIA fusion weight of the fine-grained score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_search_history(history: list[dict], path: str | Path) -> Path | None:
    """Parent fitness (KL) per generation, one line per coarse-to-fine iteration."""
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    its = sorted({h.get("iteration", 0) for h in history})
    x0 = 0
    for it in its:
        hs = [h for h in history if h.get("iteration", 0) == it]
        ys = [h["best_fitness"] if h.get("best_fitness") is not None else h.get("parent_fitness") for h in hs]
        ax.plot(range(x0, x0 + len(hs)), ys, marker=".", label=f"iteration {it}")
        x0 += len(hs)
    ax.set_xlabel("generation")
    ax.set_ylabel("KL(dense || pruned) per token")
    ax.set_title("search fitness")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_allocation(sparsity: dict[str, list[float]], uniform: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Per-layer sparsity of attention and MLP: searched allocation against uniform."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for ax, kind, label in zip(axes, ("attn", "mlp"), ("attention heads", "MLP channels")):
        L = len(sparsity[kind])
        ax.bar(range(L), sparsity[kind], color="tab:blue", label="searched")
        ax.plot(range(L), uniform[kind], color="tab:red", ls="--", label="uniform")
        ax.set_ylabel(f"{label}\nsparsity")
        ax.set_ylim(0, 1)
    axes[0].legend()
    axes[1].set_xlabel("layer")
    axes[0].set_title(title or "allocation per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_recovery(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Recovery loss (KL to the teacher, and the total when it differs) against tokens trained."""
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = [r["tokens"] for r in records]
    ax.plot(x, [r["kl"] for r in records], lw=1, label="KL(teacher || student)")
    if any(r["loss"] != r["kl"] for r in records):
        ax.plot(x, [r["loss"] for r in records], lw=1, label="loss (KL + weight x CE)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("per-token loss")
    ax.set_yscale("log")
    ax.set_title(title or "recovery")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
