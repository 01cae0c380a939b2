"""medjax.ops.warp against closed forms, SciPy, finite differences and torch grid_sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.test_util import check_grads

from medjax.ops import displacement_to_grid, grid_to_displacement, identity_grid, warp
from tests.conftest import require_reference

SHAPES = [(2, 7, 9, 2), (2, 5, 6, 7, 3)]  # (B, *S, C) in 2D and 3D


def _random(shape, scale, seed):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal(shape).astype(np.float32)
    ndim = len(shape) - 2
    disp = (rng.standard_normal(shape[:-1] + (ndim,)) * scale).astype(np.float32)
    return img, disp


def _scipy_warp(img, disp, order, padding):
    """Reference: scipy.ndimage.map_coordinates per batch and channel."""
    ndim = disp.shape[-1]
    spatial = img.shape[1:-1]
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), axis=0)
    mode = "nearest" if padding == "border" else "grid-constant"
    out = np.zeros(img.shape, np.float64)
    for b in range(img.shape[0]):
        coords = ident + np.moveaxis(disp[b], -1, 0).astype(np.float64)
        assert coords.shape[0] == ndim
        for c in range(img.shape[-1]):
            out[b, ..., c] = ndi.map_coordinates(
                img[b, ..., c].astype(np.float64), coords, order=order, mode=mode, cval=0.0
            )
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_zero_displacement_is_exact_identity(shape, order, padding):
    img, _ = _random(shape, 1.0, 0)
    ndim = len(shape) - 2
    out = warp(img, np.zeros(shape[:-1] + (ndim,), np.float32), order=order, padding=padding)
    np.testing.assert_array_equal(np.asarray(out), img)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_integer_translation_moves_voxels_exactly(shape, order, padding):
    img, _ = _random(shape, 1.0, 1)
    ndim = len(shape) - 2
    spatial = shape[1:-1]
    shift = np.array([2, -1, 3][:ndim])
    disp = np.broadcast_to(shift.astype(np.float32), shape[:-1] + (ndim,))
    out = np.asarray(warp(img, disp, order=order, padding=padding))
    expected = np.zeros_like(img)
    for idx in np.ndindex(*spatial):
        src = np.array(idx) + shift
        inside = np.all((src >= 0) & (src < np.array(spatial)))
        if padding == "border":
            src = np.clip(src, 0, np.array(spatial) - 1)
        elif not inside:
            continue
        expected[(slice(None),) + idx] = img[(slice(None),) + tuple(src)]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_matches_scipy_map_coordinates(shape, order, padding):
    img, disp = _random(shape, 2.5, 2)
    out = np.asarray(warp(img, disp, order=order, padding=padding))
    ref = _scipy_warp(img, disp, order, padding)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def _torch_grid_sample(torch, img, disp, order, padding):
    """torch grid_sample(align_corners=True) on channels-last arrays with voxel displacements."""
    spatial = np.array(img.shape[1:-1])
    ndim = len(spatial)
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), axis=-1)
    norm = 2.0 * (ident + disp) / (spatial - 1) - 1.0
    grid = torch.tensor(norm[..., ::-1].astype(np.float32).copy())  # torch wants (x, y[, z])
    x = torch.tensor(img).permute(0, ndim + 1, *range(1, ndim + 1))
    mode = "bilinear" if order == 1 else "nearest"
    y = torch.nn.functional.grid_sample(
        x, grid, mode=mode, padding_mode=padding, align_corners=True
    )
    return y.permute(0, *range(2, ndim + 2), 1).numpy()


@pytest.mark.reference
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_matches_torch_grid_sample(shape, order, padding):
    torch = require_reference("torch")
    img, disp = _random(shape, 3.0, 3)
    out = np.asarray(warp(img, disp, order=order, padding=padding))
    ref = _torch_grid_sample(torch, img, disp, order, padding)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_gradients_match_torch_grid_sample(shape, padding):
    torch = require_reference("torch")
    img, disp = _random(shape, 3.0, 4)
    spatial = np.array(shape[1:-1])
    ndim = len(spatial)
    rng = np.random.default_rng(5)
    cot = rng.standard_normal(shape).astype(np.float32)

    def loss(i, d):
        return jnp.sum(warp(i, d, padding=padding) * cot)

    g_img, g_disp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(img), jnp.asarray(disp))

    ident = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), axis=-1)
    norm = (2.0 * (ident + disp) / (spatial - 1) - 1.0)[..., ::-1].astype(np.float32).copy()
    grid = torch.tensor(norm, requires_grad=True)
    x = torch.tensor(img).permute(0, ndim + 1, *range(1, ndim + 1)).contiguous()
    x.requires_grad_(True)
    y = torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode=padding, align_corners=True
    )
    (y.permute(0, *range(2, ndim + 2), 1) * torch.tensor(cot)).sum().backward()
    ref_img = x.grad.permute(0, *range(2, ndim + 2), 1).numpy()
    # d/d(voxel displacement) = d/d(normalised coordinate) * 2 / (n - 1), axes reversed back.
    ref_disp = grid.grad.numpy()[..., ::-1] * (2.0 / (spatial - 1))
    np.testing.assert_allclose(np.asarray(g_img), ref_img, atol=1e-4, rtol=0)
    # torch zeroes the gradient of a clamped coordinate sitting exactly on the border;
    # random displacements never hit the border exactly, so the two agree everywhere here.
    np.testing.assert_allclose(np.asarray(g_disp), ref_disp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_nearest_rounds_half_to_even_with_both_paddings(padding):
    # Exact half-voxel coordinates: NumPy's rint (half to even, like torch's nearbyint) as reference.
    n = 7
    img = np.arange(n * n, dtype=np.float32).reshape(1, n, n, 1)
    disp = np.zeros((1, n, n, 2), np.float32)
    disp[..., 0] = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.5, 1.5])[:, None]
    disp[..., 1] = 0.5
    out = np.asarray(warp(img, disp, order=0, padding=padding))[0, ..., 0]
    pos = np.indices((n, n)).transpose(1, 2, 0) + disp[0]
    idx = np.rint(pos).astype(int)
    inside = np.all((idx >= 0) & (idx <= n - 1), axis=-1)
    clamped = np.clip(idx, 0, n - 1)
    ref = img[0, clamped[..., 0], clamped[..., 1], 0]
    if padding == "zeros":
        ref = np.where(inside, ref, 0.0)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("shape", [(1, 5, 6, 2), (1, 4, 5, 4, 2)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_finite_difference_gradients(shape, padding):
    img, disp = _random(shape, 2.0, 6)
    with jax.enable_x64(True):
        i64 = jnp.asarray(img, jnp.float64)
        d64 = jnp.asarray(disp, jnp.float64)
        check_grads(
            lambda i, d: warp(i, d, padding=padding),
            (i64, d64),
            order=1,
            modes=("fwd", "rev"),
            eps=1e-6,
        )


def test_displacement_only_gradient_does_no_scatter():
    img, disp = _random((1, 6, 7, 5, 1), 1.5, 7)

    def loss(d, i):
        return jnp.sum(warp(i, d) ** 2)

    only_disp = str(jax.make_jaxpr(jax.grad(loss))(disp, img))
    both = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(disp, img))
    assert "scatter" not in only_disp
    assert "scatter" in both
    g1 = jax.grad(loss)(disp, img)
    g2, _ = jax.grad(loss, argnums=(0, 1))(disp, img)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-6)


def test_gradient_does_not_gather_again():
    # The output and its displacement derivatives share the 2**ndim corner gathers; the backward
    # pass reuses them (and scatters for the image) instead of gathering again.
    img, disp = _random((1, 6, 7, 5, 2), 1.5, 11)

    def loss(d, i):
        return jnp.sum(warp(i, d) ** 2)

    for argnums in (0, (0, 1)):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(disp, img))
        assert jaxpr.count("gather[") == 8


@pytest.mark.parametrize("shape", [(2, 5, 6, 3), (2, 4, 5, 3, 2)])
def test_linear_in_the_image(shape):
    # warp is linear in the image: its JVP w.r.t. the image is warp itself, and its VJP is the
    # adjoint (<warp(x), y> == <x, vjp(y)>).
    img, disp = _random(shape, 2.0, 12)
    rng = np.random.default_rng(13)
    tangent = rng.standard_normal(shape).astype(np.float32)
    cot = rng.standard_normal(shape).astype(np.float32)
    _, jvp = jax.jvp(lambda i: warp(i, disp), (img,), (tangent,))
    np.testing.assert_allclose(np.asarray(jvp), np.asarray(warp(tangent, disp)), atol=1e-6)
    (vjp,) = jax.vjp(lambda i: warp(i, disp), img)[1](cot)
    lhs = np.sum(np.asarray(warp(tangent, disp), np.float64) * cot)
    rhs = np.sum(tangent.astype(np.float64) * np.asarray(vjp))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_single_argument_gradients_match_joint():
    # Differentiating one argument takes other code paths than differentiating both (checked
    # against torch and finite differences above); they must agree.
    img, disp = _random((2, 5, 6, 4, 3), 1.5, 14)
    cot = np.random.default_rng(15).standard_normal(img.shape).astype(np.float32)

    def loss(i, d):
        return jnp.sum(warp(i, d, padding="zeros") * cot)

    g_img, g_disp = jax.grad(loss, argnums=(0, 1))(img, disp)
    np.testing.assert_allclose(np.asarray(jax.grad(loss, 0)(img, disp)), np.asarray(g_img))
    np.testing.assert_allclose(np.asarray(jax.grad(loss, 1)(img, disp)), np.asarray(g_disp))
    # One image shared by the batch: its gradient sums over the displacements.
    g_shared = jax.grad(loss, 0)(img[:1], disp)
    tiled = jax.grad(loss, 0)(np.broadcast_to(img[:1], img.shape), disp)
    np.testing.assert_allclose(np.asarray(g_shared)[0], np.asarray(tiled).sum(0), atol=1e-5)


def test_linear_transpose_of_the_jvp_is_the_vjp():
    img, disp = _random((1, 5, 4, 6, 2), 1.5, 16)
    cot = np.random.default_rng(17).standard_normal(img.shape).astype(np.float32)

    def tangent_map(ti, td):
        return jax.jvp(warp, (img, disp), (ti, td))[1]

    transposed = jax.linear_transpose(tangent_map, img, disp)(cot)
    vjp = jax.vjp(warp, img, disp)[1](cot)
    for a, b in zip(transposed, vjp, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 4, 5, 2), (1, 3, 4, 3, 1)])
def test_second_order_gradients(shape):
    img, disp = _random(shape, 1.5, 18)
    with jax.enable_x64(True):
        check_grads(
            lambda i, d: jnp.sum(jnp.sin(warp(i, d))),
            (jnp.asarray(img, jnp.float64), jnp.asarray(disp, jnp.float64)),
            order=2,
            modes=("fwd", "rev"),
            eps=1e-5,
        )


def test_vmap_of_gradients():
    img, disp = _random((3, 5, 4, 6, 2), 1.5, 19)

    def loss(i, d):
        return jnp.sum(jnp.sin(warp(i, d)))

    batched = jax.vmap(jax.grad(loss, argnums=(0, 1)))(img[:, None], disp[:, None])
    for b in range(3):
        single = jax.grad(loss, argnums=(0, 1))(img[b : b + 1], disp[b : b + 1])
        for got, want in zip(batched, single, strict=True):
            np.testing.assert_allclose(np.asarray(got[b]), np.asarray(want), atol=1e-5)


def test_jit_vmap_and_channels():
    img, disp = _random((2, 6, 7, 5, 3), 1.5, 8)
    out = np.asarray(jax.jit(warp)(img, disp))
    per_channel = [np.asarray(warp(img[..., c : c + 1], disp)) for c in range(3)]
    np.testing.assert_allclose(out, np.concatenate(per_channel, -1), atol=1e-6)
    stacked = jax.vmap(warp)(img[:, None], disp[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(stacked), out, atol=1e-6)
    # One image shared across a batch of displacements.
    shared = np.asarray(warp(img[:1], disp))
    np.testing.assert_allclose(shared[0], out[0], atol=1e-6)
    np.testing.assert_allclose(shared[1], np.asarray(warp(img[:1], disp[1:]))[0], atol=1e-6)


def test_nearest_keeps_integer_labels():
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 4, (1, 6, 6, 6, 1)).astype(np.int32)
    disp = rng.uniform(-2, 2, (1, 6, 6, 6, 3)).astype(np.float32)
    out = warp(labels, disp, order=0)
    assert out.dtype == jnp.int32
    ref = _scipy_warp(labels.astype(np.float32), disp, 0, "border")
    np.testing.assert_array_equal(np.asarray(out), ref.astype(np.int32))


def test_grid_helpers():
    grid = np.asarray(identity_grid((3, 4, 5)))
    assert grid.shape == (3, 4, 5, 3) and grid.dtype == np.float32
    assert tuple(grid[2, 1, 4]) == (2.0, 1.0, 4.0)
    _, disp = _random((2, 3, 4, 5, 1), 1.0, 10)
    g = displacement_to_grid(disp)
    np.testing.assert_allclose(np.asarray(g), disp + grid[None], atol=1e-6)
    np.testing.assert_allclose(np.asarray(grid_to_displacement(g)), disp, atol=1e-6)


@pytest.mark.parametrize(
    "image_shape, disp_shape, kwargs, match",
    [
        ((1, 4, 4, 4, 1), (1, 4, 4, 4), {}, "displacement"),  # rank
        ((1, 4, 4, 4, 1), (1, 4, 4, 4, 2), {}, "displacement"),  # last axis != ndim
        ((1, 4, 4, 1), (1, 4, 4, 4, 3), {}, "image"),  # image rank
        ((1, 4, 4, 5, 1), (1, 4, 4, 4, 3), {}, "image"),  # spatial mismatch
        ((3, 4, 4, 4, 1), (2, 4, 4, 4, 3), {}, "image"),  # batch mismatch
        ((1, 4, 4, 4, 1), (1, 4, 4, 4, 3), {"padding": "reflect"}, "padding"),
        ((1, 4, 4, 4, 1), (1, 4, 4, 4, 3), {"order": 3}, "order"),
    ],
)
def test_validation(image_shape, disp_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        warp(np.zeros(image_shape, np.float32), np.zeros(disp_shape, np.float32), **kwargs)


def test_validation_message_names_expected_and_actual():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        warp(np.zeros((1, 4, 4, 5, 1)), np.zeros((1, 4, 4, 4, 3)))
    with pytest.raises(ValueError, match="grid"):
        grid_to_displacement(np.zeros((1, 4, 4, 3)))
