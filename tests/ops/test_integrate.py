"""medjax.ops.integrate against closed forms and a SciPy scaling-and-squaring reference."""

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.test_util import check_grads

from medjax.ops import (
    grid_to_displacement,
    identity_grid,
    integrate_gradients,
    integrate_velocity,
    warp,
)


@pytest.mark.parametrize("spatial", [(5, 6), (4, 5, 6)])
def test_half_gradient_is_identity(spatial):
    ndim = len(spatial)
    phi = np.full((2, *spatial, ndim), 0.5, np.float32)
    grid = np.asarray(integrate_gradients(phi))
    np.testing.assert_array_equal(grid, np.broadcast_to(identity_grid(spatial), grid.shape))
    np.testing.assert_array_equal(np.asarray(grid_to_displacement(grid)), 0.0)
    # The Keras original omits the -1: every voxel samples its next neighbour.
    shifted = np.asarray(integrate_gradients(phi, original_offset=True))
    np.testing.assert_array_equal(shifted, grid + 1.0)


def test_constant_gradient_is_uniform_scaling():
    spatial = (6, 5, 4)
    a = np.array([0.25, 0.75, 0.6], np.float32)
    phi = np.broadcast_to(a, (1, *spatial, 3))
    grid = np.asarray(integrate_gradients(phi))[0]
    for k in range(3):
        idx = np.arange(spatial[k]).reshape([-1 if j == k else 1 for j in range(3)])
        np.testing.assert_allclose(grid[..., k], np.broadcast_to(2 * a[k] * (idx + 1) - 1, spatial))


def test_matches_numpy_loop():
    rng = np.random.default_rng(0)
    phi = rng.uniform(0, 1, (2, 4, 5, 6, 3)).astype(np.float32)
    grid = np.asarray(integrate_gradients(phi))
    ref = np.zeros_like(grid)
    for b, i, j, k in np.ndindex(2, 4, 5, 6):
        ref[b, i, j, k, 0] = 2 * phi[b, : i + 1, j, k, 0].sum() - 1
        ref[b, i, j, k, 1] = 2 * phi[b, i, : j + 1, k, 1].sum() - 1
        ref[b, i, j, k, 2] = 2 * phi[b, i, j, : k + 1, 2].sum() - 1
    np.testing.assert_allclose(grid, ref, rtol=1e-5, atol=1e-5)


def test_integrate_gradients_validation():
    with pytest.raises(ValueError, match="phi"):
        integrate_gradients(np.zeros((1, 4, 4, 4, 2)))


@pytest.mark.parametrize("spatial", [(6, 7), (5, 6, 4)])
def test_velocity_zero_and_constant(spatial):
    ndim = len(spatial)
    zero = np.zeros((1, *spatial, ndim), np.float32)
    np.testing.assert_array_equal(np.asarray(integrate_velocity(zero)), 0.0)
    c = np.array([1.5, -0.75, 2.25][:ndim], np.float32)
    v = np.broadcast_to(c, (2, *spatial, ndim))
    disp = np.asarray(integrate_velocity(v, steps=7))
    np.testing.assert_allclose(disp, np.broadcast_to(c, disp.shape), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(integrate_velocity(v, steps=0)), v)


def _scipy_scaling_and_squaring(v, steps):
    """Reference: d <- d + d(x + d) with map_coordinates(order=1, mode='nearest')."""
    ndim = v.shape[-1]
    spatial = v.shape[1:-1]
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), axis=0)
    out = []
    for b in range(v.shape[0]):
        d = v[b].astype(np.float64) / 2**steps
        for _ in range(steps):
            coords = ident + np.moveaxis(d, -1, 0)
            sampled = np.stack(
                [
                    ndi.map_coordinates(d[..., k], coords, order=1, mode="nearest")
                    for k in range(ndim)
                ],
                axis=-1,
            )
            d = d + sampled
        out.append(d)
    return np.stack(out)


def test_velocity_matches_scipy_reference():
    rng = np.random.default_rng(1)
    v = ndi.gaussian_filter(rng.standard_normal((1, 10, 9, 8, 3)), (0, 2, 2, 2, 0)) * 6
    v = v.astype(np.float32)
    disp = np.asarray(integrate_velocity(v, steps=5))
    ref = _scipy_scaling_and_squaring(v, 5)
    np.testing.assert_allclose(disp, ref, atol=1e-4)


def test_velocity_inverse_composes_to_identity():
    rng = np.random.default_rng(2)
    v = ndi.gaussian_filter(rng.standard_normal((1, 16, 16, 2)), (0, 3, 3, 0)) * 4
    v = v.astype(np.float32)
    fwd = integrate_velocity(v)
    inv = integrate_velocity(-v)
    composed = np.asarray(fwd + warp(inv, fwd))  # x -> x + fwd(x) + inv(x + fwd(x))
    inner = composed[:, 4:-4, 4:-4]
    assert np.abs(v).max() > 0.3
    assert np.abs(inner).max() < 0.05 * np.abs(v).max()


def test_velocity_gradient_finite_differences():
    # Scaling and squaring warps the field with itself: both warp arguments are differentiated.
    rng = np.random.default_rng(3)
    v = ndi.gaussian_filter(rng.standard_normal((1, 6, 5, 2)), (0, 1, 1, 0)) * 3
    with jax.enable_x64(True):
        check_grads(
            lambda x: integrate_velocity(x, steps=3),
            (jax.numpy.asarray(v, jax.numpy.float64),),
            order=1,
            modes=("fwd", "rev"),
            eps=1e-6,
        )


def test_velocity_jit_and_validation():
    v = np.full((1, 5, 5, 2), 0.5, np.float32)
    np.testing.assert_allclose(
        np.asarray(jax.jit(integrate_velocity)(v)), np.asarray(integrate_velocity(v)), atol=1e-6
    )
    with pytest.raises(ValueError, match="steps"):
        integrate_velocity(v, steps=-1)
    with pytest.raises(ValueError, match="v"):
        integrate_velocity(np.zeros((1, 5, 5, 3)))
