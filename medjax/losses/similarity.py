"""Image-similarity losses for registration and heatmap regression: MSE, local NCC, heatmap MSE."""

import math

import jax
import jax.numpy as jnp

_NORMALIZE = ("total", "mask")


def _pair(pred, target, min_rank=3):
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if pred.ndim < min_rank:
        raise ValueError(
            f"pred must have shape (B, *spatial, C) with rank >= {min_rank}; got {tuple(pred.shape)}"
        )
    if target.shape != pred.shape:
        raise ValueError(
            f"target must have pred's shape {tuple(pred.shape)}; got {tuple(target.shape)}"
        )
    return pred, target


def _broadcast_mask(mask, shape):
    """Mask (B, *S), (B, *S, 1) or (B, *S, C) -> float array of ``shape`` = (B, *S, C)."""
    mask = jnp.asarray(mask)
    if mask.shape == tuple(shape[:-1]):
        mask = mask[..., None]
    if mask.shape not in (tuple(shape[:-1]) + (1,), tuple(shape)):
        raise ValueError(
            f"mask must have shape {tuple(shape[:-1])}, {tuple(shape[:-1]) + (1,)} or {tuple(shape)}; "
            f"got {tuple(mask.shape)}"
        )
    return jax.lax.stop_gradient(jnp.broadcast_to(mask.astype(jnp.float32), shape))


def _reduce(values, mask, normalize):
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}; got {normalize!r}")
    if mask is None:
        return jnp.mean(values)
    m = _broadcast_mask(mask, values.shape)
    total = jnp.sum(values * m)
    if normalize == "total":
        return total / values.size
    return total / jnp.maximum(jnp.sum(m), 1.0)


def mse(pred, target, *, mask=None, normalize="total"):
    """Mean squared error: pred, target (B, *S, C) -> scalar.

    With ``mask`` ((B, *S), (B, *S, 1) or (B, *S, C)) the squared errors outside the mask are
    dropped and the sum is divided by the *total* element count (``normalize="total"``, Estienne et
    al.'s tumour-masked registration loss) or by the mask's element count (``"mask"``).
    """
    pred, target = _pair(pred, target)
    return _reduce(jnp.square(pred - target), mask, normalize)


def _box_sum(x, window):
    ndim = len(window)
    pad = [(0, 0)] + [(w // 2, w // 2) for w in window] + [(0, 0)]
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *window, 1), (1,) * (ndim + 2), pad)


def local_ncc(pred, target, *, window=9, mask=None, normalize="total", eps=1e-5):
    """Negative local normalised cross-correlation (VoxelMorph ``NCC``): (B, *S, C) pair -> scalar in [-1, 0].

    For every voxel and channel, with zero padding outside the image and n = prod(window) voxels
    per (odd-sized) window: ``cc = cross^2 / (var_I var_J + eps)`` where cross and var are the
    window sums of the centred products (VoxelMorph's formula). Returns ``-mean(cc)``, so it is a
    loss to minimise: -1 means perfectly correlated everywhere. ``mask`` / ``normalize`` as in
    :func:`mse`. ``window``: int or one odd int per spatial axis.
    """
    pred, target = _pair(pred, target)
    ndim = pred.ndim - 2
    win = (window,) * ndim if isinstance(window, int) else tuple(int(w) for w in window)
    if len(win) != ndim or any(w < 1 or w % 2 == 0 for w in win):
        raise ValueError(f"window must be an odd int or {ndim} odd ints; got {window!r}")
    n = float(math.prod(win))
    i, j = pred, target
    i_sum, j_sum = _box_sum(i, win), _box_sum(j, win)
    i2_sum, j2_sum, ij_sum = _box_sum(i * i, win), _box_sum(j * j, win), _box_sum(i * j, win)
    u_i, u_j = i_sum / n, j_sum / n
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * n
    i_var = i2_sum - 2.0 * u_i * i_sum + u_i * u_i * n
    j_var = j2_sum - 2.0 * u_j * j_sum + u_j * u_j * n
    cc = cross * cross / (i_var * j_var + eps)
    return -_reduce(cc, mask, normalize)


def heatmap_mse(pred, target, *, weight=1.0, balanced=False, others=False):
    """``weight * mean((pred - target)^2)`` for heatmap regression (FocusNetV2 SOL-Net uses weight 2).

    pred, target: (B, *S, K) heatmaps -> scalar.

    ``balanced=True`` (not the original's) weighs a heatmap's foreground (``target > 0``) and its
    background equally: for each sample and channel, the mean squared error over the foreground
    voxels and the one over the background voxels are averaged, and those are averaged over samples
    and channels (an empty foreground contributes its background term alone, halved). A Gaussian of
    sigma 2 voxels covers a few hundred voxels of a 65,536-voxel crop, so the plain mean is met by
    predicting zero everywhere; the balanced one is not.

    ``others=True`` (with ``balanced``; not the original's) splits the background in two: the
    voxels in any *other* channel's foreground and the rest, so that each channel's error is the
    mean of three means (its foreground, the others' foregrounds, the rest; an empty part drops
    out and the remaining ones are averaged). A heatmap that lights up every small organ, not only
    its own, then pays for it as much as for missing its own: in the plain balanced form those
    few hundred voxels are a negligible share of the background.
    """
    pred, target = _pair(pred, target, min_rank=2)
    if others and not balanced:
        raise ValueError("heatmap_mse: others=True needs balanced=True")
    err = jnp.square(pred - target)
    if not balanced:
        return weight * jnp.mean(err)
    axes = tuple(range(1, err.ndim - 1))
    fg = (target > 0).astype(jnp.float32)
    if not others:
        n_fg = jnp.sum(fg, axis=axes)
        n_bg = jnp.sum(1.0 - fg, axis=axes)
        mse_fg = jnp.sum(err * fg, axis=axes) / jnp.maximum(n_fg, 1.0)
        mse_bg = jnp.sum(err * (1.0 - fg), axis=axes) / jnp.maximum(n_bg, 1.0)
        return weight * jnp.mean(0.5 * (mse_fg + mse_bg))
    # fg of any other channel: (number of channels with fg at the voxel) minus this one's own
    other = ((jnp.sum(fg, axis=-1, keepdims=True) - fg) > 0).astype(jnp.float32) * (1.0 - fg)
    rest = (1.0 - fg) * (1.0 - other)
    means, present = [], []
    for part in (fg, other, rest):
        n = jnp.sum(part, axis=axes)
        means.append(jnp.sum(err * part, axis=axes) / jnp.maximum(n, 1.0))
        present.append((n > 0).astype(jnp.float32))
    total = sum(m * k for m, k in zip(means, present, strict=True))
    return weight * jnp.mean(total / jnp.maximum(sum(present), 1.0))
