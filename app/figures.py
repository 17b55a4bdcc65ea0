"""Page figures composed from ral_core renderings and stored numbers (no model, no tensors): training curves
from `trainer.history` and two inspection results side by side on one shared colour scale.
Call with `common.RENDER_LOCK` held (pyplot's figure registry is global state)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ral_core import render  # noqa: E402

CURVES = [  # (title, [(metric key, label)], y label)
    ("Reward and accuracy of the sampled answers", [("reward", "reward"), ("accuracy", "accuracy (exact match)")],
     "mean over rollouts"),
    ("How far each step moved attention", [("attn_jsd_after_update", "JSD(after ‖ before)")], "JSD (0 … ln 2)"),
    ("Attention on the answer's region", [("attn_target_mass", "on-target mass")], "share of the attention row"),
    ("Where the RAL term can act", [("ral_rows_acting", "rows where it acts"),
                                    ("ral_rows_cancelled", "rows where it cancels"),
                                    ("ral_rows_zero_var", "rows in all-equal-reward groups")], "share of answer rows"),
]


def _series(history: list[dict], key: str):
    pts = [(m["step"], m[key]) for m in history
           if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(history: list[dict], total_steps: int | None = None, title: str = ""):
    """2×2 panels of the per-step metrics; a panel whose metric was not logged says so."""
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 5.2), dpi=100)
    for ax, (name, keys, ylabel) in zip(axes.flat, CURVES):
        drawn = False
        for key, label in keys:
            x, y = _series(history, key)
            if x:
                ax.plot(x, y, "o-", ms=3, lw=1.4, label=label)
                drawn = True
        if not drawn:
            why = "not logged yet" if not history else "not logged for this run"
            if history and keys[0][0] == "attn_target_mass":
                why += "\n(the data set has no target boxes)"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
        if len(keys) > 1 and drawn:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if total_steps:
            ax.set_xlim(0.5, max(total_steps, 1) + 0.5)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pair_overlay(left, right, left_title: str, right_title: str, layer="mean", boxes=(), diff_title: str = ""):
    """Two InspectionResults of the same image, each the head mean over its answer tokens at `layer`, on one
    shared colour scale; with `diff_title` a third panel shows the signed change right − left."""
    vl = left.visual_map(layer=layer)
    vr = right.visual_map(layer=layer)
    vmax = float(max(vl.max(), vr.max())) or 1e-9
    n = 3 if diff_title else 2
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.0), dpi=100)
    render.overlay(left.image, left.geometry, vl, title=left_title, vmin=0, vmax=vmax, boxes=boxes, ax=axes[0])
    render.overlay(right.image, right.geometry, vr, title=right_title, vmin=0, vmax=vmax, boxes=boxes, ax=axes[1])
    if diff_title:
        render.diff_overlay(right.image, right.geometry, vl, vr, title=diff_title, ax=axes[2])
    fig.tight_layout()
    return fig
