"""The one figure module: slice choice, images with label contours or overlays, panel grids,
deformation grids, Jacobian maps, bar charts with error bars, curves and scatter plots (matplotlib,
Agg backend).

Arrays are medjax's: volumes ``(*S)`` or ``(*S, C)`` with ``S = (X, Y, Z)``; a 2D slice is shown
with its first axis horizontal (``origin="lower"``, transposed), as the experiments' figures always
were. A slice whose first axis should run downwards instead (rows as a matrix is printed: the
phantoms' previews, FocusNetV2's axial slices) goes through :func:`rows_down` first, and a point
of it through :func:`rows_down_point`. Label ``c`` of a map with labels ``0..top`` has the colour
:func:`label_colors` gives, in overlays and contours alike. A figure of several image panels is a
:func:`panel_grid` of :class:`Panel` rows. Every function that writes a file returns its path and
closes its figure.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Panel",
    "bar_chart",
    "deformation_panels",
    "registration_panels",
    "choose_slice",
    "curves",
    "deformation_grid",
    "jacobian_map",
    "label_contours",
    "label_colors",
    "label_overlay",
    "panel_grid",
    "plt",
    "rows_down",
    "rows_down_point",
    "save",
    "scatter",
    "segmentation_panels",
    "show_image",
]


def plt():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (unless one is already chosen)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, path, *, dpi: int = 110) -> pathlib.Path:
    """Write ``fig`` to ``path`` (creating its folder), close it, return the path (the axes laid
    out tightly, unless the figure has its own layout engine)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:  # (a constrained layout is kept)
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt().close(fig)
    return path


def choose_slice(mask, axis: int = -1) -> int:
    """Index along ``axis`` of the slice with the most foreground voxels of ``mask`` (middle if none)."""
    m = np.asarray(mask) > 0
    axis = axis % m.ndim
    if not m.any():
        return m.shape[axis] // 2
    other = tuple(a for a in range(m.ndim) if a != axis)
    return int(np.argmax(m.sum(axis=other)))


def show_image(ax, image2d, *, title=None, cmap="gray", vmin=None, vmax=None):
    """Show a 2D image (transposed, origin lower) on ``ax``, without axes; returns the image artist."""
    im = ax.imshow(np.asarray(image2d).T, cmap=cmap, origin="lower", vmin=vmin, vmax=vmax)
    if title:
        ax.set_title(title, fontsize=8)
    ax.axis("off")
    return im


def label_colors(top: int, cmap="tab10") -> list:
    """RGBA colours of labels ``0..top`` (index ``c`` is label ``c``), as :func:`label_overlay`
    draws them: ``cmap`` over ``[0, max(top, 1)]``."""
    from matplotlib import colormaps, colors

    cm = colormaps[cmap] if isinstance(cmap, str) else cmap
    norm = colors.Normalize(vmin=0, vmax=max(int(top), 1))
    return [cm(norm(c)) for c in range(int(top) + 1)]


def _top(lab, num_classes):
    return int(lab.max()) if num_classes is None else int(num_classes) - 1


def label_contours(ax, labels2d, *, num_classes=None, colors=None, linewidths=0.7):
    """The outline of each label ``1..top`` of a 2D integer map, each label's own region
    contoured (so two touching labels both show their border). Colours: :func:`label_colors`, or
    ``colors`` (one colour for every label, or a sequence indexed by label - 1)."""
    lab = np.asarray(labels2d)
    top = _top(lab, num_classes)
    if top < 1 or not lab.any():
        return
    if colors is None:
        palette = label_colors(top)[1:]
    elif isinstance(colors, str) or all(isinstance(v, (int, float)) for v in colors):
        palette = [colors] * top
    else:
        palette = list(colors)
    for c in range(1, top + 1):
        mask = lab == c
        if mask.any() and mask.shape[0] > 1 and mask.shape[1] > 1:
            ax.contour(
                mask.T.astype(np.float32),
                levels=[0.5],
                colors=[palette[(c - 1) % len(palette)]],
                linewidths=linewidths,
                origin="lower",
            )


def label_overlay(ax, image2d, labels2d, *, num_classes=None, alpha=0.55, title=None, cmap="tab10"):
    """An image with its labels as a semi-transparent colour overlay (background transparent)."""
    show_image(ax, image2d, title=title)
    _labels_over(ax, labels2d, num_classes=num_classes, alpha=alpha, cmap=cmap)


def _labels_over(ax, labels2d, *, num_classes=None, alpha=0.55, cmap="tab10"):
    lab = np.asarray(labels2d)
    ax.imshow(
        np.ma.masked_equal(lab, 0).T,
        cmap=cmap,
        vmin=0,
        vmax=max(_top(lab, num_classes), 1),
        alpha=alpha,
        origin="lower",
        interpolation="nearest",
    )


def rows_down(array2d):
    """A 2D array whose first axis should run downwards (row 0 on top, as a matrix is printed), in
    this module's convention (first axis horizontal, origin lower): show it with any function
    here and row ``r``, column ``k`` is drawn at ``x = k``, ``y = rows - 1 - r``."""
    return np.asarray(array2d)[::-1].T


def rows_down_point(row, col, rows):
    """Where :func:`rows_down`'s element ``(row, col)`` of an array ``rows`` tall is drawn: ``(x, y)``."""
    return col, rows - 1 - row


@dataclasses.dataclass
class Panel:
    """One image panel of a :func:`panel_grid`, in this module's convention (first axis
    horizontal; :func:`rows_down` for arrays whose rows run downwards).

    ``image``: the 2D image (``cmap``, ``vmin``, ``vmax``; None leaves the panel blank, a title
    still shown). Drawn over it, in this order: ``labels`` as a colour overlay
    (:func:`label_overlay`; ``num_classes``, ``label_cmap``, ``alpha``), ``heat`` a float map
    (``heat_kw``: imshow's options such as ``cmap``, ``alpha``, ``vmin``, ``vmax``), ``contours`` a
    label map outlined (:func:`label_contours`; ``contour_colors``), and ``markers``: ``(x, y,
    fmt, kwargs)`` in drawing coordinates (``kwargs`` may hold a legend ``label``). ``legend``
    draws this panel's legend of labelled markers; ``aspect`` is the height of a pixel over its
    width (anisotropic voxels), ``ylabel`` a label left of the panel (a row's name).
    """

    image: Any = None
    title: str | None = None
    cmap: Any = "gray"
    vmin: float | None = None
    vmax: float | None = None
    labels: Any = None
    num_classes: int | None = None
    label_cmap: Any = "tab10"
    alpha: float = 0.55
    heat: Any = None
    heat_kw: Mapping = dataclasses.field(default_factory=dict)
    contours: Any = None
    contour_colors: Any = None
    markers: Sequence = ()
    legend: bool = False
    aspect: float | None = None
    ylabel: str | None = None


def _draw(ax, p: Panel):
    if p.image is None:
        ax.axis("off")
        if p.title:
            ax.set_title(p.title, fontsize=8)
        return
    show_image(ax, p.image, title=p.title, cmap=p.cmap, vmin=p.vmin, vmax=p.vmax)
    if p.labels is not None:
        _labels_over(ax, p.labels, num_classes=p.num_classes, alpha=p.alpha, cmap=p.label_cmap)
    if p.heat is not None:
        ax.imshow(np.asarray(p.heat).T, origin="lower", **dict(p.heat_kw))
    if p.contours is not None:
        label_contours(ax, p.contours, num_classes=p.num_classes, colors=p.contour_colors)
    for x, y, fmt, kw in p.markers:
        ax.plot([x], [y], fmt, **dict(kw))
    if p.legend:
        ax.legend(fontsize=6, loc="lower left")
    if p.aspect is not None:
        ax.set_aspect(p.aspect)
    if p.ylabel:
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(p.ylabel, fontsize=8)


def panel_grid(
    path,
    rows: Sequence[Sequence[Panel | None]],
    *,
    title: str | None = None,
    panel_size=(2.6, 2.7),
    legend: Mapping[str, Any] | None = None,
    legend_style: str = "line",
    dpi: int = 110,
) -> pathlib.Path:
    """A grid of image panels, ``rows[i][j]`` at row ``i``, column ``j`` (None: an empty cell);
    writes ``path``. ``panel_size`` is each cell's (width, height) in inches; ``legend`` maps
    names to colours for a figure legend under the grid, of lines (``legend_style="line"``, for
    contours) or filled patches (``"patch"``, for overlays)."""
    if legend_style not in ("line", "patch"):
        raise ValueError(f"legend_style: expected 'line' or 'patch', got {legend_style!r}")
    rows = [list(r) for r in rows]
    if not rows or not any(rows):
        raise ValueError("panel_grid: expected at least one row of panels, got none")
    n_cols = max(len(r) for r in rows)
    pyplot = plt()
    fig, axes = pyplot.subplots(
        len(rows),
        n_cols,
        figsize=(panel_size[0] * n_cols, panel_size[1] * len(rows) + (0.3 if legend else 0.0)),
        squeeze=False,
        layout="constrained",
    )
    for i, row in enumerate(rows):
        for j in range(n_cols):
            panel = row[j] if j < len(row) else None
            if panel is None:
                axes[i, j].axis("off")
            else:
                _draw(axes[i, j], panel)
    if legend:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = [
            Line2D([], [], color=c, label=n) if legend_style == "line" else Patch(color=c, label=n)
            for n, c in legend.items()
        ]
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 6),
            fontsize=8,
            frameon=False,
        )
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path, dpi=dpi)


def deformation_grid(ax, disp2d, *, background=None, step=None, title=None, color="r"):
    """The sampling grid ``x + u(x)`` of an in-plane displacement ``(H, W, 2)`` in voxels."""
    d = np.asarray(disp2d)
    nx, ny = d.shape[:2]
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    px, py = gx + d[..., 0], gy + d[..., 1]
    step = step or max(1, nx // 24)
    if background is not None:
        ax.imshow(np.asarray(background).T, cmap="gray", origin="lower", alpha=0.5)
    for i in range(0, nx, step):
        ax.plot(px[i, :], py[i, :], "-", color=color, lw=0.5)
    for j in range(0, ny, step):
        ax.plot(px[:, j], py[:, j], "-", color=color, lw=0.5)
    ax.set_title(title or "sampling grid x + u(x) (in-plane)", fontsize=8)
    ax.axis("off")


def jacobian_map(ax, det2d, *, fig=None, title=None):
    """A Jacobian-determinant slice on a diverging scale [0, 2] (folding <= 0), with a colour bar."""
    det = np.asarray(det2d)
    im = show_image(
        ax,
        det,
        cmap="RdBu_r",
        vmin=0,
        vmax=2,
        title=title or f"Jacobian determinant (fold <= 0: {100 * np.mean(det <= 0):.2f}%)",
    )
    if fig is not None:
        fig.colorbar(im, ax=ax, fraction=0.046)
    return im


def segmentation_panels(
    path,
    image,
    truth,
    predictions: Mapping[str, np.ndarray],
    *,
    axis: int = -1,
    index: int | None = None,
    channel: int = 0,
    num_classes: int | None = None,
    title: str | None = None,
):
    """One row: the image slice, the truth overlay and each prediction's overlay; writes ``path``.

    ``image`` ``(*S)`` or ``(*S, C)`` (``channel`` shown), ``truth`` and predictions ``(*S)`` int.
    The slice (``index`` along ``axis``) defaults to the one with most foreground in ``truth``.
    """
    pyplot = plt()
    img = np.asarray(image)
    if img.ndim == np.asarray(truth).ndim + 1:
        img = img[..., channel]
    k = choose_slice(truth, axis) if index is None else int(index)
    n = 2 + len(predictions)
    fig, axes = pyplot.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    show_image(axes[0, 0], np.take(img, k, axis=axis), title="image")
    label_overlay(
        axes[0, 1],
        np.take(img, k, axis=axis),
        np.take(truth, k, axis=axis),
        num_classes=num_classes,
        title="truth",
    )
    for j, (name, pred) in enumerate(predictions.items(), start=2):
        label_overlay(
            axes[0, j],
            np.take(img, k, axis=axis),
            np.take(pred, k, axis=axis),
            num_classes=num_classes,
            title=name,
        )
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)


def bar_chart(
    path,
    categories: Sequence[str],
    series: Mapping[str, tuple],
    *,
    ylabel: str = "",
    title: str | None = None,
    ylim=None,
):
    """Grouped bars with error bars: ``series[name] = (means, stds)`` over ``categories``; writes ``path``."""
    pyplot = plt()
    fig, ax = pyplot.subplots(
        figsize=(max(5.0, 0.7 * len(categories) * max(1, len(series)) + 2), 3.6)
    )
    x = np.arange(len(categories))
    width = 0.8 / max(1, len(series))
    for i, (name, (means, stds)) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(
            x + offset,
            np.asarray(means, float),
            width,
            yerr=None if stds is None else np.asarray(stds, float),
            capsize=2,
            label=name,
        )
    ax.set_xticks(
        x,
        list(categories),
        rotation=20 if len(categories) > 4 else 0,
        ha="right" if len(categories) > 4 else "center",
        fontsize=7,
    )
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path)


def curves(
    path,
    xs,
    ys: Mapping[str, Sequence[float]],
    *,
    xlabel="step",
    ylabel="",
    title=None,
    styles: Mapping[str, str] | None = None,
    xlog_base: float | None = None,
    ylim=None,
    grid: bool = False,
    figsize=(5.5, 3.2),
    dpi: int = 110,
):
    """Line plot of several series over ``xs`` (or per-series ``(x, y)`` tuples); writes ``path``.

    ``styles`` maps a series name to a matplotlib format (``"o-"``, ``"x:"``); ``xlog_base`` gives
    a logarithmic x axis of that base."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=figsize)
    styles = styles or {}
    for name, y in ys.items():
        x, y = (y[0], y[1]) if isinstance(y, tuple) and len(y) == 2 else (xs, y)
        ax.plot(x, y, styles.get(name, "-"), label=name, lw=1)
    if xlog_base is not None:
        ax.set_xscale("log", base=xlog_base)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if grid:
        ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path, dpi=dpi)


def scatter(
    path,
    groups: Mapping[str, Any],
    *,
    xlabel="",
    ylabel="",
    title=None,
    markers: Sequence[str] = ("o", "x", "+", "s", "^", "v"),
    figsize=(4.8, 4.2),
):
    """Scatter plot of point groups, ``groups[name]`` an ``(N, 2)`` array; writes ``path``."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=figsize)
    for k, (name, pts) in enumerate(groups.items()):
        pts = np.asarray(pts, float).reshape(-1, 2)
        ax.scatter(
            pts[:, 0], pts[:, 1], s=10, marker=markers[k % len(markers)], label=name, alpha=0.7
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path)


def _slice(volume, index, axis, channel=None):
    v = np.asarray(volume)
    if channel is not None and v.ndim == 4:
        v = v[..., channel]
    return np.take(v, index, axis=axis)


def registration_panels(
    path, moving, fixed, warped, *, labels=None, index=None, axis=2, channel=0, title=None
):
    """Moving, fixed and warped images (with label contours) and |S - R|, |D - R|; writes ``path``.

    Images ``(*S)`` or ``(*S, C)`` (``channel`` shown); ``labels`` = (moving, fixed, warped)
    label maps ``(*S)`` or None. The slice ``index`` along ``axis`` defaults to the middle.
    """
    pyplot = plt()
    index = np.asarray(fixed).shape[axis] // 2 if index is None else int(index)
    m, f, w = (_slice(v, index, axis, channel) for v in (moving, fixed, warped))
    labs = (
        (None, None, None)
        if labels is None
        else [None if lab is None else _slice(lab, index, axis) for lab in labels]
    )
    fig, axes = pyplot.subplots(1, 5, figsize=(14, 3.2))
    titles = ("moving S (moving labels)", "fixed R (fixed labels)", "warped D (warped labels)")
    for ax, img, lab, t in zip(axes[:3], (m, f, w), labs, titles, strict=True):
        show_image(ax, img, title=t)
        if lab is not None:
            label_contours(ax, lab)
    vmax = float(np.abs(m - f).max()) or 1.0
    for ax, d, t in ((axes[3], m - f, "|S - R| before"), (axes[4], w - f, "|D - R| after")):
        show_image(ax, np.abs(d), title=t, cmap="magma", vmin=0, vmax=vmax)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)


def deformation_panels(path, displacement, det, *, background=None, index=None, axis=2, channel=0):
    """The in-plane sampling grid over the background and the Jacobian-determinant map; writes ``path``.

    ``displacement`` ``(*S, 3)`` in voxels, ``det`` ``(*S)``; the slice ``index`` along ``axis``
    (default the middle) shows the two in-plane components.
    """
    pyplot = plt()
    d = np.asarray(displacement)
    index = d.shape[axis] // 2 if index is None else int(index)
    plane = [k for k in range(d.ndim - 1) if k != axis]
    disp2d = np.take(d, index, axis=axis)[..., plane]
    bg = None if background is None else _slice(background, index, axis, channel)
    fig, axes = pyplot.subplots(1, 2, figsize=(8, 4))
    deformation_grid(axes[0], disp2d, background=bg)
    jacobian_map(axes[1], np.take(np.asarray(det), index, axis=axis), fig=fig)
    return save(fig, path)
