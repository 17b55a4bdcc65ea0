"""Renderings from saved data only (never re-runs a model): attention overlays with a colour bar, per-head grids,
a layer × head summary, signed differences. matplotlib with the Agg backend; PNG and SVG.

Figures scale with the image: an overlay shows the image at its own aspect ratio with its long side clipped to
[OVERLAY_MIN_PX, OVERLAY_MAX_PX] (a photo ~900 px, a digit grid 336 px), and the token map is painted at the display
resolution and drawn nearest-neighbour, so token borders stay sharp. `size_px=(W, H)` is the box, in pixels, that a
figure must fit in (the image keeps its aspect ratio inside it)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ral_core.models.base import TokenGeometry  # noqa: E402

DPI = 100  # figure inches × 100 = pixels, so layouts below are in pixels
OVERLAY_MIN_PX, OVERLAY_MAX_PX = 336, 900
PANEL_MIN_PX, PANEL_MAX_PX, PANEL_PX_PER_TOKEN = 200, 360, 10
MASS_LABEL = "attention (share of the row)"


def token_heatmap(values: np.ndarray, geometry: TokenGeometry, scale: float = 1, size=None) -> np.ndarray:
    """Paint per-token values onto an image-sized array (or `size=(w, h)` pixels, e.g. the display size).
    Overlapping tokens (Idefics3 tiles + global image) add up, each weighted by mean area / its area, so equal-size
    tokens show their plain value."""
    W, H = geometry.image_size
    w, h = size or (int(round(W * scale)), int(round(H * scale)))
    heat = np.zeros((h, w), np.float64)
    b = np.asarray(geometry.boxes, np.float64)
    areas = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-9)
    wts = np.asarray(values, np.float64) * (areas.mean() / areas)
    for (x0, y0, x1, y1), v in zip(np.round(b * [w / W, h / H, w / W, h / H]).astype(int), wts):
        heat[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] += v
    return heat


def token_grid(geometry: TokenGeometry) -> tuple[float, float]:
    """Tokens across and down the image at the finest token size (Idefics3: the tiles, not the global image)."""
    b = np.asarray(geometry.boxes, np.float64)
    W, H = geometry.image_size
    return W / max(float(np.median(b[:, 2] - b[:, 0])), 1e-9), H / max(float(np.median(b[:, 3] - b[:, 1])), 1e-9)


def _fit(image_size, long_side: float) -> tuple[int, int]:
    """(w, h) in pixels with the image's aspect ratio and the given long side."""
    W, H = image_size
    k = long_side / max(W, H)
    return max(int(round(W * k)), 1), max(int(round(H * k)), 1)


def _gray(image, size) -> np.ndarray:
    """The image in gray at `size` pixels: an enlargement by a whole factor (84 px digit grid → 336) repeats pixels,
    so it shows the pixels the model got rather than a blur of them; anything else is resampled with Lanczos."""
    g = image.convert("L")
    if g.size != tuple(size):
        whole = size[0] % g.width == 0 and size[1] % g.height == 0
        g = g.resize(size, Image.NEAREST if whole else Image.LANCZOS)
    return np.asarray(g)


def _axes_px(ax, image_size) -> tuple[int, int]:
    """Pixel size the image will take in an axes someone else laid out (equal aspect inside its box)."""
    fig = ax.figure
    pos = ax.get_position()
    bw, bh = pos.width * fig.get_figwidth() * fig.dpi, pos.height * fig.get_figheight() * fig.dpi
    W, H = image_size
    return _fit(image_size, max(W, H) * min(bw / W, bh / H))


def _draw(ax, image, geometry, values, px, vmin=None, vmax=None, cmap="inferno", alpha=0.6, boxes=(), gray=None,
          lw=1.5):
    """Image in gray plus the token map, both at `px` (the display size) so every token border is a pixel edge."""
    W, H = image.size
    ext = (0, W, H, 0)
    ax.imshow(_gray(image, px) if gray is None else gray, cmap="gray", extent=ext, interpolation="nearest",
              aspect="auto")
    im = ax.imshow(token_heatmap(values, geometry, size=px), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=ext,
                   interpolation="nearest", aspect="auto")
    for (x0, y0, x1, y1) in boxes:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#00e5ff", lw=lw))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _figure(w_px: float, h_px: float):
    return plt.figure(figsize=(w_px / DPI, h_px / DPI), dpi=DPI)


def _add_axes(fig, x, y_top, w, h):
    """Axes at pixel position (x, y from the top) and pixel size."""
    W, H = fig.get_figwidth() * DPI, fig.get_figheight() * DPI
    return fig.add_axes((x / W, 1 - (y_top + h) / H, w / W, h / H))


# Layout in pixels: margins (≥ the 10 px savefig pads around a tight bounding box, so a saved figure is never larger
# than laid out), the colour bar at the right, the title on top.
_PAD, _CB_GAP, _CB_W, _CB_TEXT = 12, 12, 16, 72


def _overlay_layout(image_size, title_lines: int, size_px=None):
    """(figure, image axes, colour-bar axes, font size, image size in pixels) for one overlay."""
    if size_px:
        bw, bh = size_px
        long_side = max(image_size) * min((bw - 2 * _PAD - _CB_GAP - _CB_W - _CB_TEXT) / image_size[0],
                                          (bh - _PAD - 8 - 16 * title_lines - 16) / image_size[1])
    else:
        long_side = float(np.clip(max(image_size), OVERLAY_MIN_PX, OVERLAY_MAX_PX))
    w, h = _fit(image_size, max(long_side, 32))
    fs = 9 if w < 520 else 11
    top = (fs + 7) * title_lines + 16 if title_lines else _PAD
    fig = _figure(_PAD + w + _CB_GAP + _CB_W + _CB_TEXT, top + h + _PAD + 8)  # + half a tick label below the bar
    ax = _add_axes(fig, _PAD, top, w, h)
    cax = _add_axes(fig, _PAD + w + _CB_GAP, top, _CB_W, h)
    return fig, ax, cax, fs, (w, h)


def overlay(image, geometry, values, title: str = "", vmin=None, vmax=None, cmap="inferno", alpha=0.6,
            boxes=(), ax=None, colorbar_label=MASS_LABEL, size_px=None):
    """Heatmap of per-visual-token values over the image, with a colour bar; returns the Figure. Without `ax` the
    figure is sized from the image (see the module docstring) or to fit `size_px`; with `ax` it draws into that
    axes at the resolution the axes will have."""
    if ax is not None:
        im = _draw(ax, image, geometry, values, _axes_px(ax, image.size), vmin, vmax, cmap, alpha, boxes)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9, parse_math=False)  # titles carry user text: '$' is a dollar, not math
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label(colorbar_label, fontsize=8)
        cb.ax.tick_params(labelsize=7)
        return ax.figure
    lines = title.count("\n") + 1 if title else 0
    fig, ax, cax, fs, px = _overlay_layout(image.size, lines, size_px)
    im = _draw(ax, image, geometry, values, px, vmin, vmax, cmap, alpha, boxes, lw=1.5 if px[0] < 520 else 2.5)
    ax.set_title(title, fontsize=fs, parse_math=False)
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(colorbar_label, fontsize=fs - 1)
    cb.ax.tick_params(labelsize=fs - 2)
    return fig


def diff_overlay(image, geometry, values_a, values_b, title="after − before", ax=None, size_px=None, lim=None,
                 boxes=()):
    """Signed difference b − a on a symmetric diverging scale (red: more attention after, blue: less). The range is
    ±`lim`; by default the maps' own range (the larger of a's and b's maxima), so a small change looks small. A range
    fitted to the difference itself would paint any change, however tiny, at full colour."""
    a, b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
    d = b - a
    if lim is None:
        lim = max(float(a.max()), float(b.max()))
    lim = float(lim) or 1e-9
    return overlay(image, geometry, d, title=title, vmin=-lim, vmax=lim, cmap="RdBu_r", alpha=0.75, ax=ax,
                   colorbar_label="change in attention", size_px=size_px, boxes=boxes)


def head_grid(result, layer, token="mean", row="predicts", shared_scale: bool = True, max_cols: int = 4,
              size_px=None):
    """One overlay per head of `layer`, at most `max_cols` per row. Each panel is sized from the token grid
    (~10 px per token, 200–360 px). `shared_scale=False` gives every head its own colour scale (0 … its own max,
    noted in its title), so a few strong heads do not wash out the rest."""
    maps = np.asarray(result.head_maps(layer, token=token, row=row), np.float64)
    n = maps.shape[0]
    cols = max(1, min(int(max_cols), n))
    rows = int(np.ceil(n / cols))
    image, geo = result.image, result.geometry
    nx, ny = token_grid(geo)
    side = float(np.clip(PANEL_PX_PER_TOKEN * max(nx, ny), PANEL_MIN_PX, PANEL_MAX_PX))
    gap, title_h, sup_h = 10, 20, 40
    if size_px:  # shrink (or grow) the panels to fit the box
        pw0, ph0 = _fit(image.size, side)
        k = min((size_px[0] - 2 * _PAD - (cols - 1) * gap - _CB_GAP - _CB_W - _CB_TEXT) / (cols * pw0),
                (size_px[1] - sup_h - _PAD - rows * (title_h + gap)) / (rows * ph0))
        side *= max(k, 0.1)
    pw, ph = _fit(image.size, side)
    fig = _figure(2 * _PAD + cols * pw + (cols - 1) * gap + _CB_GAP + _CB_W + _CB_TEXT,
                  sup_h + rows * (title_h + ph + gap) + _PAD)
    gray = _gray(image, (pw, ph))
    fs = 8 if pw < 260 else 9
    peaks = maps.max(axis=1)
    vmax = float(peaks.max()) or 1e-9
    for h in range(n):
        r, c = divmod(h, cols)
        ax = _add_axes(fig, _PAD + c * (pw + gap), sup_h + r * (title_h + ph + gap) + title_h, pw, ph)
        img_mass = result.mass_split(layer=layer, head=h, token=token, row=row)["image"]
        if shared_scale:
            im = _draw(ax, image, geo, maps[h], (pw, ph), 0, vmax, gray=gray)
            ax.set_title(f"head {h} · image {img_mass:.2f}", fontsize=fs)
        else:
            im = _draw(ax, image, geo, maps[h] / (peaks[h] or 1e-9), (pw, ph), 0, 1, gray=gray)
            ax.set_title(f"head {h} · image {img_mass:.2f} · max {peaks[h]:.2g}", fontsize=fs)
    cax = _add_axes(fig, _PAD + cols * pw + (cols - 1) * gap + _CB_GAP, sup_h + title_h, _CB_W,
                    rows * (title_h + ph + gap) - gap - title_h)
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(MASS_LABEL if shared_scale else "share of the head's own max", fontsize=fs)
    cb.ax.tick_params(labelsize=fs - 1)
    scale = "one colour scale" if shared_scale else "each head on its own scale"
    fig.suptitle(f"layer {layer}, per head ({scale}) — {token_label(result, token)}", fontsize=fs + 1,
                 y=1 - 12 / (fig.get_figheight() * DPI), va="top", parse_math=False)
    return fig


SUMMARY_METRICS = {  # metric → (title, colour-bar label)
    "image_mass": ("attention on the image", "share of the attention row on visual tokens"),
    "entropy": ("entropy of the image attention", "normalised entropy (0: one token, 1: spread evenly)")}


def layer_head_values(result, metric: str = "image_mass", token="mean", row="predicts") -> np.ndarray:
    """[layers, heads] of `metric`, averaged over the selected answer rows: 'image_mass' (share of the attention row
    on visual tokens) or 'entropy' (entropy of the row's attention over visual tokens, renormalised to sum 1, divided
    by log(number of visual tokens))."""
    if metric not in SUMMARY_METRICS:
        raise ValueError(f"metric must be one of {list(SUMMARY_METRICS)}")
    rows = result._rows(token, row)
    if metric == "image_mass":
        return result.mass[:, :, rows, 0].mean(axis=-1)
    v = np.asarray(result.visual[:, :, rows], np.float64)
    p = v / np.maximum(v.sum(-1, keepdims=True), 1e-12)
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
    return ent.mean(axis=-1) / max(np.log(v.shape[-1]), 1e-12)


def _layer_head_grid(vals, layers, size_px, draw):
    """The layer × head grid layout both grids share: cells 16–44 px wide and 12–36 px high (or fitted to `size_px`),
    tick labels that do not overlap, a colour bar at the right. `draw(ax)` puts the image and returns it."""
    L, H = vals.shape
    left, top, bottom = 64, 52, 48
    cw, ch = float(np.clip(560 / H, 16, 44)), float(np.clip(560 / L, 12, 36))
    if size_px:
        cw = max((size_px[0] - left - _CB_GAP - _CB_W - _CB_TEXT - _PAD) / H, 2)
        ch = max((size_px[1] - top - bottom) / L, 2)
    fig = _figure(left + H * cw + _CB_GAP + _CB_W + _CB_TEXT + _PAD, top + L * ch + bottom)
    ax = _add_axes(fig, left, top, H * cw, L * ch)
    im = draw(ax)
    step_x, step_y = max(1, int(np.ceil(16 / cw))), max(1, int(np.ceil(11 / ch)))
    ax.set_xticks(range(0, H, step_x), [str(h) for h in range(0, H, step_x)], fontsize=8)
    ax.set_yticks(range(0, L, step_y), [str(layers[i]) for i in range(0, L, step_y)], fontsize=8)
    ax.set_xlabel("head", fontsize=9)
    ax.set_ylabel("decoder layer", fontsize=9)
    cax = _add_axes(fig, left + H * cw + _CB_GAP, top, _CB_W, L * ch)
    cb = fig.colorbar(im, cax=cax)
    cb.ax.tick_params(labelsize=7)
    return fig, ax, cb


def layer_head_summary(result, metric: str = "image_mass", token="mean", row="predicts", size_px=None):
    """One cell per (captured layer, head): `metric` ('image_mass' or 'entropy', see `layer_head_values`) as a heatmap.
    Cells are 16–44 px wide and 12–36 px high, so 16 heads × 36 layers fit in ~0.9 × 0.8 k pixels; values are printed
    in the cells when there are at most 64."""
    vals = layer_head_values(result, metric, token, row)
    vmax = 1.0 if metric == "entropy" else (float(vals.max()) or 1e-9)
    fig, ax, cb = _layer_head_grid(vals, result.layers, size_px, lambda ax: ax.imshow(
        vals, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest"))
    if vals.size <= 64:
        for (i, j), v in np.ndenumerate(vals):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * vmax else "white")
    cb.set_label(SUMMARY_METRICS[metric][1], fontsize=8)
    ax.set_title(f"{SUMMARY_METRICS[metric][0]} per layer × head\n{token_label(result, token)}", fontsize=9,
                 parse_math=False)
    return fig


def token_label(result, token) -> str:
    """Answer tokens are counted from 1, as the page's token buttons and `ral inspect --token` count them (the
    `token` argument stays the 0-based index the results use)."""
    if token is None or token == "mean":
        return "mean over answer tokens"
    return f"answer token {int(token) + 1} of {result.n_tokens}: {result.answer_tokens[int(token)]!r}"


def inspection_overlay(result, layer="mean", head="mean", token="mean", row="predicts", boxes=(), size_px=None):
    """Head-mean (by default) overlay for an InspectionResult, titled with what it shows."""
    v = result.visual_map(layer=layer, head=head, token=token, row=row)
    m = result.mass_split(layer=layer, head=head, token=token, row=row)
    lay = "mean over layers" if layer in (None, "mean") else f"layer {layer}"
    hd = "mean over heads" if head in (None, "mean") else f"head {head}"
    title = f"{lay}, {hd}\n{token_label(result, token)} · image mass {m['image']:.2f}"
    return overlay(result.image, result.geometry, v, title=title, vmin=0, boxes=boxes, size_px=size_px)


def save_figure(fig, path, make_dirs: bool = True) -> Path:
    """Save as PNG or SVG by suffix and close the figure; `make_dirs=False` fails (FileNotFoundError) where the
    folder is gone instead of making it again."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    # fast zlib level: a third less drawing time per figure for a somewhat larger file (served per request)
    kw = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
    try:
        if make_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", format=fmt, **kw)
    finally:  # closed on failure too: pyplot's registry would keep a figure nobody can reach
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


CURVES = [  # (title, [(metric key, label)], y label): the per-step metrics the trainer logs
    ("Reward and accuracy of the sampled answers", [("reward", "reward"), ("accuracy", "accuracy (exact match)")],
     "mean over rollouts"),
    ("How far each step moved attention", [("attn_jsd_after_update", "JSD(after ‖ before)")], "JSD (0 … ln 2)"),
    ("Attention on the answer's region", [("attn_target_mass", "on-target mass")], "share of the attention row"),
    ("Where the RAL term can act", [("ral_rows_acting", "rows where it acts"),
                                    ("ral_rows_cancelled", "rows where it cancels"),
                                    ("ral_rows_zero_var", "rows in all-equal-reward groups")], "share of answer rows"),
]


def _series(history, key):
    import math
    pts = [(m["step"], m[key]) for m in history if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(history: list[dict], total_steps: int | None = None, title: str = ""):
    """2×2 panels of a run's per-step metrics (`trainer.history` / metrics.jsonl). A metric measured on some steps
    only is drawn on those steps; curves equal at every step are drawn once and labelled together (else the legend
    lists two and one sees one); runs of fewer than 5 steps get markers only, on a padded axis."""
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 5.2), dpi=100)
    n_steps = len({m.get("step") for m in history})
    for ax, (name, keys, ylabel) in zip(axes.flat, CURVES):
        drawn = []  # (x, y, label)
        for key, label in keys:
            x, y = _series(history, key)
            if not x:
                continue
            same = next((d for d in drawn if d[0] == x and np.allclose(d[1], y, rtol=0, atol=1e-12)), None)
            if same is not None:
                drawn[drawn.index(same)] = (same[0], same[1], f"{same[2]} = {label} (equal at every step)")
            else:
                drawn.append((x, y, label))
        for x, y, label in drawn:
            ax.plot(x, y, "o" if n_steps < 5 else "o-", ms=4 if n_steps < 5 else 3, lw=1.4, label=label)
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
        last = max(total_steps or 0, max((m.get("step", 0) for m in history), default=0), 1)
        ax.set_xlim(0.5, last + 0.5)
        if last < 5:
            ax.set_xticks(range(1, last + 1))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)
    fig.tight_layout()
    return fig


# ---- causal checks (ral_core/causal.py): does this head matter? -----------------------------------------------------
KNOCKOUT_LABEL = "Δ log p(answer) with the head knocked out"


def knockout_grid(ko, token="mean", size_px=None, highlight=None):
    """One cell per (layer, head): Δ log p of the answer (mean over its tokens, or one 0-based token) when that head's
    output is zeroed. Diverging scale symmetric about 0: blue cells are heads the answer needs (knocking them out lowers
    its probability), red ones heads that held it back. `highlight` (layer, head) outlines one cell."""
    vals = np.asarray(ko.effect(token), np.float64)
    lim = float(np.abs(vals).max()) or 1e-9
    fig, ax, cb = _layer_head_grid(vals, ko.layers, size_px, lambda ax: ax.imshow(
        vals, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"))
    if vals.size <= 64:
        for (i, j), v in np.ndenumerate(vals):
            ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 * lim else "black")
    if highlight is not None and highlight[0] in ko.layers:
        i, j = ko.layers.index(highlight[0]), int(highlight[1])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#00c853", lw=2.5))
    cb.set_label(KNOCKOUT_LABEL, fontsize=8)
    what = "mean over the answer" if token in (None, "mean") else \
        f"token {int(token) + 1}: {ko.answer_tokens[int(token)]!r}"
    ax.set_title(f"does it matter? heads knocked out\n{what}", fontsize=9, parse_math=False)
    return fig


def _outline_tokens(ax, geometry, tokens, color="#76ff03"):
    for k in tokens:
        x0, y0, x1, y1 = np.asarray(geometry.boxes[k], np.float64)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5, ls="--"))


def head_effect_overlay(result, ko, layer, head, token="mean", row="predicts", sinks=None, clean=False, size_px=None):
    """One head's map with its knock-out effect in the title (the Inspect grid's click). `sinks` outlines the sink
    tokens (dashed green); `clean` shows the map renormalised without them (ral_core.causal.without_sinks)."""
    from ral_core.causal import without_sinks

    v = result.visual_map(layer=layer, head=head, token=token, row=row)
    if clean and sinks is not None:
        v = without_sinks(v, sinks)
    lines = [f"layer {layer}, head {head} · {token_label(result, token)}"]
    if ko is not None and layer in ko.layers:
        lines.append(f"knock-out: Δ log p {ko.cell(layer, head, token):+.4f}"
                     + (" (the answer needs this head)" if ko.cell(layer, head, token) < 0 else ""))
    if sinks is not None and sinks.tokens:
        lines.append(f"{len(sinks.tokens)} sink token(s) outlined"
                     + (", map renormalised without them" if clean else ""))
    fig = overlay(result.image, result.geometry, v, title="\n".join(lines), vmin=0, size_px=size_px)
    if sinks is not None:
        _outline_tokens(fig.axes[0], result.geometry, sinks.tokens)
    return fig


def sink_overlay(result, sinks, layer="mean", head="mean", token="mean", row="predicts", clean=False, size_px=None):
    """The map with the sink tokens outlined (dashed green), raw or renormalised without them (`clean`)."""
    from ral_core.causal import without_sinks

    v = result.visual_map(layer=layer, head=head, token=token, row=row)
    if clean:
        v = without_sinks(v, sinks)
    lay = "mean over layers" if layer in (None, "mean") else f"layer {layer}"
    hd = "mean over heads" if head in (None, "mean") else f"head {head}"
    note = (f"{len(sinks.tokens)} sink token(s) outlined (> {sinks.eps:g} of the row in > {sinks.min_share:.0%} of "
            "heads)" if sinks.tokens else "no sink token")
    if clean and sinks.tokens:
        note += "; renormalised without them"
    fig = overlay(result.image, result.geometry, v, title=f"{lay}, {hd} · {token_label(result, token)}\n{note}",
                  vmin=0, size_px=size_px)
    _outline_tokens(fig.axes[0], result.geometry, sinks.tokens)
    return fig


def blocking_overlay(result, block, size_px=None):
    """The head-mean map of the blocked layers with the blocked tokens outlined and what blocking did to the answer."""
    layers = [l for l in block.layers if l in result.layers]
    v = np.mean([result.visual_map(layer=l) for l in layers], axis=0) if layers else result.visual_map()
    ls = block.layers
    where = ", ".join(map(str, ls)) if len(ls) <= 4 else f"{ls[0]}…{ls[-1]}"
    title = (f"answer rows blocked from {len(block.blocked_tokens)} token(s) (dashed) at layer(s) {where}"
             f"\nΔ log p {block.mean_delta:+.3g} per token · answer {block.answer!r} → {block.new_answer!r}")
    fig = overlay(result.image, result.geometry, v, title=title, vmin=0, boxes=[tuple(b) for b in block.boxes],
                  size_px=size_px)
    _outline_tokens(fig.axes[0], result.geometry, block.blocked_tokens, color="#ff1744")
    return fig


def logit_lens_overlay(result, lens, layer, max_words: int = 256, size_px=None):
    """The logit lens at one decoder layer: each visual token coloured by the probability of its top token, the token
    written in its patch (up to `max_words` patches; Idefics3's global image is drawn under its tiles)."""
    if layer not in lens.layers:
        raise ValueError(f"layer {layer} has no logit lens; layers: {lens.layers}")
    i = lens.layers.index(layer)
    fig = overlay(result.image, result.geometry, lens.top_prob[i], vmin=0, vmax=1, cmap="viridis",
                  title=f"logit lens at layer {layer}: each patch's top token through the final norm and LM head",
                  colorbar_label="probability of the top token", size_px=size_px)
    if len(lens.words[i]) <= max_words:
        ax = fig.axes[0]
        for (x0, y0, x1, y1), w in zip(np.asarray(result.geometry.boxes, np.float64), lens.words[i]):
            if x1 > x0 and y1 > y0:
                ax.text((x0 + x1) / 2, (y0 + y1) / 2, repr(w)[1:-1][:8], ha="center", va="center", fontsize=7,
                        color="white", parse_math=False,
                        bbox={"boxstyle": "round,pad=0.1", "fc": "black", "alpha": 0.4, "lw": 0})
    return fig
