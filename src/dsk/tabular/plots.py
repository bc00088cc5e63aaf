"""Training curves of the table classifier: losses and validation AUC per epoch, as a PNG.

    >>> plot_curves(result.history, Path("curves.png"), best_epoch=result.best_epoch)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], out: Path, *, title: str = "", best_epoch: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train loss (weighted)")
    ax1.plot(epochs, [r["val_loss"] for r in history], label="val loss (weighted)")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [r["val_auc"] for r in history], color="tab:green", label="val ROC-AUC")
    ax2.plot(epochs, [r["val_accuracy"] for r in history], color="tab:gray", alpha=0.6, label="val accuracy")
    if best_epoch:
        for ax in (ax1, ax2):
            ax.axvline(best_epoch, color="k", ls=":", lw=1)
    ax2.set_xlabel("epoch")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # no timestamp in the PNG metadata: same history, same bytes
    fig.savefig(out, dpi=80, metadata={"Software": None})
    plt.close(fig)
