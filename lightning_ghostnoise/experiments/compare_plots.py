"""The figures of ``ghostnoise compare``: learning curves and validation accuracy against ``N``.

Both take the finished runs (as ``results.json`` stores them) and write a PNG through
:mod:`lightning_ghostnoise.analysis.outputs` (no pyplot state, any matplotlib backend).

Example:
    >>> plot_curves(runs, ["BN", "GNI(16)"], "curves.png")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

__all__ = ["plot_curves", "plot_validation_vs_n"]


def plot_curves(runs: Sequence[Dict[str, Any]], labels: Sequence[str], path: str, title: str = "") -> None:
    """Training loss, test loss, validation accuracy (when measured) and test accuracy per epoch; the
    mean over seeds with a +- std band, one line per label."""
    import numpy as np

    from lightning_ghostnoise.analysis.outputs import new_figure, save_figure

    has_val = any(r["curves"].get("val_acc") for r in runs)
    panels = [("train_loss", "training loss (train mode)"), ("test_loss", "test loss")]
    if has_val:
        panels.append(("val_acc", "validation accuracy (%)"))
    panels.append(("test_acc", "test accuracy (%)"))
    fig = new_figure(figsize=(4.3 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels))
    for label in labels:
        group = [r for r in runs if r["label"] == label]
        if not group:
            continue
        for ax, (key, name) in zip(axes, panels):
            values = np.array([r["curves"][key] for r in group], dtype=float)
            if values.size == 0:
                continue
            if key.endswith("_acc") and key != "train_acc":
                values = values * 100
            if key == "train_loss":
                epochs = np.arange(1, values.shape[1] + 1)
            else:
                epochs = np.array(group[0]["curves"]["eval_epoch"])
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(group) > 1 else np.zeros_like(mean)
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=label)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
            ax.set_title(name)
            ax.set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_validation_vs_n(rows: Sequence[Dict[str, Any]], path: str, title: str = "") -> None:
    """Mean validation accuracy (+- std over seeds) against the ghost batch size, one line per method;
    the baseline (``plain``) as a horizontal line with its band. The selected ``N`` of each method is
    circled (rows with ``selected: True``). The axis spans the 10 points below the best mean; a mean
    below that (a run that diverged) is drawn at the bottom edge as a triangle labelled with its value."""
    import numpy as np

    from lightning_ghostnoise.analysis.outputs import new_figure, save_figure

    fig = new_figure(figsize=(6.4, 4.2))
    ax = fig.subplots(1, 1)
    methods: Dict[Any, List[Dict[str, Any]]] = {}
    for row in rows:
        if "val_acc_mean" not in row:
            continue
        if row["method"] == "plain":
            mean, std = row["val_acc_mean"] * 100, row["val_acc_std"] * 100
            ax.axhline(mean, color="black", lw=1, label=row["label"])
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.1, lw=0)
            continue
        methods.setdefault((row["method"], row.get("variant")), []).append(row)
    best = max([r["val_acc_mean"] * 100 for r in rows if "val_acc_mean" in r], default=100.0)
    floor = best - 10.0
    for group in methods.values():
        group = sorted(group, key=lambda r: r["ghost_batch_size"])
        n = np.array([r["ghost_batch_size"] for r in group], dtype=float)
        mean = np.array([r["val_acc_mean"] for r in group]) * 100
        std = np.array([r["val_acc_std"] for r in group]) * 100
        name = group[0]["label"].split("(")[0]
        shown = np.maximum(mean, floor)
        line = ax.errorbar(n, shown, yerr=np.where(mean < floor, 0, std), marker="o", ms=4, capsize=3, label=name)
        color = line[0].get_color()
        for r, x, y, true in zip(group, n, shown, mean):
            if r.get("selected"):
                ax.plot([x], [y], marker="o", ms=11, mfc="none", color=color)
            if true < floor:
                ax.plot([x], [y], marker="v", ms=9, color=color)
                ax.annotate(f"{true:.1f}%", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7, color=color)
    ax.set_ylim(floor - 0.5, best + 1.0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ghost batch size N")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
