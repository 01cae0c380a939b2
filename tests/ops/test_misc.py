"""medjax.ops.misc: one_hot, gaussian_heatmap, spatial_gradient against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.ops import forward_differences, gaussian_heatmap, one_hot, spatial_gradient


def test_one_hot_matches_eye():
    labels = np.random.default_rng(0).integers(0, 4, (2, 3, 5))
    out = one_hot(labels, 4)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(np.asarray(out), np.eye(4, dtype=np.float32)[labels])
    traced = jax.jit(one_hot, static_argnums=1)(jnp.asarray(labels), 4)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(out))


@pytest.mark.parametrize("labels", [np.array([0, 4]), np.array([-1, 0]), np.array([0.5, 1.0])])
def test_one_hot_rejects_bad_labels(labels):
    with pytest.raises(ValueError, match="labels"):
        one_hot(labels, 4)


def test_one_hot_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        one_hot(np.array([0]), 0)


def test_gaussian_heatmap_matches_formula():
    shape = (9, 8, 7)
    centres = np.array([[4, 3, 2], [1.5, 6.0, 5.0]], np.float32)
    sigma = np.array([1.5, 2.0], np.float32)
    out = np.asarray(gaussian_heatmap(shape, centres, sigma))
    assert out.shape == (2, *shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    for n in range(2):
        d2 = ((grid - centres[n]) ** 2).sum(-1)
        np.testing.assert_allclose(out[n], np.exp(-d2 / (2 * sigma[n] ** 2)), rtol=1e-5, atol=1e-7)
    assert out[0, 4, 3, 2] == 1.0
    assert np.unravel_index(out[0].argmax(), shape) == (4, 3, 2)


def test_gaussian_heatmap_per_axis_sigma_and_validation():
    out = np.asarray(gaussian_heatmap((7, 9), np.array([[3.0, 4.0]]), np.array([1.0, 3.0])))
    assert np.isclose(out[0, 4, 4], np.exp(-0.5)) and np.isclose(out[0, 3, 7], np.exp(-0.5))
    with pytest.raises(ValueError, match="centres"):
        gaussian_heatmap((7, 9), np.zeros((2, 3)), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_heatmap((7, 9), np.zeros((2, 2)), 0.0)


def test_spatial_gradient_central_matches_numpy_gradient():
    x = np.random.default_rng(1).standard_normal((2, 5, 6, 4, 3)).astype(np.float32)
    out = np.asarray(spatial_gradient(x, mode="central"))
    assert out.shape == (2, 5, 6, 4, 3, 3)
    for k in range(3):
        np.testing.assert_allclose(out[..., k], np.gradient(x, axis=1 + k), atol=1e-6)


def test_spatial_gradient_forward_matches_loop():
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 2)).astype(np.float32)
    out = np.asarray(spatial_gradient(x))
    for i, j in np.ndindex(4, 5):
        i1, i0 = (i + 1, i) if i < 3 else (3, 2)
        j1, j0 = (j + 1, j) if j < 4 else (4, 3)
        np.testing.assert_allclose(out[0, i, j, :, 0], x[0, i1, j] - x[0, i0, j], atol=1e-6)
        np.testing.assert_allclose(out[0, i, j, :, 1], x[0, i, j1] - x[0, i, j0], atol=1e-6)
    dx, dy = forward_differences(x)
    assert dx.shape == (1, 3, 5, 2) and dy.shape == (1, 4, 4, 2)
    np.testing.assert_allclose(np.asarray(dx), x[:, 1:] - x[:, :-1], atol=1e-6)


def test_spatial_gradient_validation():
    with pytest.raises(ValueError, match="mode"):
        spatial_gradient(np.zeros((1, 4, 4, 1)), mode="backward")
    with pytest.raises(ValueError, match="x"):
        spatial_gradient(np.zeros((4, 4)))


def test_gaussian_heatmap_as_many_centres_as_axes():
    """N == ndim: a (ndim,) sigma is per axis; a per-heatmap sigma is given as (N, 1)."""
    shape = (9, 11)
    centres = np.array([[4.0, 5.0], [2.0, 8.0]], np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    per_axis = np.array([1.0, 3.0], np.float32)
    out = np.asarray(gaussian_heatmap(shape, centres, per_axis))
    for n in range(2):
        ref = np.exp(-(((grid - centres[n]) / per_axis) ** 2).sum(-1) / 2)
        np.testing.assert_allclose(out[n], ref, rtol=1e-5, atol=1e-7)
    per_map = np.array([[1.0], [3.0]], np.float32)
    out = np.asarray(gaussian_heatmap(shape, centres, per_map))
    for n in range(2):
        ref = np.exp(-((grid - centres[n]) ** 2).sum(-1) / (2 * per_map[n, 0] ** 2))
        np.testing.assert_allclose(out[n], ref, rtol=1e-5, atol=1e-7)
