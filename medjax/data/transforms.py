"""Transforms: JAX augmentations (device-side, batched, jit-able) and host-side NumPy helpers.

JAX augmentations take an explicit ``jax.random`` key and a batch ``image`` (B, *S, C) with an
optional integer ``label`` (B, *S); every sample gets its own random draw, and the image (linear) and
label (nearest) of a sample always see the SAME draw. Geometric ones return ``(image, label)``,
intensity ones return ``image``. All are pure and can be jitted (keyword parameters are static).

Parameter ranges: a scalar ``r`` means ``U(c - r, c + r)`` around the identity value ``c`` (0 for
angles, translations and brightness, 1 for scale and contrast factors); a pair ``(lo, hi)`` gives the
range itself.

Normalisation functions work on NumPy or JAX arrays with channels last (statistics per channel over
all other axes of one volume). Cropping and patch sampling are host-side NumPy with a
``numpy.random.Generator``; their first ``len(size)`` axes are spatial.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from medjax.ops import one_hot, warp

__all__ = [
    "random_affine",
    "random_elastic",
    "random_flip",
    "gaussian_noise",
    "brightness_contrast",
    "gamma",
    "gaussian_blur",
    "gaussian_filter",
    "affine_displacement",
    "elastic_displacement",
    "augment",
    "AUGMENT_ORDER",
    "percentile_clip",
    "zscore",
    "minmax",
    "ct_window",
    "brats_normalize",
    "crop_or_pad",
    "crop_to_foreground",
    "remap_labels",
    "rotation_matrices",
    "one_hot",
    "random_crop",
    "foreground_crop",
    "threshold_crop",
]


# --------------------------------------------------------------------------------------------------
# validation helpers


def _hashable(v):
    """Lists and arrays -> nested tuples, so that keyword parameters can be static under jit."""
    if isinstance(v, list | tuple | np.ndarray):
        return tuple(_hashable(u) for u in (v.tolist() if isinstance(v, np.ndarray) else v))
    if isinstance(v, np.generic):
        return v.item()
    return v


def _jit(*static):
    """jax.jit with the named keyword parameters static (lists/arrays made hashable)."""

    def deco(fn):
        jitted = jax.jit(fn, static_argnames=static)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            kwargs = {k: (_hashable(v) if k in static else v) for k, v in kwargs.items()}
            return jitted(*args, **kwargs)

        return wrapper

    return deco


def _check_batch(image, label=None):
    """Validate (B, *S, C) image and optional (B, *S) label; return (image, label, ndim)."""
    image = jnp.asarray(image)
    if image.ndim not in (4, 5):
        raise ValueError(
            f"image: expected shape (B, *S, C) with 2 or 3 spatial axes, got shape {image.shape}"
        )
    if not jnp.issubdtype(image.dtype, jnp.floating):
        image = image.astype(jnp.float32)
    ndim = image.ndim - 2
    if label is not None:
        label = jnp.asarray(label)
        if label.shape != image.shape[:-1]:
            raise ValueError(
                f"label: expected shape {image.shape[:-1]} (the image's without channels), "
                f"got {label.shape}"
            )
    return image, label, ndim


def _range(name, value, centre):
    """A scalar r -> (centre - r, centre + r); a pair -> itself. Returns floats (lo, hi)."""
    if isinstance(value, tuple | list):
        if len(value) != 2 or float(value[0]) > float(value[1]):
            raise ValueError(f"{name}: expected a scalar or a (lo, hi) pair, got {value!r}")
        return float(value[0]), float(value[1])
    v = float(value)
    if v < 0:
        raise ValueError(
            f"{name}: expected a non-negative scalar or a (lo, hi) pair, got {value!r}"
        )
    return centre - v, centre + v


def _check_prob(prob):
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"prob: expected a probability in [0, 1], got {prob!r}")
    return float(prob)


def _apply_mask(key, batch, prob):
    """Per-sample Bernoulli(prob) mask (B,) bool."""
    if prob >= 1.0:
        return jnp.ones((batch,), bool)
    return jax.random.uniform(key, (batch,)) < prob


def _bcast(v, ndim_total):
    """(B,) or (B, C) -> broadcastable against (B, *S, C)."""
    if v.ndim == 1:
        return v.reshape((-1,) + (1,) * (ndim_total - 1))
    return v.reshape((v.shape[0],) + (1,) * (ndim_total - 2) + (v.shape[1],))


# --------------------------------------------------------------------------------------------------
# geometric augmentations


def rotation_matrices(angles, ndim, *, xp=jnp):
    """(B, n_angles) radians -> (B, ndim, ndim). 2D: one angle; 3D: about axes 0, 1, 2 in turn.

    The rotation about axis k turns the plane of the other two axes (i < j) by +angle from i to j.
    ``xp`` is ``jax.numpy`` (traceable, for device-side augmentation) or ``numpy`` (float64 on the
    host, for the synthetic data): the one rotation of medjax, the same arithmetic in both.
    """
    angles = xp.asarray(angles)
    b = angles.shape[0]
    planes = [(0, 1)] if ndim == 2 else [(1, 2), (0, 2), (0, 1)]
    out = xp.broadcast_to(xp.eye(ndim, dtype=angles.dtype), (b, ndim, ndim))
    for a, (i, j) in enumerate(planes):
        c, s = xp.cos(angles[:, a]), xp.sin(angles[:, a])
        one, zero = xp.ones_like(c), xp.zeros_like(c)
        rows = [[one if r == q else zero for q in range(ndim)] for r in range(ndim)]
        rows[i][i], rows[j][j], rows[j][i], rows[i][j] = c, c, s, -s
        r = xp.stack([xp.stack(row, -1) for row in rows], -2)
        out = xp.matmul(r, out)
    return out


def affine_displacement(matrix, translation, spatial_shape, points=None):
    """Displacement (B, *S, ndim) in voxels of the map ``x -> c + matrix (x - c) + translation``.

    ``matrix`` (B, ndim, ndim) and ``translation`` (B, ndim) act on voxel coordinates about the
    volume centre ``c = (S - 1) / 2``; the output at x samples the input at the mapped point.
    ``points`` (B, *S, ndim), if given, replaces the identity grid as the points mapped (the result
    is still ``mapped - identity``).
    """
    return _affine_displacement(
        matrix, translation, points, spatial_shape=tuple(int(s) for s in spatial_shape)
    )


@_jit("spatial_shape")
def _affine_displacement(matrix, translation, points, *, spatial_shape):
    matrix = jnp.asarray(matrix, jnp.float32)
    translation = jnp.asarray(translation, jnp.float32)
    ndim = len(spatial_shape)
    if matrix.ndim != 3 or matrix.shape[1:] != (ndim, ndim):
        raise ValueError(f"matrix: expected shape (B, {ndim}, {ndim}), got {matrix.shape}")
    if translation.shape != (matrix.shape[0], ndim):
        raise ValueError(
            f"translation: expected shape ({matrix.shape[0]}, {ndim}), got {translation.shape}"
        )
    axes = [jnp.arange(n, dtype=jnp.float32) for n in spatial_shape]
    grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)
    centre = jnp.asarray([(n - 1) / 2.0 for n in spatial_shape], jnp.float32)
    x = grid[None] if points is None else points
    mapped = jnp.einsum("bij,b...j->b...i", matrix, x - centre) + centre
    mapped = mapped + translation.reshape((-1,) + (1,) * ndim + (ndim,))
    return mapped - grid[None]


@_jit("batch", "ndim", "rotation", "scale", "translation", "prob")
def _draw_affine(key, *, batch, ndim, rotation, scale, translation, prob):
    k_rot, k_scale, k_shift, k_apply = jax.random.split(key, 4)
    n_angles = 1 if ndim == 2 else 3
    lo, hi = _range("rotation", rotation, 0.0)
    angles = jnp.deg2rad(jax.random.uniform(k_rot, (batch, n_angles), minval=lo, maxval=hi))
    lo, hi = _range("scale", scale, 1.0)
    if lo <= 0:
        raise ValueError(f"scale: expected factors > 0, got range ({lo}, {hi})")
    factors = jax.random.uniform(k_scale, (batch, ndim), minval=lo, maxval=hi)
    lo, hi = _range("translation", translation, 0.0)
    shift = jax.random.uniform(k_shift, (batch, ndim), minval=lo, maxval=hi)
    matrix = rotation_matrices(angles, ndim) * factors[:, None, :]
    apply = _apply_mask(k_apply, batch, _check_prob(prob))
    matrix = jnp.where(apply[:, None, None], matrix, jnp.eye(ndim))
    shift = jnp.where(apply[:, None], shift, 0.0)
    return matrix, shift


@_jit("padding", "label_padding")
def _warp_pair(image, label, disp, *, padding, label_padding):
    out = warp(image, disp, order=1, padding=padding)
    if label is not None:
        label = warp(label[..., None], disp, order=0, padding=label_padding)[..., 0]
    return out, label


@_jit("rotation", "scale", "translation", "prob", "padding", "label_padding")
def random_affine(
    key,
    image,
    label=None,
    *,
    rotation=15.0,
    scale=0.1,
    translation=0.0,
    prob=1.0,
    padding="border",
    label_padding="zeros",
):
    """Random rotation/scaling/translation about the volume centre -> (image, label).

    Args:
      key: jax.random key.
      image: (B, *S, C) float, warped linearly. label: optional (B, *S) int, warped nearest.
      rotation: degrees (per rotation plane); scale: factor per axis; translation: voxels per axis.
      prob: per-sample probability of applying the transform (identity otherwise).
      padding, label_padding: ``"border"`` or ``"zeros"`` for points mapped outside the volume.
    """
    image, label, ndim = _check_batch(image, label)
    matrix, shift = _draw_affine(
        key,
        batch=image.shape[0],
        ndim=ndim,
        rotation=rotation,
        scale=scale,
        translation=translation,
        prob=prob,
    )
    disp = affine_displacement(matrix, shift, image.shape[1:-1])
    return _warp_pair(image, label, disp, padding=padding, label_padding=label_padding)


def _gaussian_kernel(sigma, radius):
    """Normalised 1-D Gaussian weights (..., 2 radius + 1) for a traced sigma (...)."""
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)[..., None]
    w = jnp.exp(-0.5 * (x / jnp.maximum(sigma, 1e-6)) ** 2)
    return w / w.sum(-1, keepdims=True)


def _filter_axis(x, weights, axis):
    """Correlate x (B, *S, C) along ``axis`` with per-sample weights (B, K), edge-replicating.

    One depthwise convolution: batch and channels become the feature groups.
    """
    b, c, ndim = x.shape[0], x.shape[-1], x.ndim - 2
    k = weights.shape[-1]
    radius = (k - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode="edge")
    spatial = xp.shape[1:-1]
    lhs = jnp.moveaxis(xp, 0, -2).reshape((1, *spatial, b * c))
    w = jnp.repeat(weights.astype(x.dtype), c, axis=0)  # (B*C, K), sample-major like lhs
    ksize = [1] * ndim
    ksize[axis - 1] = k
    kernel = w.T.reshape((*ksize, 1, b * c))
    spec = "NHWC" if ndim == 2 else "NDHWC"
    out = jax.lax.conv_general_dilated(
        lhs,
        kernel,
        window_strides=(1,) * ndim,
        padding="VALID",
        dimension_numbers=(spec, spec[1:-1] + "IO", spec),
        feature_group_count=b * c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.moveaxis(out.reshape((*x.shape[1:-1], b, c)), -2, 0)


def _gaussian_kernel_np(sigma, radius):
    """Normalised 1-D Gaussian weights (2 radius + 1,) float32 for a static sigma."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def gaussian_filter(image, sigma, *, truncate=4.0):
    """Gaussian smoothing over the spatial axes of (B, *S, C) -> (B, *S, C).

    ``sigma`` is a scalar or one value per spatial axis (voxels; 0 leaves an axis alone). Same as
    ``scipy.ndimage.gaussian_filter(..., mode="nearest", truncate=truncate)`` on each (b, c).
    """
    image, _, ndim = _check_batch(image)
    sig = np.broadcast_to(np.asarray(sigma, np.float64), (ndim,))
    if np.any(sig < 0):
        raise ValueError(f"sigma: expected non-negative values, got {sigma!r}")
    return _gaussian_filter(image, sigma=tuple(float(s) for s in sig), truncate=float(truncate))


@_jit("sigma", "truncate")
def _gaussian_filter(image, *, sigma, truncate):
    for k, s in enumerate(sigma):
        if s == 0:
            continue
        w = _gaussian_kernel_np(s, int(truncate * s + 0.5))
        image = _filter_axis(image, jnp.broadcast_to(w, (image.shape[0], w.size)), k + 1)
    return image


def elastic_displacement(key, batch, spatial_shape, *, sigma=4.0, magnitude=2.0):
    """Smooth random displacement (B, *S, ndim): Gaussian-filtered white noise (Simard et al.).

    ``sigma`` is the smoothing width in voxels; the noise is rescaled so that each component has
    standard deviation ``magnitude`` voxels (exactly, in expectation, away from the borders).
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if len(spatial_shape) not in (2, 3):
        raise ValueError(f"spatial_shape: expected 2 or 3 sizes, got {spatial_shape!r}")
    if float(sigma) <= 0:
        raise ValueError(f"sigma: expected > 0, got {sigma!r}")
    return _elastic_displacement(
        key,
        batch=int(batch),
        spatial_shape=spatial_shape,
        sigma=float(sigma),
        magnitude=float(magnitude),
    )


@_jit("batch", "spatial_shape", "sigma", "magnitude")
def _elastic_displacement(key, *, batch, spatial_shape, sigma, magnitude):
    ndim = len(spatial_shape)
    smooth = jax.random.normal(key, (batch, *spatial_shape, ndim))
    w = _gaussian_kernel_np(sigma, int(3.0 * sigma + 0.5))
    for k in range(ndim):
        smooth = _filter_axis(smooth, jnp.broadcast_to(w, (batch, w.size)), k + 1)
    std = float(np.sqrt(np.sum(w.astype(np.float64) ** 2))) ** ndim
    return smooth * (magnitude / std)


@_jit("sigma", "magnitude", "prob", "padding", "label_padding")
def random_elastic(
    key,
    image,
    label=None,
    *,
    sigma=4.0,
    magnitude=2.0,
    prob=1.0,
    padding="border",
    label_padding="zeros",
):
    """Random smooth (elastic) deformation applied with medjax.ops.warp -> (image, label).

    ``sigma`` (voxels) sets the smoothness and ``magnitude`` the per-component standard deviation
    (voxels) of the displacement; see :func:`elastic_displacement`. Shapes as :func:`random_affine`.
    """
    image, label, ndim = _check_batch(image, label)
    k_field, k_apply = jax.random.split(key)
    disp = elastic_displacement(
        k_field, image.shape[0], image.shape[1:-1], sigma=sigma, magnitude=magnitude
    )
    apply = _apply_mask(k_apply, image.shape[0], _check_prob(prob))
    disp = disp * _bcast(apply.astype(disp.dtype), disp.ndim)
    return _warp_pair(image, label, disp, padding=padding, label_padding=label_padding)


@_jit("axes", "prob")
def random_flip(key, image, label=None, *, axes=None, prob=0.5):
    """Flip each sample along each of ``axes`` (spatial axis indices, default all) with ``prob``.

    Returns (image, label); flipping twice with the same key is the identity.
    """
    image, label, ndim = _check_batch(image, label)
    axes = tuple(range(ndim)) if axes is None else tuple(int(a) for a in axes)
    if any(a < 0 or a >= ndim for a in axes):
        raise ValueError(f"axes: expected spatial axis indices in [0, {ndim - 1}], got {axes!r}")
    prob = _check_prob(prob)
    flips = jax.random.uniform(key, (image.shape[0], len(axes))) < prob
    for i, a in enumerate(axes):
        f = flips[:, i]
        image = jnp.where(_bcast(f, image.ndim), jnp.flip(image, a + 1), image)
        if label is not None:
            label = jnp.where(f.reshape((-1,) + (1,) * ndim), jnp.flip(label, a + 1), label)
    return image, label


# --------------------------------------------------------------------------------------------------
# intensity augmentations (image only)


@_jit("std", "prob")
def gaussian_noise(key, image, *, std=0.1, prob=1.0):
    """Add N(0, sigma^2) noise -> (B, *S, C); ``std`` a fixed sigma or a (lo, hi) range per sample."""
    image, _, _ = _check_batch(image)
    k_std, k_noise, k_apply = jax.random.split(key, 3)
    b = image.shape[0]
    if isinstance(std, tuple | list):
        lo, hi = _range("std", std, 0.0)
        sigma = jax.random.uniform(k_std, (b,), minval=lo, maxval=hi)
    else:
        if float(std) < 0:
            raise ValueError(f"std: expected >= 0, got {std!r}")
        sigma = jnp.full((b,), float(std))
    sigma = sigma * _apply_mask(k_apply, b, _check_prob(prob))
    return image + _bcast(sigma, image.ndim) * jax.random.normal(k_noise, image.shape, image.dtype)


@_jit("brightness", "contrast", "per_channel", "prob")
def brightness_contrast(key, image, *, brightness=0.1, contrast=0.25, per_channel=True, prob=1.0):
    """``(x - mean) * c + mean + b`` per sample (and channel) -> (B, *S, C).

    ``mean`` is the spatial mean; ``c`` ~ contrast range around 1, ``b`` ~ brightness range
    around 0 (image units).
    """
    image, _, ndim = _check_batch(image)
    k_b, k_c, k_apply = jax.random.split(key, 3)
    b, ch = image.shape[0], image.shape[-1]
    shape = (b, ch) if per_channel else (b, 1)
    lo, hi = _range("brightness", brightness, 0.0)
    shift = jax.random.uniform(k_b, shape, minval=lo, maxval=hi)
    lo, hi = _range("contrast", contrast, 1.0)
    factor = jax.random.uniform(k_c, shape, minval=lo, maxval=hi)
    apply = _apply_mask(k_apply, b, _check_prob(prob))[:, None]
    shift = jnp.where(apply, shift, 0.0)
    factor = jnp.where(apply, factor, 1.0)
    mean = image.mean(axis=tuple(range(1, ndim + 1)), keepdims=True)
    return (image - mean) * _bcast(factor, image.ndim) + mean + _bcast(shift, image.ndim)


@_jit("gamma", "prob", "eps")
def gamma(key, image, *, gamma=(0.7, 1.5), prob=1.0, eps=1e-7):
    """Gamma ``min + (max - min) * ((x - min) / (max - min)) ** g`` per sample and channel.

    ``g`` ~ U(gamma) (a pair, or a scalar r meaning U(1 - r, 1 + r)); min/max are spatial.
    """
    image, _, ndim = _check_batch(image)
    k_g, k_apply = jax.random.split(key)
    b, ch = image.shape[0], image.shape[-1]
    lo, hi = _range("gamma", gamma, 1.0)
    if lo <= 0:
        raise ValueError(f"gamma: expected exponents > 0, got range ({lo}, {hi})")
    g = jax.random.uniform(k_g, (b, ch), minval=lo, maxval=hi)
    g = jnp.where(_apply_mask(k_apply, b, _check_prob(prob))[:, None], g, 1.0)
    axes = tuple(range(1, ndim + 1))
    mn = image.min(axis=axes, keepdims=True)
    rng = image.max(axis=axes, keepdims=True) - mn
    unit = jnp.clip((image - mn) / (rng + eps), 0.0, 1.0)
    return mn + (rng + eps) * unit ** _bcast(g, image.ndim)


@_jit("sigma", "prob", "truncate")
def gaussian_blur(key, image, *, sigma=(0.5, 1.0), prob=1.0, truncate=3.0):
    """Gaussian blur with a per-sample sigma ~ U(sigma) (voxels, all spatial axes) -> (B, *S, C)."""
    image, _, ndim = _check_batch(image)
    k_s, k_apply = jax.random.split(key)
    b = image.shape[0]
    lo, hi = _range("sigma", sigma, 0.0)
    if lo < 0:
        raise ValueError(f"sigma: expected non-negative values, got range ({lo}, {hi})")
    if hi == 0:
        return image
    s = jax.random.uniform(k_s, (b,), minval=lo, maxval=hi)
    radius = int(truncate * hi + 0.5)
    w = _gaussian_kernel(s, radius)  # (B, K)
    identity = jnp.zeros((2 * radius + 1,)).at[radius].set(1.0)
    keep = _apply_mask(k_apply, b, _check_prob(prob)) & (s > 1e-3)
    w = jnp.where(keep[:, None], w, identity)
    for k in range(ndim):
        image = _filter_axis(image, w, k + 1)
    return image


# --------------------------------------------------------------------------------------------------
# composition

AUGMENT_ORDER = ("flip", "affine", "elastic", "brightness_contrast", "gamma", "blur", "noise")


def augment(key, image, label=None, cfg=None):
    """Apply the augmentations named in ``cfg`` in :data:`AUGMENT_ORDER` -> (image, label).

    ``cfg`` maps names to keyword dicts, e.g. ``{"flip": {"prob": 0.5}, "affine": {"rotation":
    10}, "elastic": {"sigma": 4, "magnitude": 2}, "noise": {"std": 0.05}}`` (a dict or an
    ``ml_collections.ConfigDict``). Affine and elastic are fused into one warp (elastic first,
    then affine), so the image is interpolated only once. Jit with ``cfg`` bound (static).
    """
    cfg = {} if cfg is None else {k: dict(v) for k, v in dict(cfg).items()}
    unknown = sorted(set(cfg) - set(AUGMENT_ORDER))
    if unknown:
        raise ValueError(f"cfg: expected keys among {AUGMENT_ORDER}, got unknown {unknown}")
    image, label, ndim = _check_batch(image, label)
    keys = dict(zip(AUGMENT_ORDER, jax.random.split(key, len(AUGMENT_ORDER)), strict=True))
    if "flip" in cfg:
        image, label = random_flip(keys["flip"], image, label, **cfg["flip"])
    if "affine" in cfg or "elastic" in cfg:
        spatial = image.shape[1:-1]
        b = image.shape[0]
        geo = {"padding": "border", "label_padding": "zeros"}
        disp = jnp.zeros((b, *spatial, ndim), jnp.float32)
        if "elastic" in cfg:
            el = dict(cfg["elastic"])
            for k in ("padding", "label_padding"):
                geo[k] = el.pop(k, geo[k])
            k_field, k_apply = jax.random.split(keys["elastic"])
            prob = _check_prob(el.pop("prob", 1.0))
            disp = elastic_displacement(k_field, b, spatial, **el)
            disp = disp * _bcast(_apply_mask(k_apply, b, prob).astype(disp.dtype), disp.ndim)
        if "affine" in cfg:
            af = {"rotation": 15.0, "scale": 0.1, "translation": 0.0, "prob": 1.0}
            af.update(cfg["affine"])
            for k in ("padding", "label_padding"):
                geo[k] = af.pop(k, geo[k])
            matrix, shift = _draw_affine(keys["affine"], batch=b, ndim=ndim, **af)
            axes = [jnp.arange(n, dtype=jnp.float32) for n in spatial]
            grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)
            disp = affine_displacement(matrix, shift, spatial, points=grid[None] + disp)
        image, label = _warp_pair(
            image, label, disp, padding=geo["padding"], label_padding=geo["label_padding"]
        )
    if "brightness_contrast" in cfg:
        image = brightness_contrast(
            keys["brightness_contrast"], image, **cfg["brightness_contrast"]
        )
    if "gamma" in cfg:
        image = gamma(keys["gamma"], image, **cfg["gamma"])
    if "blur" in cfg:
        image = gaussian_blur(keys["blur"], image, **cfg["blur"])
    if "noise" in cfg:
        image = gaussian_noise(keys["noise"], image, **cfg["noise"])
    return image, label


# --------------------------------------------------------------------------------------------------
# intensity normalisation (NumPy or JAX, one volume, channels last)


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def _stat_axes(x, channel_axis):
    if channel_axis is None:
        return tuple(range(x.ndim))
    ax = channel_axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != ax)


def _as_float(x):
    xp = _xp(x)
    x = xp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"x: expected an array with at least one axis, got shape {x.shape}")
    if not xp.issubdtype(x.dtype, xp.floating):
        x = x.astype(xp.float32)
    return xp, x


def percentile_clip(x, lower=0.1, upper=99.8, *, channel_axis=-1):
    """Clip each channel to its [lower, upper] percentiles (0-100) -> same shape as x."""
    if not 0.0 <= lower <= upper <= 100.0:
        raise ValueError(f"lower/upper: expected 0 <= lower <= upper <= 100, got {lower}, {upper}")
    xp, x = _as_float(x)
    axes = _stat_axes(x, channel_axis)
    lo = xp.percentile(x, lower, axis=axes, keepdims=True)
    hi = xp.percentile(x, upper, axis=axes, keepdims=True)
    return xp.clip(x, lo, hi).astype(x.dtype)


def zscore(x, *, nonzero=False, channel_axis=-1, eps=1e-8):
    """Per-channel ``(x - mean) / std`` -> same shape as x.

    With ``nonzero=True`` the statistics come from the non-zero voxels of each channel and zero
    voxels stay 0 (MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``). A channel with
    std 0 is only centred.
    """
    xp, x = _as_float(x)
    axes = _stat_axes(x, channel_axis)
    mask = (x != 0) if nonzero else xp.ones_like(x, dtype=bool)
    m = mask.astype(x.dtype)
    count = xp.maximum(m.sum(axis=axes, keepdims=True), 1.0)
    mean = (x * m).sum(axis=axes, keepdims=True) / count
    var = (((x - mean) * m) ** 2).sum(axis=axes, keepdims=True) / count
    std = xp.sqrt(var)
    std = xp.where(std < eps, 1.0, std)
    out = (x - mean) / std
    return xp.where(mask, out, x).astype(x.dtype)


def minmax(x, lower=0.0, upper=1.0, *, channel_axis=-1, eps=1e-8):
    """Per-channel linear rescale of [min, max] to [lower, upper] -> same shape as x."""
    xp, x = _as_float(x)
    axes = _stat_axes(x, channel_axis)
    mn = x.min(axis=axes, keepdims=True)
    mx = x.max(axis=axes, keepdims=True)
    rng = xp.where(mx - mn < eps, 1.0, mx - mn)
    return ((x - mn) / rng * (upper - lower) + lower).astype(x.dtype)


def ct_window(x, level, width, *, out_range=(0.0, 1.0)):
    """CT window: clip to [level - width/2, level + width/2] and map that to ``out_range``."""
    if float(width) <= 0:
        raise ValueError(f"width: expected > 0, got {width!r}")
    xp, x = _as_float(x)
    lo = float(level) - float(width) / 2.0
    unit = xp.clip((x - lo) / float(width), 0.0, 1.0)
    a, b = out_range
    return (a + (b - a) * unit).astype(x.dtype)


def brats_normalize(x, *, channel_axis=-1):
    """MedicalZoo's "brats" normalisation, per channel, zeros kept at 0 -> same shape as x.

    As the original computes it: ``z = (x - mean) / std`` (statistics over the whole volume,
    zeros included), then ``100 * (z - min) / (max - min) + 10`` with min/max of the *raw*
    volume, on non-zero voxels only.
    """
    xp, x = _as_float(x)
    axes = _stat_axes(x, channel_axis)
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True, ddof=1)
    mn = x.min(axis=axes, keepdims=True)
    mx = x.max(axis=axes, keepdims=True)
    std = xp.where(std == 0, 1.0, std)
    rng = xp.where(mx - mn == 0, 1.0, mx - mn)
    out = 100.0 * ((x - mean) / std - mn) / rng + 10.0
    return xp.where(x == 0, x, out).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# cropping and labels (host, NumPy)


def _check_size(size, shape, name="size"):
    try:
        size = tuple(int(s) for s in size)
    except TypeError:
        raise ValueError(f"{name}: expected a tuple of spatial sizes, got {size!r}") from None
    if len(size) > len(shape) or min(size, default=1) < 1:
        raise ValueError(
            f"{name}: expected at most {len(shape)} positive sizes for array shape {shape}, got {size}"
        )
    return size


def crop_or_pad(x, shape, *, pad_value=0):
    """Centre crop and/or pad the first ``len(shape)`` axes of x to ``shape`` -> (*shape, ...).

    Padding puts the odd voxel after (``before = diff // 2``); cropping starts at
    ``n // 2 - s // 2`` (MONAI ``ResizeWithPadOrCrop`` conventions).
    """
    x = np.asarray(x)
    shape = _check_size(shape, x.shape, "shape")
    pad = [(0, 0)] * x.ndim
    for k, s in enumerate(shape):
        if s > x.shape[k]:
            d = s - x.shape[k]
            pad[k] = (d // 2, d - d // 2)
    if any(p != (0, 0) for p in pad):
        x = np.pad(x, pad, mode="constant", constant_values=pad_value)
    sl = [slice(None)] * x.ndim
    for k, s in enumerate(shape):
        start = x.shape[k] // 2 - s // 2
        sl[k] = slice(start, start + s)
    return x[tuple(sl)]


def crop_to_foreground(image, label=None, *, margin=0, threshold=0.0, source="image"):
    """Crop to the bounding box of the foreground (+ margin) -> (image, label, box).

    Args:
      image: (*S, C) channels-last; foreground where any channel > ``threshold``.
      label: optional (*S); cropped alike. With ``source="label"`` the foreground is label > 0.
      margin: voxels added on every side (clipped to the volume).

    Returns:
      (image crop, label crop or None, box) with box a tuple of (start, stop) per spatial axis.
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"image: expected shape (*S, C), got {image.shape}")
    spatial = image.shape[:-1]
    if label is not None:
        label = np.asarray(label)
        if label.shape != spatial:
            raise ValueError(f"label: expected shape {spatial}, got {label.shape}")
    if source == "image":
        fg = (image > threshold).any(axis=-1)
    elif source == "label":
        if label is None:
            raise ValueError("label: expected a label array when source='label', got None")
        fg = label > 0
    else:
        raise ValueError(f"source: expected 'image' or 'label', got {source!r}")
    if not fg.any():
        raise ValueError(f"{source}: expected some foreground voxels, found none")
    box = []
    for k in range(len(spatial)):
        other = tuple(a for a in range(len(spatial)) if a != k)
        idx = np.nonzero(fg.any(axis=other))[0]
        box.append((max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, spatial[k])))
    sl = tuple(slice(a, b) for a, b in box)
    return image[sl], (None if label is None else label[sl]), tuple(box)


def remap_labels(label, mapping):
    """Map label values through ``mapping`` (dict old -> new) -> int32 array, same shape.

    The same as :func:`medjax.data.io.remap_labels` (the one implementation): a value missing from
    ``mapping`` raises ``ValueError`` naming it.
    """
    from medjax.data.io import remap_labels as _remap

    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.all(np.mod(label, 1) == 0):
            raise ValueError("label: expected integer values, got non-integer floats")
        label = label.astype(np.int64)
    elif label.dtype.kind not in "iub":
        raise ValueError(f"label: expected an integer array, got dtype {label.dtype}")
    return _remap(label, mapping, source="label")


# --------------------------------------------------------------------------------------------------
# patch sampling (host, NumPy Generator)


def _crop_at(x, start, size):
    if x is None:
        return None
    return x[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))]


def _prepare(image, label, size):
    image = np.asarray(image)
    size = _check_size(size, image.shape)
    if any(s > n for s, n in zip(size, image.shape, strict=False)):
        raise ValueError(
            f"size: expected each size <= the volume's {image.shape[: len(size)]}, got {size}"
        )
    if label is not None:
        label = np.asarray(label)
        if label.shape[: len(size)] != image.shape[: len(size)]:
            raise ValueError(
                f"label: expected spatial shape {image.shape[: len(size)]}, got {label.shape}"
            )
    return image, label, size


def random_crop(rng, image, label=None, *, size):
    """Uniformly placed crop of ``size`` (first axes spatial) -> (image crop, label crop or None)."""
    image, label, size = _prepare(image, label, size)
    start = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, image.shape, strict=False)]
    return _crop_at(image, start, size), _crop_at(label, start, size)


def foreground_crop(rng, image, label, *, size, pos_ratio=0.5):
    """Crop centred on a foreground (label > 0) voxel with probability p, else on background.

    ``pos_ratio`` is p in [0, 1], or a ``(pos, neg)`` pair meaning p = pos / (pos + neg) (MONAI
    ``RandCropByPosNegLabel``). The centre voxel is uniform within its class; the crop is shifted
    to stay inside the volume. Falls back to the other class when one is empty.
    Returns (image crop, label crop).
    """
    image, label, size = _prepare(image, label, size)
    if isinstance(pos_ratio, tuple | list):
        pos, neg = (float(v) for v in pos_ratio)
        if pos < 0 or neg < 0 or pos + neg == 0:
            raise ValueError(f"pos_ratio: expected non-negative (pos, neg), got {pos_ratio!r}")
        p = pos / (pos + neg)
    else:
        p = float(pos_ratio)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"pos_ratio: expected a fraction in [0, 1] or (pos, neg), got {p!r}")
    fg = label[tuple(slice(None) for _ in size)] > 0
    if fg.ndim > len(size):
        fg = fg.reshape(fg.shape[: len(size)] + (-1,)).any(-1)
    positive = rng.random() < p
    cls = fg if positive else ~fg
    idx = np.flatnonzero(cls)
    if idx.size == 0:
        idx = np.flatnonzero(~cls)
    centre = np.unravel_index(idx[int(rng.integers(idx.size))], fg.shape)
    start = [
        int(min(max(c - s // 2, 0), n - s))
        for c, s, n in zip(centre, size, image.shape, strict=False)
    ]
    return _crop_at(image, start, size), _crop_at(label, start, size)


def _box_sums(mask, size):
    """Sum of ``mask`` over every placement of a ``size`` box -> (n_k - s_k + 1, ...)."""
    c = mask.astype(np.int64)
    for k in range(c.ndim):
        c = np.cumsum(c, axis=k)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=k)), c], axis=k)
    out = 0
    nd = c.ndim
    for corner in np.ndindex(*(2,) * nd):
        sl = tuple(
            slice(s, n + 1) if bit else slice(0, n - s + 1)
            for bit, s, n in zip(corner, size, mask.shape, strict=True)
        )
        out = out + (-1) ** (nd - sum(corner)) * c[sl]
    return out


def threshold_crop(rng, image, label, *, size, min_fraction, relative_to="label", max_tries=100):
    """Random crop kept only if its foreground (label > 0) covers at least ``min_fraction``.

    ``relative_to="label"`` (MedicalZoo's ``th_percent``): crop foreground / all foreground of the
    volume; ``"crop"``: crop foreground / crop voxels. Tries ``max_tries`` uniform placements, then
    draws uniformly among all placements that qualify (so the result is uniform over them either
    way). Raises ValueError when no placement reaches ``min_fraction``.
    Returns (image crop, label crop).
    """
    image, label, size = _prepare(image, label, size)
    if relative_to not in ("label", "crop"):
        raise ValueError(f"relative_to: expected 'label' or 'crop', got {relative_to!r}")
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction: expected a fraction in [0, 1], got {min_fraction!r}")
    fg = label[tuple(slice(None) for _ in size)] > 0
    if fg.ndim > len(size):
        fg = fg.reshape(fg.shape[: len(size)] + (-1,)).any(-1)
    denom = float(fg.sum()) if relative_to == "label" else float(math.prod(size))
    if denom == 0:
        raise ValueError("label: expected some foreground voxels (label > 0), found none")
    for _ in range(int(max_tries)):
        start = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, fg.shape, strict=True)]
        if _crop_at(fg, start, size).sum() / denom >= min_fraction:
            return _crop_at(image, start, size), _crop_at(label, start, size)
    frac = _box_sums(fg, size) / denom
    ok = np.flatnonzero(frac >= min_fraction)
    if ok.size == 0:
        raise ValueError(
            f"min_fraction: no crop of size {size} reaches {min_fraction} (best {frac.max():.4f}, "
            f"relative to {relative_to})"
        )
    start = np.unravel_index(ok[int(rng.integers(ok.size))], frac.shape)
    return _crop_at(image, start, size), _crop_at(label, start, size)
