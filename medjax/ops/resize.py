"""(Bi/tri)linear resizing with torch ``F.interpolate`` semantics, and pixel shuffle."""

import math

import jax.numpy as jnp
import numpy as np

__all__ = ["resize", "pixel_shuffle"]


def _check_image(name, x):
    if x.ndim not in (4, 5):
        raise ValueError(
            f"{name}: expected shape (B, *S, C) with 2 or 3 spatial axes, got shape {x.shape}"
        )
    return x.ndim - 2


def _per_axis(name, value, ndim):
    if np.ndim(value) == 0:
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{name}: expected a scalar or {ndim} values, got {value!r}")
    return value


def _linear_axis(x, axis, out_size, *, align_corners, scale):
    """Resample one axis. ``scale`` is torch's output/input factor when given, else None."""
    in_size = x.shape[axis]
    if out_size == in_size and (scale is None or scale == 1.0):
        return x
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        ratio = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * ratio
    else:
        ratio = 1.0 / scale if scale is not None and scale > 0 else in_size / out_size
        src = np.maximum(ratio * (dst + 0.5) - 0.5, 0.0)
    # torch computes source indices in float32 ("accscalar" for float input on CPU is float).
    src = src.astype(np.float32)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    w = (src - lo.astype(np.float32)).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w = jnp.asarray(w, dtype=x.dtype).reshape(shape)
    lower = jnp.take(x, jnp.asarray(lo), axis=axis)
    upper = jnp.take(x, jnp.asarray(hi), axis=axis)
    return lower + w * (upper - lower)


def resize(x, scale=None, *, align_corners=True, shape=None):
    """(Bi/tri)linear resize of (B, *S, C) -> (B, *S', C), as torch ``F.interpolate``.

    Give either ``scale`` (a float or one per spatial axis; ``S'_k = floor(S_k * scale_k)``, and
    with ``align_corners=False`` the source coordinates use ``1 / scale`` like torch) or
    ``shape`` (the output spatial shape). ``align_corners=True`` maps the corner voxel centres
    onto each other (UniverSeg's upsampling; ``jax.image.resize`` does not do this).
    """
    x = jnp.asarray(x)
    ndim = _check_image("x", x)
    if (scale is None) == (shape is None):
        raise ValueError(
            f"scale/shape: expected exactly one of them, got scale={scale!r}, shape={shape!r}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    in_shape = x.shape[1:-1]
    if shape is not None:
        out_shape = tuple(int(s) for s in _per_axis("shape", shape, ndim))
        scales = (None,) * ndim
    else:
        scales = tuple(float(s) for s in _per_axis("scale", scale, ndim))
        if min(scales) <= 0:
            raise ValueError(f"scale: expected positive factors, got {scale!r}")
        out_shape = tuple(int(math.floor(n * s)) for n, s in zip(in_shape, scales, strict=True))
    if min(out_shape) < 1:
        raise ValueError(f"shape: expected an output spatial shape >= 1, got {out_shape}")
    for k in range(ndim):
        x = _linear_axis(x, 1 + k, out_shape[k], align_corners=align_corners, scale=scales[k])
    return x


def pixel_shuffle(x, factor):
    """Rearrange channels into space: (B, *S, C * r**ndim) -> (B, *(S * r), C).

    Channels-last equivalent of torch ``nn.PixelShuffle`` (2D) and its 3D analogue: output
    channel c at sub-position (i, j[, l]) reads input channel ``c * r**ndim + i * r**(ndim-1) + ...``.
    """
    x = jnp.asarray(x)
    ndim = _check_image("x", x)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor: expected a positive int, got {factor!r}")
    b, *spatial, ch = x.shape
    if ch % factor**ndim:
        raise ValueError(
            f"x: expected channels divisible by factor**ndim = {factor**ndim}, got {ch} channels"
        )
    c = ch // factor**ndim
    x = x.reshape(b, *spatial, c, *([factor] * ndim))
    # axes: 0 batch, 1..ndim spatial, ndim+1 channel, ndim+2.. sub-positions
    perm = [0]
    for k in range(ndim):
        perm += [1 + k, ndim + 2 + k]
    perm.append(ndim + 1)
    x = x.transpose(perm)
    return x.reshape(b, *[s * factor for s in spatial], c)
