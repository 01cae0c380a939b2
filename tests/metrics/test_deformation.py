"""Jacobian determinant and folding fraction: closed forms and a NumPy reference."""

import jax
import numpy as np
import pytest

from medjax import metrics


def _coords(shape):
    return np.stack(
        np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1
    )


def test_identity_is_one():
    for shape in [(2, 5, 6), (1, 4, 5, 6)]:
        disp = np.zeros(shape + (len(shape) - 1,), np.float32)
        det = np.asarray(metrics.jacobian_determinant(disp))
        assert det.shape == shape
        np.testing.assert_array_equal(det, 1.0)
        np.testing.assert_array_equal(np.asarray(metrics.folding_fraction(disp)), 0.0)


@pytest.mark.parametrize("s", [0.5, 1.7])
def test_uniform_scaling(s):
    x3 = _coords((5, 6, 7))
    disp3 = ((s - 1.0) * (x3 - 2.0))[None].astype(np.float32)
    np.testing.assert_allclose(np.asarray(metrics.jacobian_determinant(disp3)), s**3, rtol=1e-5)
    x2 = _coords((6, 5))
    disp2 = ((s - 1.0) * x2 + 3.0)[None].astype(np.float32)
    np.testing.assert_allclose(np.asarray(metrics.jacobian_determinant(disp2)), s**2, rtol=1e-5)


def test_fold_is_negative():
    # mirror axis 0: x0 -> 8 - x0, i.e. u_0 = 8 - 2 x0 -> det = -1 everywhere
    x = _coords((9, 4, 5))
    disp = np.zeros((1, 9, 4, 5, 3), np.float32)
    disp[0, ..., 0] = 8 - 2 * x[..., 0]
    np.testing.assert_allclose(np.asarray(metrics.jacobian_determinant(disp)), -1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.folding_fraction(disp)), [100.0])
    # fold only the first 3 rows of sample 1 of a 2D batch: u_0 = -2 x0 there (det = -1)
    disp2 = np.zeros((2, 8, 4, 2), np.float32)
    disp2[1, :3, :, 0] = (-2.0 * np.arange(3))[:, None]
    det = np.asarray(metrics.jacobian_determinant(disp2))
    assert det[1, 0, 0] == pytest.approx(-1.0) and det[1, 1, 0] == pytest.approx(-1.0)
    want = 100.0 * (det <= 0).reshape(2, -1).mean(1)
    got = np.asarray(metrics.folding_fraction(disp2))
    assert got[0] == 0.0 and got[1] > 0.0
    np.testing.assert_allclose(got, want)


def test_random_field_matches_numpy_gradient_and_det():
    rng = np.random.default_rng(0)
    disp = rng.normal(scale=0.4, size=(2, 5, 4, 6, 3))
    want = np.zeros(disp.shape[:-1])
    for b in range(2):
        grads = [np.gradient(disp[b, ..., i]) for i in range(3)]  # grads[i][j] = du_i/dx_j
        for v in np.ndindex(disp.shape[1:-1]):
            jac = np.eye(3) + np.array([[grads[i][j][v] for j in range(3)] for i in range(3)])
            want[(b, *v)] = np.linalg.det(jac)
    got = np.asarray(metrics.jacobian_determinant(disp.astype(np.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_jittable_and_validation():
    disp = np.zeros((1, 4, 4, 2), np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(metrics.jacobian_determinant)(disp)), 1.0)
    with pytest.raises(ValueError, match="disp"):
        metrics.jacobian_determinant(np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="disp"):
        metrics.jacobian_determinant(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="disp"):
        metrics.folding_fraction(np.full((1, 4, 4, 2), np.nan))
