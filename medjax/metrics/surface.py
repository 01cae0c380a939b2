"""Surface-distance metrics (host-side NumPy/SciPy): percentile Hausdorff distance and ASSD.

Both follow MONAI's ``HausdorffDistanceMetric`` / ``SurfaceDistanceMetric`` (euclidean):

* the surface of a binary mask is ``mask & ~binary_erosion(mask)`` (face connectivity; voxels on
  the image border count as surface);
* distances are exact Euclidean distances, in physical units through ``spacing``, from each surface
  voxel of one mask to the nearest surface voxel of the other;
* empty-mask conventions: both masks empty -> NaN; exactly one empty -> inf for the maximum
  Hausdorff distance and the ASSD, but NaN for a percentile Hausdorff distance (MONAI interpolates
  between infinite distances in ``torch.quantile``, which gives NaN; medjax keeps that result so that
  aggregates agree with MONAI's).
"""

import numpy as np
from scipy import ndimage

from medjax.metrics._checks import check_label_maps


def _spacings(spacing, batch, ndim):
    """Per-sample spacing list [(ndim,) float64] from None, a number, (ndim,) or (B, ndim)."""
    if spacing is None:
        return [np.ones(ndim)] * batch
    s = np.asarray(spacing, dtype=np.float64)
    if s.ndim == 0:
        s = np.full((batch, ndim), float(s))
    elif s.shape == (ndim,):
        s = np.broadcast_to(s, (batch, ndim))
    elif s.shape == (batch, 1):
        s = np.broadcast_to(s, (batch, ndim))
    elif s.shape != (batch, ndim):
        raise ValueError(
            f"spacing must be a number, ({ndim},) or ({batch}, {ndim}); got shape {s.shape}"
        )
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be finite and > 0; got {spacing!r}")
    return list(s)


def _crop_to_union(pm, tm):
    """Crop both masks to the bounding box of their union grown by 1 voxel (clipped to the image).

    Surfaces and distances are unchanged: the extra voxel keeps the erosion exact, and the
    Euclidean distance transform is not restricted to paths inside the crop.
    """
    union = pm | tm
    if not union.any():
        return pm, tm
    idx = np.nonzero(union)
    box = tuple(
        slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n))
        for i, n in zip(idx, union.shape, strict=True)
    )
    return pm[box], tm[box]


def _surface(mask):
    return mask & ~ndimage.binary_erosion(mask)


def _directed(src_edges, dst_edges, sampling):
    """Distances from every voxel of ``src_edges`` to the nearest voxel of ``dst_edges``."""
    dist = ndimage.distance_transform_edt(~dst_edges, sampling=sampling)
    return dist[src_edges]


def _pairwise(pred, target, num_classes, spacing, include_background, fn, one_empty):
    pred = np.asarray(pred)
    target = np.asarray(target)
    check_label_maps(pred, target, num_classes)
    batch, ndim = pred.shape[0], pred.ndim - 1
    spacings = _spacings(spacing, batch, ndim)
    classes = range(0 if include_background else 1, num_classes)
    out = np.empty((batch, len(classes)), dtype=np.float64)
    for b in range(batch):
        for k, c in enumerate(classes):
            pm, tm = _crop_to_union(pred[b] == c, target[b] == c)
            pe, te = _surface(pm), _surface(tm)
            if not pe.any() and not te.any():
                out[b, k] = np.nan
            elif not pe.any() or not te.any():
                out[b, k] = one_empty
            else:
                out[b, k] = fn(_directed(pe, te, spacings[b]), _directed(te, pe, spacings[b]))
    return out


def hausdorff_distance(
    pred, target, *, num_classes, percentile=95, spacing=None, include_background=False
):
    """Symmetric percentile Hausdorff distance: label maps (B, *S) -> (B, C) float64.

    ``max(q-th percentile of d(P->T), q-th percentile of d(T->P))`` over surface voxels (linear
    interpolation between ranks, as ``torch.quantile``); ``percentile=None`` gives the maximum
    (classic Hausdorff). C = num_classes, minus 1 without background. ``spacing``: None (1 per axis),
    a number, one value per spatial axis, or (B, ndim). Both masks empty -> NaN; exactly one empty ->
    inf when ``percentile`` is None, NaN otherwise (MONAI's results; see the module docstring).
    (MONAI also treats ``percentile=0`` as the maximum; medjax gives the 0th percentile.)
    """
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be None or in [0, 100]; got {percentile}")

    def fn(d_pt, d_tp):
        if percentile is None:
            return max(d_pt.max(), d_tp.max())
        return max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile))

    one_empty = np.inf if percentile is None else np.nan
    return _pairwise(pred, target, num_classes, spacing, include_background, fn, one_empty)


def surface_distance(
    pred, target, *, num_classes, spacing=None, include_background=False, symmetric=True
):
    """Average surface distance: label maps (B, *S) -> (B, C) float64.

    ``symmetric=True`` (ASSD): the mean over the union of both directed distance sets
    d(P->T) and d(T->P); ``symmetric=False``: the mean of d(P->T). Units, spacing, C and the
    empty-mask conventions (both empty -> NaN, one empty -> inf) as in the module docstring.
    """

    def fn(d_pt, d_tp):
        if symmetric:
            return np.concatenate([d_pt, d_tp]).mean()
        return d_pt.mean()

    return _pairwise(pred, target, num_classes, spacing, include_background, fn, np.inf)
