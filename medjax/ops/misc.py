"""Small array helpers: one-hot labels, Gaussian heatmaps, finite-difference spatial gradients."""

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["one_hot", "gaussian_heatmap", "spatial_gradient", "forward_differences"]


def one_hot(labels, num_classes):
    """One-hot float32 encoding: integer labels (...) -> (..., num_classes).

    When ``labels`` is concrete (not traced), values outside ``[0, num_classes)`` raise ValueError;
    under ``jit`` they silently give an all-zero row.
    """
    if not isinstance(num_classes, int | np.integer) or isinstance(num_classes, bool):
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if not isinstance(labels, jax.core.Tracer):
        arr = np.asarray(labels)
        if arr.dtype.kind == "f":
            if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ValueError("labels: expected integer values, got non-integer floats")
        elif arr.dtype.kind not in "iub":
            raise ValueError(f"labels: expected an integer array, got dtype {arr.dtype}")
        if arr.size:
            lo, hi = arr.min(), arr.max()
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"labels: expected values in [0, {num_classes - 1}] for "
                    f"num_classes={num_classes}, got range [{lo}, {hi}]"
                )
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(jnp.int32)
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def gaussian_heatmap(spatial_shape, centres, sigma):
    """Gaussian heatmaps ``exp(-|x - c|^2 / (2 sigma^2))``: (N, *spatial_shape) float32.

    centres: (N, ndim) voxel coordinates (each heatmap is exactly 1 at an integer centre).
    sigma: a scalar, per-axis ``(ndim,)``, per-heatmap ``(N,)`` or ``(N, 1)``, or ``(N, ndim)``, in
    voxels. A 1-D sigma of length ndim is always per axis; when N == ndim, give a per-heatmap sigma
    as ``(N, 1)``.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    ndim = len(spatial_shape)
    if ndim not in (1, 2, 3) or min(spatial_shape) < 1:
        raise ValueError(f"spatial_shape: expected 1 to 3 positive sizes, got {spatial_shape!r}")
    centres = jnp.asarray(centres, dtype=jnp.float32)
    if centres.ndim != 2 or centres.shape[1] != ndim:
        raise ValueError(f"centres: expected shape (N, {ndim}), got shape {centres.shape}")
    n = centres.shape[0]
    sigma = jnp.asarray(sigma, dtype=jnp.float32)
    if sigma.ndim == 0:
        sigma = jnp.broadcast_to(sigma, (n, ndim))
    elif sigma.shape == (ndim,):  # per axis, also when there are as many heatmaps as axes
        sigma = jnp.broadcast_to(sigma[None, :], (n, ndim))
    elif sigma.shape in ((n,), (n, 1)):
        sigma = jnp.broadcast_to(sigma.reshape(n, 1), (n, ndim))
    elif sigma.shape == (n, ndim):
        pass
    else:
        raise ValueError(
            f"sigma: expected a scalar or shape ({ndim},), ({n},), ({n}, 1) or ({n}, {ndim}), "
            f"got shape {sigma.shape}"
        )
    if not isinstance(sigma, jax.core.Tracer) and np.any(np.asarray(sigma) <= 0):
        raise ValueError(f"sigma: expected positive values, got {np.asarray(sigma).min()}")
    exponent = jnp.zeros((n,) + spatial_shape, jnp.float32)
    for k, size in enumerate(spatial_shape):
        axis = jnp.arange(size, dtype=jnp.float32)
        term = (axis[None, :] - centres[:, k : k + 1]) ** 2 / (2.0 * sigma[:, k : k + 1] ** 2)
        shape = [n] + [1] * ndim
        shape[1 + k] = size
        exponent = exponent + term.reshape(shape)
    return jnp.exp(-exponent)


def _check_image(name, x):
    if x.ndim not in (4, 5):
        raise ValueError(
            f"{name}: expected shape (B, *S, C) with 2 or 3 spatial axes, got shape {x.shape}"
        )
    return x.ndim - 2


def forward_differences(x):
    """Forward differences along each spatial axis of (B, *S, C).

    Returns a tuple of ndim arrays; entry k is ``x[.., i+1, ..] - x[.., i, ..]`` along spatial
    axis k, with that axis one shorter (the VoxelMorph ``Grad`` regulariser's differences).
    """
    x = jnp.asarray(x)
    ndim = _check_image("x", x)
    return tuple(jnp.diff(x, axis=1 + k) for k in range(ndim))


def spatial_gradient(x, *, mode="forward"):
    """Finite-difference gradient of (B, *S, C) -> (B, *S, C, ndim), last axis = spatial axis k.

    mode "forward": ``x[i+1] - x[i]``, with the backward difference on the last slice so the shape
    is kept. mode "central": ``(x[i+1] - x[i-1]) / 2`` inside and one-sided at the edges
    (``numpy.gradient`` with unit spacing). Axes of size 1 get a zero gradient.
    """
    x = jnp.asarray(x)
    ndim = _check_image("x", x)
    if mode not in ("forward", "central"):
        raise ValueError(f"mode: expected 'forward' or 'central', got {mode!r}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    grads = []
    for k in range(ndim):
        axis = 1 + k
        if x.shape[axis] == 1:
            grads.append(jnp.zeros_like(x))
            continue
        diff = jnp.diff(x, axis=axis)
        last = jax.lax.slice_in_dim(diff, diff.shape[axis] - 1, diff.shape[axis], axis=axis)
        if mode == "forward":
            grads.append(jnp.concatenate([diff, last], axis=axis))
        else:
            first = jax.lax.slice_in_dim(diff, 0, 1, axis=axis)
            inner = 0.5 * (
                jax.lax.slice_in_dim(diff, 1, diff.shape[axis], axis=axis)
                + jax.lax.slice_in_dim(diff, 0, diff.shape[axis] - 1, axis=axis)
            )
            grads.append(jnp.concatenate([first, inner, last], axis=axis))
    return jnp.stack(grads, axis=-1)
