"""Deformation regularisers: L1 to the identity spatial gradient, and displacement smoothness."""

import jax.numpy as jnp

from medjax.ops import forward_differences


def phi_l1(phi):
    """``sum |phi - 0.5|`` over all elements -> scalar (Estienne et al.'s regulariser, weight alpha).

    phi: (B, *S, ndim) spatial gradients of the deformation in (0, 1); 0.5 is the identity step.
    """
    phi = jnp.asarray(phi, jnp.float32)
    if phi.ndim < 3 or phi.shape[-1] != phi.ndim - 2:
        raise ValueError(
            f"phi must have shape (B, *spatial, ndim) with ndim = number of spatial axes; "
            f"got {tuple(phi.shape)}"
        )
    return jnp.sum(jnp.abs(phi - 0.5))


def displacement_l2_gradient(disp):
    """VoxelMorph ``Grad('l2')`` smoothness: disp (B, *S, ndim) -> scalar.

    ``(1/ndim) sum_k mean((u[x + e_k] - u[x])^2)`` with forward differences along each spatial
    axis k (means over all batch, voxel and component entries of that difference).
    """
    disp = jnp.asarray(disp, jnp.float32)
    if disp.ndim not in (4, 5) or disp.shape[-1] != disp.ndim - 2:
        raise ValueError(
            f"disp must have shape (B, *spatial, ndim) with 2 or 3 spatial axes; "
            f"got {tuple(disp.shape)}"
        )
    ndim = disp.ndim - 2
    if any(s < 2 for s in disp.shape[1:-1]):
        raise ValueError(
            f"disp needs >= 2 voxels along every spatial axis; got {tuple(disp.shape)}"
        )
    terms = [jnp.mean(jnp.square(d)) for d in forward_differences(disp)]
    return sum(terms) / ndim
