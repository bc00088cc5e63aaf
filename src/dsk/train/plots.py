"""curves.png for a training run: loss curves and the MoE expert-load balance.

    >>> plot_curves(Path("run/metrics.jsonl"), Path("out/curves.png"))
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(metrics_path)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    moe = [r for r in train if "max_vio" in r]
    fig, axes = plt.subplots(1, 3 if moe else 1, figsize=(15 if moe else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (nats/token)")
    ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss (nats/token)")
    ax.set_xlabel("step")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["bpb"] for r in val], "s--", color="tab:green", label="val bits/byte")
        ax2.set_ylabel("bits per byte")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    if moe:
        ax = axes[0][1]
        for layer in sorted(moe[-1]["max_vio"], key=int):
            ax.plot([r["step"] for r in moe], [r["max_vio"].get(layer, np.nan) for r in moe], label=f"layer {layer}")
        ax.set_title("expert load balance: MaxVio = max load / mean - 1")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[0][2]
        last = moe[-1]["expert_load"]
        layers = sorted(last, key=int)
        grid = np.array([np.array(last[k], dtype=float) / max(1.0, sum(last[k])) for k in layers])
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
        ax.set_xlabel("expert")
        ax.set_title(f"share of routed tokens per expert (steps to {moe[-1]['step']})")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    # no timestamp/software metadata: the same run gives the same bytes
    fig.savefig(out_path, dpi=90, metadata={"Software": None})
    plt.close(fig)
