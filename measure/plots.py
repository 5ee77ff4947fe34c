"""The evaluation's figures (matplotlib, Agg backend, PNG): DeepDefense Figure 2 (attack-model test
accuracy against the query budget) and Figure 3 (victim vs misdirection attribution maps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: One colour per defense across every panel.
COLOURS = {
    "none": "tab:gray",
    "pp": "tab:orange",
    "edm": "tab:brown",
    "deepdefense": "tab:blue",
    "dd-s": "tab:green",
    "dd-i": "tab:purple",
}
NAMES = {"none": "Undefended", "pp": "PP", "edm": "EDM", "deepdefense": "DD", "dd-s": "DD-S", "dd-i": "DD-I"}
#: The paper's figures as stars (their colour: the defense's, or white in the legend).
STAR = {"marker": "*", "linestyle": "none", "markeredgecolor": "black"}
TITLES = {
    "explanations": "probabilities + maps (eq. 1)",
    "probabilities": "probabilities only",
    "labels": "top-1 labels only",
}


def figure2(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    paper: Mapping[str, float] | None = None,
    paper_budget: int = 10_000,
    victim_accuracy: float | None = None,
    title: str = "",
) -> Path:
    """One panel per attack loss, one line per defense: test accuracy (%) against budget B. ``rows``
    hold ``defense``, ``loss``, ``budget``, ``accuracy``; ``paper`` (defense → accuracy at
    ``paper_budget``, the paper's Table 5) is drawn as stars on the eq. (1) panel."""
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    panels = max(len(losses), 1)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0), sharey=True, squeeze=False)
    for ax, loss in zip(axes[0], losses, strict=False):  # an empty figure keeps one panel
        for defense in dict.fromkeys(r["defense"] for r in rows):
            points = sorted((r["budget"], r["accuracy"]) for r in rows if r["loss"] == loss and r["defense"] == defense)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", color=COLOURS.get(defense), label=NAMES.get(defense, defense))
            if paper and loss == "explanations" and defense in paper and paper_budget <= max(r["budget"] for r in rows):
                ax.plot([paper_budget], [paper[defense]], markersize=13, color=COLOURS.get(defense), **STAR)
        if victim_accuracy is not None:
            ax.axhline(victim_accuracy, color="black", linestyle=":", linewidth=1)
        ax.set_title(TITLES.get(loss, loss), fontsize=10)
        ax.grid(alpha=0.3)
        ax.set(xlabel="query budget B", ylim=(0, 102))
    axes[0][0].set_ylabel("attack-model test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if paper and paper_budget <= max(r["budget"] for r in rows):
        handles.append(plt.Line2D([], [], markersize=11, color="white", **STAR))
        labels.append(f"paper, B = {paper_budget:,} (Table 5)")
    if victim_accuracy is not None:
        handles.append(plt.Line2D([], [], color="black", linestyle=":"))
        labels.append("victim")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95 if title else 1))
    return _save(fig, path)


def figure3(
    images: Sequence[Any],
    victim_maps: Sequence[Any],
    defended_maps: Sequence[Any],
    labels: Sequence[int],
    path: str | Path,
    *,
    defended_name: str = "DD",
) -> Path:
    """Rows of (input, victim map I over the input, misdirection map Ĩ over the input)."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.0 * n), squeeze=False)
    for row, (x, mv, md, y) in enumerate(zip(images, victim_maps, defended_maps, labels, strict=True)):
        grey = _grey(x)
        panels = ((None, f"input (class {y})"), (mv, "victim I"), (md, f"{defended_name} Ĩ"))
        for col, (img, title) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            if img is not None:
                ax.imshow(img, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
            if row == 0 or col == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _grey(x: Any) -> Any:
    """A (C, H, W) image as (H, W) grey values (channel mean)."""
    import numpy as np

    arr = np.asarray(x, dtype=float)
    return arr.mean(0) if arr.ndim == 3 else arr


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
