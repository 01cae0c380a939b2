"""Sliding-window inference over channels-last volumes (MONAI ``sliding_window_inference`` semantics)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_MODES = ("gaussian", "constant")


def _per_axis(value, ndim, name):
    if isinstance(value, (int, float, np.integer, np.floating)) or value is None:
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per spatial axis); got {value!r}")
    return value


def _window_starts(image_size, roi_size, overlap):
    """Window start corners, MONAI's ``_get_scan_interval`` + ``dense_patch_slices``: (N, ndim) int."""
    per_axis = []
    for size, roi, ov in zip(image_size, roi_size, overlap, strict=True):
        interval = roi if roi == size else max(int(roi * (1 - ov)), 1)
        num = 1
        for d in range(int(math.ceil(size / interval))):
            if d * interval + roi >= size:
                num = d + 1
                break
        starts = []
        for d in range(num):
            s = d * interval
            starts.append(s - max(s + roi - size, 0))
        per_axis.append(starts)
    grids = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=-1).astype(np.int32)


def importance_map(roi_size, mode="gaussian", sigma_scale=0.125):
    """Blending weights (*roi_size,) float32: ones, or a separable Gaussian with sigma = sigma_scale * roi.

    Matches MONAI ``compute_importance_map``: Gaussian centred on the window, values clamped below at
    max(min value, 1e-3).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
    roi_size = tuple(int(r) for r in roi_size)
    if mode == "constant":
        return np.ones(roi_size, np.float32)
    scales = _per_axis(sigma_scale, len(roi_size), "sigma_scale")
    w = np.ones((), np.float32)
    for n, sc in zip(roi_size, scales, strict=True):
        sigma = np.float32(n * sc)
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / (np.float32(-2.0) * sigma**2)).astype(np.float32)
        w = w[..., None] * g
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _cached_jit(predictor):
    return jax.jit(predictor)


def _jitted(predictor):
    """``jax.jit(predictor)``, cached by equality rather than identity.

    ``model.apply`` is a new bound-method object at every attribute access, so jax's own cache
    (per function object) would compile it again for every volume; equal bound methods share here.
    """
    try:
        return _cached_jit(predictor)
    except TypeError:  # an unhashable callable: jax's per-object cache only
        return jax.jit(predictor)


@functools.partial(jax.jit, static_argnums=(3,))
def _extract(volume, bidx, starts, roi_size):
    channels = volume.shape[-1]

    def one(b, s):
        corner = (b, *[s[k] for k in range(len(roi_size))], 0)
        return jax.lax.dynamic_slice(volume, corner, (1, *roi_size, channels))[0]

    return jax.vmap(one)(bidx, starts)


@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(out, preds, weight, bidx, starts, valid):
    ndim = weight.ndim

    def body(i, acc):
        corner = (bidx[i], *[starts[i, k] for k in range(ndim)], 0)
        size = (1, *preds.shape[1:])
        cur = jax.lax.dynamic_slice(acc, corner, size)
        upd = cur + (preds[i] * weight[..., None] * valid[i])[None]
        return jax.lax.dynamic_update_slice(acc, upd, corner)

    return jax.lax.fori_loop(0, preds.shape[0], body, out)


def sliding_window_inference(
    volume,
    roi_size,
    predictor,
    *,
    overlap=0.25,
    mode="gaussian",
    sw_batch_size=1,
    sigma_scale=0.125,
    pad_value=0.0,
    jit_predictor=True,
    args=(),
):
    """Blend a windowed predictor over a whole volume: (B, *S, C) -> (B, *S, K) float32.

    ``predictor`` maps windows (n, *roi_size, C) -> (n, *roi_size, K); it is wrapped in ``jax.jit``
    (unless ``jit_predictor=False``, e.g. for a host callback) and always sees n = sw_batch_size
    (the last group is filled with repeated windows whose outputs are discarded), so it compiles
    once per window shape. Works for 2D and 3D. Semantics follow MONAI: a volume smaller than the
    ROI is padded with ``pad_value`` (split floor/ceil before/after) and cropped back; windows step
    by ``int(roi * (1 - overlap))`` (at least 1) and the last one is shifted to end at the border;
    overlapping predictions are averaged with ``importance_map(roi_size, mode, sigma_scale)``
    weights. When a single window covers the volume the result equals one predictor call exactly.
    ``roi_size``: int or one per spatial axis; None or <= 0 means the full axis.
    ``args``: extra arguments, e.g. the model variables: ``predictor(windows, *args)``. Passing
    parameters here rather than closing over them keeps them out of the compiled code, so the same
    ``predictor`` (e.g. ``model.apply``) compiles once for every volume and every set of weights.
    """
    volume = jnp.asarray(volume)
    if volume.ndim < 3:
        raise ValueError(f"volume must have shape (B, *spatial, C); got {tuple(volume.shape)}")
    ndim = volume.ndim - 2
    batch, *image_size, channels = volume.shape
    roi = _per_axis(roi_size, ndim, "roi_size")
    roi = tuple(
        int(s) if r is None or r <= 0 else int(r) for r, s in zip(roi, image_size, strict=True)
    )
    overlap = _per_axis(overlap, ndim, "overlap")
    if any(not 0 <= o < 1 for o in overlap):
        raise ValueError(f"overlap must be in [0, 1); got {overlap!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
    if not isinstance(sw_batch_size, (int, np.integer)) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int; got {sw_batch_size!r}")

    padded_size = tuple(max(s, r) for s, r in zip(image_size, roi, strict=True))
    before = [(p - s) // 2 for p, s in zip(padded_size, image_size, strict=True)]
    pads = [(0, 0)] + [
        (b, p - s - b) for b, p, s in zip(before, padded_size, image_size, strict=True)
    ]
    if any(any(p) for p in pads):
        volume = jnp.pad(volume, pads + [(0, 0)], constant_values=pad_value)

    starts = _window_starts(padded_size, roi, overlap)
    num_win = len(starts)
    weight = np.ones(roi, np.float32) if num_win == 1 else importance_map(roi, mode, sigma_scale)
    count = np.zeros(padded_size, np.float32)
    for s in starts:
        count[tuple(slice(int(a), int(a) + r) for a, r in zip(s, roi, strict=True))] += weight

    fn = _jitted(predictor) if jit_predictor else predictor
    total = batch * num_win
    out = None
    weight_j = jnp.asarray(weight)
    for g in range(0, total, sw_batch_size):
        idx = np.arange(g, g + sw_batch_size)
        valid = (idx < total).astype(np.float32)
        idx = np.minimum(idx, total - 1)
        bidx = jnp.asarray(idx // num_win, jnp.int32)
        win_starts = jnp.asarray(starts[idx % num_win])
        windows = _extract(volume, bidx, win_starts, roi)
        preds = jnp.asarray(fn(windows, *args))
        if preds.ndim != ndim + 2 or preds.shape[:-1] != (sw_batch_size, *roi):
            raise ValueError(
                f"predictor must map {(sw_batch_size, *roi, channels)} -> "
                f"{(sw_batch_size, *roi)} + (K,); got output shape {tuple(preds.shape)}"
            )
        if out is None:
            out = jnp.zeros((batch, *padded_size, preds.shape[-1]), jnp.float32)
        out = _accumulate(
            out, preds.astype(jnp.float32), weight_j, bidx, win_starts, jnp.asarray(valid)
        )
    out = out / jnp.asarray(count)[None, ..., None]
    crop = tuple(slice(b, b + s) for b, s in zip(before, image_size, strict=True))
    return out[(slice(None), *crop, slice(None))]
