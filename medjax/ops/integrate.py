"""Turn network outputs into deformations: gradient integration and scaling and squaring."""

import functools

import jax
import jax.numpy as jnp

from medjax.ops.warp import _check_field, warp

__all__ = ["integrate_gradients", "integrate_velocity"]


def integrate_gradients(phi, *, original_offset=False, step_scale=1.0):
    """Sampling grid from a deformation gradient: (B, *S, ndim) -> (B, *S, ndim), voxel coordinates.

    ``grid_k = cumsum(2 * phi_k, axis=spatial axis k) - 1`` (Christodoulidis et al. 2018, as used by
    Estienne et al. 2020), so ``phi == 0.5`` everywhere is exactly the identity grid. The original
    Keras code omits the ``- 1``, which shifts every image by one voxel at the identity;
    ``original_offset=True`` reproduces that. Convert with ``grid_to_displacement`` before ``warp``.
    ``step_scale`` s narrows the step between neighbouring grid points around the identity's 1:
    ``step = 1 + s (2 phi - 1)`` lies in ``(1 - s, 1 + s)`` (s = 1: the paper's ``2 phi`` in (0, 2)).
    """
    phi = jnp.asarray(phi)
    ndim = _check_field("phi", phi)
    if not jnp.issubdtype(phi.dtype, jnp.floating):
        phi = phi.astype(jnp.float32)
    if not 0 < float(step_scale) <= 1:
        raise ValueError(f"step_scale: expected a value in (0, 1], got {step_scale}")
    if float(step_scale) == 1.0:
        steps = [2.0 * phi[..., k] for k in range(ndim)]
    else:
        steps = [1.0 + step_scale * (2.0 * phi[..., k] - 1.0) for k in range(ndim)]
    grids = [jnp.cumsum(steps[k], axis=1 + k) for k in range(ndim)]
    grid = jnp.stack(grids, axis=-1)
    return grid if original_offset else grid - 1.0


def integrate_velocity(v, steps=7):
    """Displacement ``exp(v)`` of a stationary velocity field by scaling and squaring.

    v: (B, *S, ndim) in voxels -> displacement (B, *S, ndim) in voxels. The field is scaled by
    ``2**-steps`` and composed with itself ``steps`` times, ``d <- d + d o (id + d)``, sampling
    with trilinear interpolation and border padding (so a constant field stays constant).
    ``steps=0`` returns ``v`` unchanged.
    """
    v = jnp.asarray(v)
    _check_field("v", v)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    if not jnp.issubdtype(v.dtype, jnp.floating):
        v = v.astype(jnp.float32)
    return _scaling_and_squaring(v, steps)


@functools.partial(jax.jit, static_argnums=1)
def _scaling_and_squaring(v, steps):
    d = v / (2.0**steps)
    for _ in range(steps):
        d = d + warp(d, d, order=1, padding="border")
    return d
