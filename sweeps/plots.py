"""Scatter plots of an approximation against exact patching, one facet per component kind (PNG bytes).

    python -c "import numpy as np; from sweeps.plots import scatter_grid; open('/tmp/x.png','wb').write(scatter_grid('demo', {'resid_pre': (np.arange(9.), np.arange(9.), np.arange(9) % 3)}))"

The facets follow the Attribution Patching Demo: residual stream / attention / MLP outputs coloured by
block, then head output / q / k / v / pattern. Each facet draws the y = x line (a perfect approximation)
and states n, Pearson r and Spearman ρ; at most ``MAX_POINTS`` points are drawn per facet (a fixed random
subset), the statistics use every pair.
"""

from __future__ import annotations

import io
import math

import numpy as np

MAX_POINTS = 5000  # enough to show the shape; more only slows PNG rendering


def scatter_grid(title: str, facets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                 xlabel: str, ylabel: str) -> bytes:
    """One figure, one facet per kind: x = approximation, y = exact, colour = layer."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from sweeps.summary import correlation

    n = len(facets)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 3.6 * cols), 3.4 * rows + 0.8), squeeze=False,
                             layout="constrained")
    rng = np.random.default_rng(0)
    layers_max = max((int(f[2].max()) for f in facets.values() if len(f[2])), default=0)
    for ax, (kind, (x, y, layer)) in zip(axes.flat, facets.items(), strict=False):
        pearson, spearman = correlation(x, y)
        idx = rng.choice(len(x), MAX_POINTS, replace=False) if len(x) > MAX_POINTS else np.arange(len(x))
        sc = ax.scatter(x[idx], y[idx], c=layer[idx], s=4, alpha=0.6, cmap="viridis", vmin=0,
                        vmax=max(1, layers_max), rasterized=True)
        lo = float(min(x.min(), y.min())) if len(x) else 0.0
        hi = float(max(x.max(), y.max())) if len(x) else 1.0
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        stats = "constant: no correlation" if math.isnan(pearson) else f"r={pearson:+.2f}  ρ={spearman:+.2f}"
        ax.set_title(f"{kind}\nn={len(x):,}  {stats}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(sc, ax=axes, shrink=0.6, label="layer (block)")
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
