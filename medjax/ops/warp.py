"""Spatial transformer: sample an image at identity + displacement (voxel units, channels-last).

The (bi/tri)linear sampler computes the lower cell corner and fractions itself and reads the
``2**ndim`` corners with scalar gathers from the flattened, channel-first image (XLA's CPU gather is
much faster for scalar elements than for rows). It has a custom JVP that is linear in the tangents.
The JVP computes the output together with what reverse mode needs (the ``ndim`` partial derivatives
when the displacement is differentiated; the corner index and fractions when the image is) in one
loop over the gathered corners (see ``_one_loop``). Reverse mode then costs one elementwise product
for the displacement, and ``2**ndim`` scatter-adds for the image only when the image is
differentiated. Forward mode, ``vmap``, ``linear_transpose`` and higher derivatives work too.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

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


def _cell(disp, spatial, offset):
    """Lower-corner flat index, corner fractions and in-range masks of every sample.

    disp (B, *G, ndim) voxels, sampling an image of spatial shape ``spatial`` at
    ``x + offset + disp(x)``. Returns index (B, *G) int32 into the image flattened per batch
    (the batch offset is not included), fracs and masks: ndim arrays (B, *G).
    """
    strides = _strides(spatial)
    index, fracs, inside = 0, [], []
    for k, n in enumerate(spatial):
        pos = jax.lax.broadcasted_iota(disp.dtype, disp.shape[:-1], 1 + k)
        c = disp[..., k] + (pos + offset)
        cc = jnp.clip(c, 0.0, float(n - 1))
        lo = jnp.clip(jnp.floor(cc), 0.0, float(max(n - 2, 0)))
        fracs.append(cc - lo)
        inside.append((c >= 0.0) & (c <= float(n - 1)))
        index = index + lo.astype(jnp.int32) * strides[k]
    return index, fracs, inside


def _corner_offsets(spatial):
    """Flat offsets of the 2**ndim cell corners, bit order (axis 0 bit first).

    The lower corner is at most n - 2 on every axis, so the upper corner is index + stride. A
    size-1 axis always has fraction 0, so its upper corner reuses the lower one.
    """
    strides = _strides(spatial)
    return {
        bits: sum(bit * strides[k] for k, bit in enumerate(bits) if spatial[k] > 1)
        for bits in itertools.product((0, 1), repeat=len(spatial))
    }


def _channel_table(image):
    """Image (B, *S, C) as a flat channel-first vector and the per-(batch, channel) base index.

    XLA's CPU gather/scatter is several times faster for scalar elements than for rows, so every
    (sample, channel) reads one scalar of this table.
    """
    b, c = image.shape[0], image.shape[-1]
    n = math.prod(image.shape[1:-1])
    ndim = image.ndim - 2
    if c == 1:
        table = image.reshape(b * n)
        base = (jnp.arange(b, dtype=jnp.int32) * n).reshape((b,) + (1,) * ndim + (1,))
    else:
        table = jnp.moveaxis(image, -1, 1).reshape(b * c * n)
        base = jnp.arange(b, dtype=jnp.int32)[:, None] * c + jnp.arange(c, dtype=jnp.int32)
        base = (base * n).reshape((b,) + (1,) * ndim + (c,))
    return table, base


def _lerp_tree(corner, fracs, ndim, prefix=()):
    """Multilinear interpolation of the corners ``corner(bits)`` (innermost axis reduced first)."""
    k = len(prefix)
    if k == ndim:
        return corner(prefix)
    lower = _lerp_tree(corner, fracs, ndim, prefix + (0,))
    upper = _lerp_tree(corner, fracs, ndim, prefix + (1,))
    # (1 - f) * lower + f * upper is exact at f == 0 and f == 1 (identity warps stay exact).
    return (1.0 - fracs[k]) * lower + fracs[k] * upper


_GATHER_DIMS = jax.lax.GatherDimensionNumbers(
    offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
)


def _take(table, index):
    """``table[index]`` for a flat table and in-range int32 indices of any shape.

    ``lax.gather`` directly: ``jnp`` indexing would add a negative-index wrap (a compare and a
    select per corner) that costs about as much as the gather in XLA's scalar CPU loops.
    """
    return jax.lax.gather(
        table,
        index[..., None],
        _GATHER_DIMS,
        (1,),
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def _gather_lerp(table, full, offsets, fracs, ndim):
    """Multilinear combination of the gathered corners ``table[full + offset]``: (B, *G, C)."""

    def corner(bits):
        return _take(table, full + offsets[bits])

    return _lerp_tree(corner, fracs, ndim)


@jax.custom_jvp
def _one_loop(*arrays):
    """Identity on same-shape arrays that makes XLA compute all of them in one fused loop.

    XLA's CPU backend has no multi-output loop fusion: a gather feeding several outputs is
    materialised once per corner and read back by every output (several times slower than one
    pass). A variadic reduction over a dummy axis of size 2 (the array and zeros) is a single
    multi-output fusion, so the shared gathers stay in registers. ``x + 0`` is exact.
    """
    operands = [jnp.stack([a, jnp.zeros_like(a)]) for a in arrays]
    inits = [jnp.zeros((), a.dtype) for a in arrays]

    def add(x, y):
        return tuple(a + b for a, b in zip(x, y, strict=True))

    return tuple(jax.lax.reduce(operands, inits, add, (0,)))


@_one_loop.defjvp
def _one_loop_jvp(primals, tangents):
    return _one_loop(*primals), tuple(tangents)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _warp_linear(image, disp, offset):
    """Linear sampling of image (B, *S, C) at ``x + offset + disp(x)``, disp (B, *G, ndim)."""
    spatial = image.shape[1:-1]
    index, fracs, _ = _cell(disp, spatial, offset)
    table, base = _channel_table(image)
    fr = [f[..., None].astype(image.dtype) for f in fracs]
    return _gather_lerp(table, index[..., None] + base, _corner_offsets(spatial), fr, len(spatial))


def _is_zero(t):
    return isinstance(t, SymbolicZero)


def _warp_linear_jvp(offset, primals, tangents):
    # The tangent is linear in (image_dot, disp_dot): reverse mode transposes it into an
    # elementwise product with the saved partial derivatives for the displacement and, only when
    # the image is differentiated, scatter-adds for the image.
    image, disp = primals
    image_dot, disp_dot = tangents
    spatial = image.shape[1:-1]
    ndim = len(spatial)
    index, fracs, inside = _cell(disp, spatial, offset)
    table, base = _channel_table(image)
    full = index[..., None] + base
    offsets = _corner_offsets(spatial)
    fr = [f[..., None].astype(image.dtype) for f in fracs]
    with_disp, with_image = not _is_zero(disp_dot), not _is_zero(image_dot)
    vals = {bits: _take(table, full + off) for bits, off in offsets.items()}
    outputs = [_lerp_tree(vals.__getitem__, fr, ndim)]
    if with_disp:
        # d out / d coordinate k interpolates the corner differences along k over the other
        # axes; it is zero where the coordinate is clamped (border padding).
        for k in range(ndim):
            others = [fr[j] for j in range(ndim) if j != k]

            def diff(bits, k=k):
                return vals[bits[:k] + (1,) + bits[k:]] - vals[bits[:k] + (0,) + bits[k:]]

            dk = _lerp_tree(diff, others, ndim - 1)
            outputs.append(jnp.where(inside[k][..., None], dk, 0.0))
    if with_image:
        # Corner index and fractions, saved for the scatter-adds of the image cotangent.
        outputs.append(jnp.broadcast_to(full, outputs[0].shape))
        outputs.extend(jnp.broadcast_to(f, outputs[0].shape) for f in fr)
    if len(outputs) > 1:
        outputs = _one_loop(*outputs)
    out, outputs = outputs[0], list(outputs[1:])
    out_dot = None
    if with_disp:
        jac, outputs = outputs[:ndim], outputs[ndim:]
        for k in range(ndim):
            term = jac[k] * disp_dot[..., k, None].astype(image.dtype)
            out_dot = term if out_dot is None else out_dot + term
    if with_image:
        full, fr = outputs[0], outputs[1:]
        table_dot, _ = _channel_table(image_dot)
        for bits, off in offsets.items():
            term = _take(table_dot, full + off)
            for k, bit in enumerate(bits):
                term = term * (fr[k] if bit else 1.0 - fr[k])
            out_dot = term if out_dot is None else out_dot + term
    if out_dot is None:
        out_dot = jnp.zeros_like(out)
    return out, out_dot


_warp_linear.defjvp(_warp_linear_jvp, symbolic_zeros=True)


def _warp_nearest(image, disp, offset):
    """Nearest-neighbour sampling (round half to even, like torch) with clamped coordinates."""
    spatial = image.shape[1:-1]
    strides = _strides(spatial)
    disp = jax.lax.stop_gradient(disp)
    index = 0
    for k, n in enumerate(spatial):
        pos = jax.lax.broadcasted_iota(disp.dtype, disp.shape[:-1], 1 + k)
        # Round before adding the padding offset: round-half-to-even does not commute with +1.
        c = jnp.clip(jnp.round(disp[..., k] + pos) + offset, 0.0, float(n - 1))
        index = index + c.astype(jnp.int32) * strides[k]
    table, base = _channel_table(image)
    return _take(table, index[..., None] + base)


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
    return _warp_core(image, displacement, order=order, padding=padding)


@functools.partial(jax.jit, static_argnames=("order", "padding"))
def _warp_core(image, displacement, *, order, padding):
    ndim = displacement.shape[-1]
    batch = displacement.shape[0]
    if image.shape[0] != batch:
        image = jnp.broadcast_to(image, (batch,) + image.shape[1:])
    if padding == "zeros":
        # One zero voxel on every side turns "zeros" into "border" on the padded image.
        image = jnp.pad(image, [(0, 0)] + [(1, 1)] * ndim + [(0, 0)])
        offset = 1.0
    else:
        offset = 0.0
    if order == 1:
        return _warp_linear(image, displacement, offset)
    return _warp_nearest(image, displacement, offset)
