"""Self-contained matplotlib figures (PNG), so results can be looked at offline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trackstar.atomic import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    with atomic_path(path, suffix=".tmp.png") as tmp:  # matplotlib reads the format from the extension
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_eigen_crossing(e_train: np.ndarray, e_eval: np.ndarray, lam: float, k: int, path: str | Path) -> None:
    """Sorted eigenvalue curves of (1-lambda) R_train and lambda R_eval, crossing at component k."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(1, len(e_train) + 1)
    ax.loglog(x, np.maximum((1 - lam) * e_train, 1e-30), label="(1-λ) R_train")
    ax.loglog(x, np.maximum(lam * e_eval, 1e-30), label="λ R_eval")
    ax.axvline(k, color="gray", ls="--", lw=0.8, label=f"mix_k = {k}")
    ax.set_xlabel("component (sorted)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"Task-specific Hessian mixing, λ = {lam:.3f}")
    ax.legend()
    _save(fig, path)
