"""medjax.ops.resize / pixel_shuffle against torch F.interpolate / nn.PixelShuffle and NumPy loops."""

import jax
import numpy as np
import pytest

from medjax.ops import pixel_shuffle, resize
from tests.conftest import require_reference


def _to_torch(torch, x):
    ndim = x.ndim - 2
    return torch.tensor(x).permute(0, ndim + 1, *range(1, ndim + 1))


def _from_torch(y):
    ndim = y.ndim - 2
    return y.permute(0, *range(2, ndim + 2), 1).numpy()


@pytest.mark.reference
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("scale", [2.0, 0.5, 1.7, (2.0, 0.75)])
def test_bilinear_matches_torch(align_corners, scale):
    torch = require_reference("torch")
    x = np.random.default_rng(0).standard_normal((2, 7, 9, 3)).astype(np.float32)
    out = np.asarray(resize(x, scale, align_corners=align_corners))
    ref = _from_torch(
        torch.nn.functional.interpolate(
            _to_torch(torch, x), scale_factor=scale, mode="bilinear", align_corners=align_corners
        )
    )
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("scale", [2.0, 0.6])
def test_trilinear_matches_torch(align_corners, scale):
    torch = require_reference("torch")
    x = np.random.default_rng(1).standard_normal((1, 5, 6, 4, 2)).astype(np.float32)
    out = np.asarray(resize(x, scale, align_corners=align_corners))
    ref = _from_torch(
        torch.nn.functional.interpolate(
            _to_torch(torch, x), scale_factor=scale, mode="trilinear", align_corners=align_corners
        )
    )
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("align_corners", [True, False])
def test_explicit_shape_matches_torch_size(align_corners):
    torch = require_reference("torch")
    x = np.random.default_rng(2).standard_normal((1, 5, 6, 4, 2)).astype(np.float32)
    out = np.asarray(resize(x, shape=(9, 4, 7), align_corners=align_corners))
    ref = _from_torch(
        torch.nn.functional.interpolate(
            _to_torch(torch, x), size=(9, 4, 7), mode="trilinear", align_corners=align_corners
        )
    )
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_align_corners_closed_form():
    # align_corners=True maps the corners onto each other: a linear ramp stays an exact ramp.
    ramp = np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1) * np.ones((1, 1, 3, 1), np.float32)
    out = np.asarray(resize(ramp, shape=(9, 3)))
    np.testing.assert_allclose(out[0, :, 0, 0], np.linspace(0, 4, 9), atol=1e-6)
    np.testing.assert_allclose(np.asarray(resize(ramp, 1.0)), ramp)
    up = np.asarray(jax.jit(lambda x: resize(x, 2.0))(ramp))
    assert up.shape == (1, 10, 6, 1)


def test_resize_validation():
    x = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="scale/shape"):
        resize(x)
    with pytest.raises(ValueError, match="scale/shape"):
        resize(x, 2.0, shape=(8, 8))
    with pytest.raises(ValueError, match="scale"):
        resize(x, (2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="x"):
        resize(np.zeros((4, 4)), 2.0)


@pytest.mark.reference
@pytest.mark.parametrize("factor", [2, 3])
def test_pixel_shuffle_2d_matches_torch(factor):
    torch = require_reference("torch")
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 2 * factor**2)).astype(np.float32)
    out = np.asarray(pixel_shuffle(x, factor))
    ref = _from_torch(torch.nn.PixelShuffle(factor)(_to_torch(torch, x)))
    np.testing.assert_array_equal(out, ref)


def test_pixel_shuffle_3d_matches_loop():
    r = 2
    x = np.random.default_rng(4).standard_normal((1, 2, 3, 2, 3 * r**3)).astype(np.float32)
    out = np.asarray(pixel_shuffle(x, r))
    assert out.shape == (1, 4, 6, 4, 3)
    for d, h, w, c in np.ndindex(4, 6, 4, 3):
        ch = c * r**3 + (d % r) * r * r + (h % r) * r + (w % r)
        assert out[0, d, h, w, c] == x[0, d // r, h // r, w // r, ch]


def test_pixel_shuffle_validation():
    with pytest.raises(ValueError, match="factor"):
        pixel_shuffle(np.zeros((1, 2, 2, 8)), 0)
    with pytest.raises(ValueError, match="divisible"):
        pixel_shuffle(np.zeros((1, 2, 2, 6)), 2)
