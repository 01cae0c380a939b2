"""Deformation-quality metrics: Jacobian determinant of a displacement field and folding fraction."""

import jax
import jax.numpy as jnp

from medjax.metrics._checks import check_displacement
from medjax.ops import spatial_gradient


def jacobian_determinant(disp):
    """Determinant of the Jacobian of x -> x + u(x): disp (B, *S, ndim) in voxels -> (B, *S) float32.

    2D or 3D. ``J = I + du/dx`` where ``J[i, j] = delta_ij + d u_i / d x_j`` (component i moves along
    spatial axis i), with derivatives by central differences in the interior and one-sided
    differences at the borders (``np.gradient``; the VoxelMorph convention). det > 0 preserves
    orientation, det <= 0 marks a fold. Exact for affine fields (e.g. identity -> 1,
    uniform scaling by s -> s^ndim).
    """
    disp = jnp.asarray(disp)
    check_displacement(disp)
    return _jacobian_determinant(disp.astype(jnp.float32))


@jax.jit
def _jacobian_determinant(disp):
    ndim = disp.ndim - 2
    g = spatial_gradient(disp, mode="central")  # g[..., i, j] = d u_i / d x_j
    jac = [[g[..., i, j] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)]
    if ndim == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    (a, b, c), (d, e, f), (h, i, k) = jac
    return a * (e * k - f * i) - b * (d * k - f * h) + c * (d * i - e * h)


def folding_fraction(disp):
    """Percentage (0-100) of voxels with Jacobian determinant <= 0: disp (B, *S, ndim) -> (B,) float32."""
    det = jacobian_determinant(disp)
    axes = tuple(range(1, det.ndim))
    return 100.0 * jnp.mean((det <= 0).astype(jnp.float32), axis=axes)
