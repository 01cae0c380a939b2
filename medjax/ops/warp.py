"""Spatial transformer: sample an image at identity + displacement (voxel units, channels-last).

The (bi/tri)linear sampler gathers all ``2**ndim`` corners of a cell in one go: the flattened image is
stacked with its corner-shifted copies so that each sample point reads one contiguous row
``(2**ndim * C,)``. Gradients come from JAX autodiff of that gather, so differentiating only the
displacement never builds the image gradient (no scatter-add), and differentiating the image gives
the exact transpose (a scatter-add of the corner weights).
"""

import jax
import jax.numpy as jnp

__all__ = ["warp", "identity_grid", "displacement_to_grid", "grid_to_displacement"]

_PADDINGS = ("border", "zeros")
_ORDERS = (0, 1)


def identity_grid(spatial_shape):
    """Voxel coordinates of every voxel: ``(*spatial_shape, ndim)`` float32, ``grid[x] == x``."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if len(spatial_shape) not in (2, 3) or min(spatial_shape) < 1:
        raise ValueError(f"spatial_shape: expected 2 or 3 positive sizes, got {spatial_shape!r}")
    axes = [jnp.arange(s, dtype=jnp.float32) for s in spatial_shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _check_field(name, field):
    if field.ndim not in (4, 5):
        raise ValueError(
            f"{name}: expected shape (B, *S, ndim) with 2 or 3 spatial axes, got shape {field.shape}"
        )
    ndim = field.ndim - 2
    if field.shape[-1] != ndim:
        raise ValueError(
            f"{name}: expected last axis == ndim == {ndim} for {ndim} spatial axes, "
            f"got shape {field.shape}"
        )
    return ndim


def displacement_to_grid(disp):
    """Absolute sampling grid ``identity + disp``: (B, *S, ndim) -> (B, *S, ndim), voxel units."""
    disp = jnp.asarray(disp)
    _check_field("disp", disp)
    return disp + identity_grid(disp.shape[1:-1]).astype(disp.dtype)


def grid_to_displacement(grid):
    """Displacement ``grid - identity``: (B, *S, ndim) -> (B, *S, ndim), voxel units."""
    grid = jnp.asarray(grid)
    _check_field("grid", grid)
    return grid - identity_grid(grid.shape[1:-1]).astype(grid.dtype)


def _strides(shape):
    strides = []
    s = 1
    for n in reversed(shape):
        strides.append(s)
        s *= n
    return tuple(reversed(strides))


def _gather_channels(image, index):
    """``image[b, index[b, p], c]`` as scalar gathers: image (B, N, C), index (B, P) -> (B, P, C).

    XLA's CPU gather is several times faster for scalar rows than for wider rows, so the image is
    viewed channel-first and flattened, and every (batch, point, channel) reads one scalar.
    """
    b, n, c = image.shape
    if c == 1:
        table = image.reshape(b * n)
        full = index + (jnp.arange(b, dtype=index.dtype) * n)[:, None]
        return table.at[full].get(mode="promise_in_bounds")[..., None]
    table = jnp.swapaxes(image, 1, 2).reshape(b * c * n)
    base = (jnp.arange(b, dtype=index.dtype)[:, None] * c + jnp.arange(c, dtype=index.dtype)) * n
    full = index[:, :, None] + base[:, None, :]
    return table.at[full].get(mode="promise_in_bounds")


def _sample_linear(image, coords):
    """Linear sampling with clamped coordinates. image (B, *S, C), coords (B, P, ndim) -> (B, P, C)."""
    spatial = image.shape[1:-1]
    ndim = len(spatial)
    b, c = image.shape[0], image.shape[-1]
    strides = _strides(spatial)
    lo, frac = [], []
    for k, n in enumerate(spatial):
        ck = jnp.clip(coords[..., k], 0.0, float(n - 1))
        ik = jnp.clip(jnp.floor(ck), 0.0, float(max(n - 2, 0)))
        lo.append(ik.astype(jnp.int32))
        frac.append((ck - ik)[..., None])
    index = sum(lo[k] * strides[k] for k in range(ndim))
    flat = image.reshape(b, -1, c)

    # Gather the 2**ndim cell corners. The lower corner index is at most n - 2 on every axis, so the
    # upper corner is index + stride. A size-1 axis has fraction 0: reuse the lower corner there.
    def corner(bits):
        off = sum(bit * strides[k] for k, bit in enumerate(bits) if spatial[k] > 1)
        return _gather_channels(flat, index + off)

    def reduce(prefix):
        k = len(prefix)
        if k == ndim:
            return corner(prefix)
        lower = reduce(prefix + (0,))
        upper = reduce(prefix + (1,))
        return lower + frac[k] * (upper - lower)

    return reduce(())


def _sample_nearest(image, coords):
    """Nearest-neighbour sampling (round half to even, like torch) with clamped coordinates."""
    spatial = image.shape[1:-1]
    b, c = image.shape[0], image.shape[-1]
    strides = _strides(spatial)
    index = 0
    for k, n in enumerate(spatial):
        ik = jnp.clip(jnp.round(jax.lax.stop_gradient(coords[..., k])), 0.0, float(n - 1))
        index = index + ik.astype(jnp.int32) * strides[k]
    return _gather_channels(image.reshape(b, -1, c), index)


def warp(image, displacement, *, order=1, padding="border"):
    """Sample ``image`` at ``x + displacement(x)`` for every voxel x.

    Args:
      image: (B, *S, C) with 2 or 3 spatial axes; B may be 1 to share one image across the batch.
      displacement: (B, *S, ndim) in voxels; component k moves along spatial axis k.
      order: 1 for (bi/tri)linear, 0 for nearest (round half to even).
      padding: "border" clamps coordinates (and so weights: no extrapolation); "zeros" reads 0
        outside the image (each out-of-range corner contributes 0, as torch ``grid_sample``).

    Returns:
      (B, *S, C) warped image; float32 (or the image's float dtype) for order 1, the image's
      dtype for order 0. Equals torch ``grid_sample(..., align_corners=True)``.
    """
    if order not in _ORDERS:
        raise ValueError(f"order: expected one of {_ORDERS}, got {order!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding: expected one of {_PADDINGS}, got {padding!r}")
    image = jnp.asarray(image)
    displacement = jnp.asarray(displacement)
    ndim = _check_field("displacement", displacement)
    if image.ndim != ndim + 2:
        raise ValueError(
            f"image: expected rank {ndim + 2} (B, *S, C) to match displacement shape "
            f"{displacement.shape}, got shape {image.shape}"
        )
    spatial = displacement.shape[1:-1]
    if image.shape[1:-1] != spatial:
        raise ValueError(
            f"image: expected spatial shape {spatial} (the displacement's), got {image.shape[1:-1]}"
        )
    batch = displacement.shape[0]
    if image.shape[0] not in (1, batch):
        raise ValueError(
            f"image: expected batch size 1 or {batch} (the displacement's), got {image.shape[0]}"
        )
    if not jnp.issubdtype(displacement.dtype, jnp.floating):
        displacement = displacement.astype(jnp.float32)
    if order == 1 and not jnp.issubdtype(image.dtype, jnp.floating):
        image = image.astype(jnp.float32)
    if image.shape[0] != batch:
        image = jnp.broadcast_to(image, (batch,) + image.shape[1:])

    coords = displacement + identity_grid(spatial).astype(displacement.dtype)
    if padding == "zeros":
        # One zero voxel on every side turns "zeros" into "border" on the padded image.
        image = jnp.pad(image, [(0, 0)] + [(1, 1)] * ndim + [(0, 0)])
        coords = coords + 1.0
    coords = coords.reshape(batch, -1, ndim)
    if order == 1:
        out = _sample_linear(image, coords)
    else:
        out = _sample_nearest(image, coords)
    return out.reshape((batch,) + tuple(spatial) + (image.shape[-1],))
