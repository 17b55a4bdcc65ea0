"""Renderings from saved data only (never re-runs a model): attention overlays with a colour bar,
per-head grids, signed differences. matplotlib with the Agg backend; PNG and SVG."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ral_core.models.base import TokenGeometry  # noqa: E402


def token_heatmap(values: np.ndarray, geometry: TokenGeometry, scale: int = 1) -> np.ndarray:
    """Paint per-token values onto an image-sized array. Overlapping tokens (Idefics3 tiles + global image)
    add up, each weighted by mean area / its area, so equal-size tokens show their plain value."""
    W, H = geometry.image_size
    heat = np.zeros((H * scale, W * scale), np.float64)
    b = np.asarray(geometry.boxes, np.float64)
    areas = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-9)
    w = np.asarray(values, np.float64) * (areas.mean() / areas)
    for (x0, y0, x1, y1), v in zip(np.round(b * scale).astype(int), w):
        heat[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] += v
    return heat


def _show_image(ax, image):
    ax.imshow(np.asarray(image.convert("L")), cmap="gray", extent=(0, image.width, image.height, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def overlay(image, geometry, values, title: str = "", vmin=None, vmax=None, cmap="inferno", alpha=0.6,
            boxes=(), ax=None, colorbar_label="attention (share of the row)"):
    """Heatmap of per-visual-token values over the image, with a colour bar; returns the Figure."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    heat = token_heatmap(values, geometry)
    _show_image(ax, image)
    im = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=(0, image.width, image.height, 0))
    for (x0, y0, x1, y1) in boxes:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#00e5ff", lw=1.5))
    ax.set_title(title, fontsize=9)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(colorbar_label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig or ax.figure


def diff_overlay(image, geometry, values_a, values_b, title="after − before", ax=None):
    """Signed difference b − a on a symmetric diverging scale (red: more attention after, blue: less)."""
    d = np.asarray(values_b) - np.asarray(values_a)
    lim = float(np.abs(d).max()) or 1e-9
    return overlay(image, geometry, d, title=title, vmin=-lim, vmax=lim, cmap="RdBu_r", alpha=0.75, ax=ax,
                   colorbar_label="change in attention")


def head_grid(result, layer, token="mean", row="predicts", shared_scale: bool = True):
    """One small overlay per head of `layer` (shared colour scale by default)."""
    maps = result.head_maps(layer, token=token, row=row)
    H = maps.shape[0]
    cols = min(4, H)
    rows = int(np.ceil(H / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), dpi=100, squeeze=False)
    vmax = float(maps.max()) if shared_scale else None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        heat = token_heatmap(maps[h], result.geometry)
        _show_image(ax, result.image)
        im = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0, vmax=vmax,
                       extent=(0, result.image.width, result.image.height, 0))
        ax.set_title(f"head {h}", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02).set_label("attention", fontsize=8)
    fig.suptitle(f"layer {layer}, per head — {token_label(result, token)}", fontsize=9)
    return fig


def token_label(result, token) -> str:
    if token is None or token == "mean":
        return "mean over answer tokens"
    return f"token {int(token)} {result.answer_tokens[int(token)]!r}"


def inspection_overlay(result, layer="mean", head="mean", token="mean", row="predicts", boxes=()):
    """Head-mean (by default) overlay for an InspectionResult, titled with what it shows."""
    v = result.visual_map(layer=layer, head=head, token=token, row=row)
    m = result.mass_split(layer=layer, head=head, token=token, row=row)
    lay = "mean over layers" if layer in (None, "mean") else f"layer {layer}"
    hd = "mean over heads" if head in (None, "mean") else f"head {head}"
    title = f"{lay}, {hd}\n{token_label(result, token)} · image mass {m['image']:.2f}"
    return overlay(result.image, result.geometry, v, title=title, vmin=0, boxes=boxes)


def save_figure(fig, path) -> Path:
    """Save as PNG or SVG by suffix and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path


def figure_bytes(fig, fmt="png") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, bbox_inches="tight", format=fmt)
    plt.close(fig)
    return buf.getvalue()


def lever_chart(lmap, title: str = "Which layers' attention moves the answer"):
    """Layer × effect bars: Δ log p(answer) when steering toward vs away from the target (± sd over samples),
    with the attention shift the steering caused and the natural-attention/p(answer) correlation."""
    L = np.arange(len(lmap.layers))
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), dpi=100, gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    colors = ["#d62728" if e > 0 else "#1f77b4" for e in lmap.effect]
    ax.bar(L, lmap.effect, yerr=lmap.effect_sd, color=colors, capsize=2)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(L, [str(x) for x in lmap.layers], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("Δ log p(answer)\n(toward − away)")
    ax.set_title(f"{title} (n={lmap.n_samples}, bias ±{lmap.strength:g})", fontsize=9)
    ax2 = axes[1]
    ax2.plot(L, lmap.attn_shift, "o-", ms=3, label="Δ target mass (steered layer)")
    ax2.plot(L, np.nan_to_num(lmap.corr), "s--", ms=3, label="corr(natural target mass, p)")
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_xticks(L, [str(x) for x in lmap.layers], fontsize=7)
    ax2.set_xlabel("decoder layer")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig
