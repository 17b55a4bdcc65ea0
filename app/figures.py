"""Page figures composed from ral_core renderings and stored numbers (no model, no tensors): two inspection
results side by side on one shared colour scale (titles are drawn as plain text by ral_core.render).
Call with `common.RENDER_LOCK` held (pyplot's figure registry is global state)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ral_core import render  # noqa: E402


def pair_overlay(left, right, left_title: str, right_title: str, layer="mean", boxes=(), diff_title: str = "",
                 head="mean"):
    """Two InspectionResults of the same image, each the mean over its answer tokens at `layer` of the head mean
    (or of one `head`), on one shared colour scale; with `diff_title` a third panel shows the signed change
    right − left."""
    vl = left.visual_map(layer=layer, head=head)
    vr = right.visual_map(layer=layer, head=head)
    vmax = float(max(vl.max(), vr.max())) or 1e-9
    n = 3 if diff_title else 2
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.0), dpi=100)
    render.overlay(left.image, left.geometry, vl, title=left_title, vmin=0, vmax=vmax, boxes=boxes, ax=axes[0])
    render.overlay(right.image, right.geometry, vr, title=right_title, vmin=0, vmax=vmax, boxes=boxes, ax=axes[1])
    if diff_title:
        render.diff_overlay(right.image, right.geometry, vl, vr, title=diff_title, ax=axes[2])
    fig.tight_layout()
    return fig
