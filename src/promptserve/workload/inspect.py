"""What a workload looks like: its rate over time and its K_opt mix, as a table and a plot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def rate_per_minute(arrivals_s: np.ndarray) -> np.ndarray:
    """Arrivals counted per whole minute (queries/minute), from minute 0 to the last arrival."""
    if len(arrivals_s) == 0:
        return np.zeros(0)
    minutes = int(np.floor(arrivals_s.max() / 60.0)) + 1
    return np.bincount((arrivals_s // 60.0).astype(int), minlength=minutes).astype(float)


def plot_workload(
    path: Path,
    qpm: np.ndarray,
    mix: Mapping[int, float],
    published: Mapping[int, float],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    ax1.plot(np.arange(len(qpm)), qpm, lw=1)
    ax1.set_xlabel("minute")
    ax1.set_ylabel("arrivals (queries/minute)")
    ax1.set_title(title)
    ks = sorted(set(mix) | set(published))
    x = np.arange(len(ks))
    ax2.bar(x - 0.2, [100 * mix.get(k, 0) for k in ks], 0.4, label="this workload")
    ax2.bar(x + 0.2, [100 * published.get(k, 0) for k in ks], 0.4, label="published (Argus log)")
    ax2.set_xticks(x, ["miss" if k == 0 else f"K={k}" for k in ks])
    ax2.set_ylabel("share of prompts (%)")
    ax2.set_title("optimal K mix")
    ax2.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
