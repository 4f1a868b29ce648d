"""The figures of a comparison (PNG): approximation against exact patching, and correlation against model size.

    python -m analysis.compare ROOT        # writes them under ROOT/plots

``scatter_grid``: one facet per component kind, in the Attribution Patching Demo's order (residual stream,
attention / MLP outputs, then head output / q / k / v / pattern; edges by source → target), points coloured by
layer, the y = x line (a perfect approximation), and in each facet title n, Pearson r and Spearman ρ over
*every* pair and how many points are drawn (a stratified sample, ``analysis.compare.sample_points``).
``correlation_by_size``: Pearson (solid) and Spearman (dashed) against parameter count, one panel per kind.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from attrpatch.components import NODE_KINDS

KIND_ORDER = {k: i for i, k in enumerate(NODE_KINDS)}


def slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts))


def _kind_key(kind: str) -> tuple:
    return (KIND_ORDER.get(kind, len(KIND_ORDER)), kind)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}"


def scatter_grid(title: str, stats: pd.DataFrame, points: pd.DataFrame, path: Path, xlabel: str, ylabel: str,
                 columns: int = 4) -> Path:
    """One figure, one facet per kind of ``stats`` (rows with kind, n_scores, pearson, spearman); ``points``
    holds the sampled (kind, layer, score, exact)."""
    plt = _plt()
    kinds = sorted(stats["kind"].unique(), key=_kind_key)
    cols = min(columns, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 3.6 * cols), 3.4 * rows + 1.0), squeeze=False,
                             layout="constrained")
    layers_max = max(1, int(points["layer"].max())) if len(points) else 1
    sc = None
    for ax, kind in zip(axes.flat, kinds, strict=False):
        s = stats[stats["kind"] == kind].iloc[0]
        p = points[points["kind"] == kind]
        x, y = p["score"].to_numpy(float), p["exact"].to_numpy(float)
        sc = ax.scatter(x, y, c=p["layer"].to_numpy(float), s=4, alpha=0.6, cmap="viridis", vmin=0, vmax=layers_max,
                        rasterized=True)
        if len(x):
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        drawn = f"{len(p):,} drawn" if len(p) < int(s["n_scores"]) else "all drawn"
        if s["pearson"] is None or (isinstance(s["pearson"], float) and math.isnan(s["pearson"])):
            corr = "constant: no correlation"
        else:
            corr = f"r={_fmt(s['pearson'])}  ρ={_fmt(s['spearman'])}"
        ax.set_title(f"{kind}\nn={int(s['n_scores']):,} ({drawn})  {corr}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(kinds):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    if sc is not None:
        fig.colorbar(sc, ax=axes, shrink=0.6, label="layer")
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.003, "statistics over every pair; at most 2,000 points drawn per panel (deterministic sample)",
             fontsize=7, color="grey")
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
    return path


def correlation_by_size(df: pd.DataFrame, path: Path) -> Path:
    """Pearson (solid) and Spearman (dashed) against model size, one panel per (level, kind)."""
    plt = _plt()
    panels = sorted({(r.level, r.kind) for r in df.itertuples()}, key=lambda p: (p[0], _kind_key(p[1])))
    cols = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, (level, kind) in zip(axes.flat, panels, strict=False):
        sub = df[(df["level"] == level) & (df["kind"] == kind)]
        for (task, direction, method, gran), line in sub.groupby(["task", "direction", "method", "granularity"]):
            line = line.sort_values("n_params_m")
            x = line["n_params_m"].to_numpy(float)
            x = np.where(np.isnan(x), 1.0, x)
            (h,) = ax.plot(x, line["pearson"], "o-", label=f"{method} {direction} {task} ({gran})")
            ax.plot(x, line["spearman"], "s--", color=h.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_title(f"{kind} ({level})", fontsize=9)
        ax.set_xlabel("parameters (M)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("correlation with exact\n(solid Pearson, dashed Spearman)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
