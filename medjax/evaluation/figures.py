"""The one figure module: slice choice, images with label contours or overlays, deformation grids,
Jacobian maps, bar charts with error bars and training curves (matplotlib, Agg backend).

Arrays are medjax's: volumes ``(*S)`` or ``(*S, C)`` with ``S = (X, Y, Z)``; a 2D slice is shown
with its first axis horizontal (``origin="lower"``, transposed), as the experiments' figures always
were. Every function that writes a file returns its path and closes its figure.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "bar_chart",
    "deformation_panels",
    "registration_panels",
    "choose_slice",
    "curves",
    "deformation_grid",
    "jacobian_map",
    "label_contours",
    "label_overlay",
    "plt",
    "save",
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
    """Write ``fig`` to ``path`` (creating its folder), close it, return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def label_contours(ax, labels2d, *, num_classes=None, colors=None, linewidths=0.7):
    """Draw one contour per label value of a 2D integer map (tab10 colours unless ``colors``)."""
    lab = np.asarray(labels2d)
    top = int(lab.max()) if num_classes is None else int(num_classes) - 1
    if top < 1 or not lab.any():
        return
    kw = {"colors": colors} if colors is not None else {"cmap": "tab10"}
    ax.contour(lab.T, levels=np.arange(0.5, top + 1), linewidths=linewidths, origin="lower", **kw)


def label_overlay(ax, image2d, labels2d, *, num_classes=None, alpha=0.55, title=None):
    """An image with its labels as a semi-transparent colour overlay (background transparent)."""
    show_image(ax, image2d, title=title)
    lab = np.asarray(labels2d)
    vmax = int(lab.max()) if num_classes is None else int(num_classes) - 1
    ax.imshow(
        np.ma.masked_equal(lab, 0).T,
        cmap="tab10",
        vmin=0,
        vmax=max(vmax, 1),
        alpha=alpha,
        origin="lower",
        interpolation="nearest",
    )


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


def curves(path, xs, ys: Mapping[str, Sequence[float]], *, xlabel="step", ylabel="", title=None):
    """Line plot of several series over ``xs`` (or per-series ``(x, y)`` tuples); writes ``path``."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 3.2))
    for name, y in ys.items():
        if isinstance(y, tuple) and len(y) == 2:
            ax.plot(y[0], y[1], label=name, lw=1)
        else:
            ax.plot(xs, y, label=name, lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(ys) > 1:
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
