"""Similarity, regulariser and adversarial losses against NumPy loops and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from medjax import losses


def _ref_local_ncc(i_img, j_img, win, eps=1e-5):
    """Per-voxel VoxelMorph NCC by explicit windows over a zero-padded image: (B, *S, C) -> cc."""
    ndim = i_img.ndim - 2
    r = [w // 2 for w in win]
    pad = [(0, 0)] + [(k, k) for k in r] + [(0, 0)]
    ip, jp = np.pad(i_img.astype(np.float64), pad), np.pad(j_img.astype(np.float64), pad)
    cc = np.zeros(i_img.shape)
    for b in range(i_img.shape[0]):
        for c in range(i_img.shape[-1]):
            for v in np.ndindex(i_img.shape[1:-1]):
                sl = tuple(slice(v[k], v[k] + win[k]) for k in range(ndim))
                a = ip[(b, *sl, c)].ravel()
                z = jp[(b, *sl, c)].ravel()
                cross = np.sum((a - a.mean()) * (z - z.mean()))
                va = np.sum((a - a.mean()) ** 2)
                vz = np.sum((z - z.mean()) ** 2)
                cc[(b, *v, c)] = cross * cross / (va * vz + eps)
    return cc


def test_mse_mask_normalisations():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 4, 3, 2)).astype(np.float32)
    b = rng.normal(size=(2, 4, 3, 2)).astype(np.float32)
    m = (rng.random((2, 4, 3)) > 0.5).astype(np.float32)
    sq = (a.astype(np.float64) - b) ** 2
    np.testing.assert_allclose(float(losses.mse(a, b)), sq.mean(), rtol=1e-6)
    masked = sum(sq[idx] * m[idx[:-1]] for idx in np.ndindex(sq.shape))
    np.testing.assert_allclose(float(losses.mse(a, b, mask=m)), masked / sq.size, rtol=1e-6)
    np.testing.assert_allclose(
        float(losses.mse(a, b, mask=m[..., None], normalize="mask")),
        masked / (m.sum() * 2),
        rtol=1e-6,
    )


@pytest.mark.parametrize("shape,window", [((2, 6, 5, 1), 3), ((1, 5, 4, 4, 2), (3, 1, 3))])
def test_local_ncc_matches_window_loop(shape, window):
    rng = np.random.default_rng(1)
    a = rng.normal(size=shape).astype(np.float32)
    b = (0.6 * a + 0.4 * rng.normal(size=shape)).astype(np.float32)
    ndim = len(shape) - 2
    win = (window,) * ndim if isinstance(window, int) else window
    cc = _ref_local_ncc(a, b, win)
    np.testing.assert_allclose(float(losses.local_ncc(a, b, window=window)), -cc.mean(), rtol=1e-4)
    m = (rng.random(shape[:-1]) > 0.3).astype(np.float32)
    mm = np.broadcast_to(m[..., None], shape)
    np.testing.assert_allclose(
        float(losses.local_ncc(a, b, window=window, mask=m, normalize="mask")),
        -(cc * mm).sum() / mm.sum(),
        rtol=1e-4,
    )


def test_local_ncc_perfect_and_gradient():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(1, 7, 6, 1)).astype(np.float32)
    # identical images are perfectly correlated wherever the window has variance
    assert float(losses.local_ncc(a, a, window=3)) == pytest.approx(-1.0, abs=1e-3)
    # an affine intensity change leaves NCC at -1 (up to eps)
    assert float(losses.local_ncc(a, 3.0 * a + 1.0, window=3)) < -0.9
    b = rng.normal(size=a.shape).astype(np.float32)
    check_grads(
        jax.jit(lambda x: losses.local_ncc(x, jnp.asarray(b), window=3)),
        (jnp.asarray(a),),
        order=1,
        modes=["rev"],
        atol=2e-2,
        rtol=2e-2,
    )


def test_heatmap_mse_and_wgan_closed_forms():
    p = np.array([[[0.0], [1.0]], [[2.0], [3.0]]], np.float32)[None]
    t = np.zeros_like(p)
    assert float(losses.heatmap_mse(p, t, weight=2.0)) == pytest.approx(2.0 * 14 / 4)
    # balanced: per sample and channel, (mean over target > 0 + mean over the rest) / 2
    t2 = np.array([[[0.0], [0.5]], [[0.0], [0.0]]], np.float32)[None]
    fg, bg = (1.0 - 0.5) ** 2, (0.0 + 4.0 + 9.0) / 3
    assert float(losses.heatmap_mse(p, t2, balanced=True)) == pytest.approx((fg + bg) / 2)
    # two channels, one with an empty foreground; a NumPy loop as the reference
    rng = np.random.default_rng(0)
    p3 = rng.uniform(size=(2, 3, 4, 2)).astype(np.float32)
    t3 = np.where(rng.uniform(size=p3.shape) > 0.7, rng.uniform(size=p3.shape), 0.0)
    t3[1, ..., 1] = 0.0
    terms = []
    for b in range(2):
        for k in range(2):
            e, f = (p3[b, ..., k] - t3[b, ..., k]) ** 2, t3[b, ..., k] > 0
            terms.append(0.5 * ((e[f].mean() if f.any() else 0.0) + e[~f].mean()))
    got = float(losses.heatmap_mse(p3, t3.astype(np.float32), weight=2.0, balanced=True))
    assert got == pytest.approx(2.0 * np.mean(terms), rel=1e-5)
    # others: per channel, the mean of its own foreground's, the other channels' foregrounds' and
    # the rest's mean errors (empty parts left out); three channels, one empty, a NumPy loop
    p4 = rng.uniform(size=(2, 3, 5, 3)).astype(np.float32)
    t4 = np.where(rng.uniform(size=p4.shape) > 0.8, rng.uniform(size=p4.shape), 0.0)
    t4[0, ..., 2] = 0.0
    terms = []
    for b in range(2):
        for k in range(3):
            e = (p4[b, ..., k] - t4[b, ..., k]) ** 2
            own = t4[b, ..., k] > 0
            oth = ~own & np.any(np.delete(t4[b], k, axis=-1) > 0, axis=-1)
            rest = ~own & ~oth
            parts = [e[m].mean() for m in (own, oth, rest) if m.any()]
            terms.append(np.mean(parts))
    got = float(losses.heatmap_mse(p4, t4.astype(np.float32), balanced=True, others=True))
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    # a heatmap lit at the other organ's peak costs a third of the error there, not ~1/N
    t5 = np.zeros((1, 1, 50, 2), np.float32)
    t5[0, 0, 10, 0] = t5[0, 0, 40, 1] = 1.0
    p5 = t5.copy()
    p5[0, 0, 40, 0] = 1.0  # channel 0 also lights organ 1
    plain = float(losses.heatmap_mse(p5, t5, balanced=True))
    split = float(losses.heatmap_mse(p5, t5, balanced=True, others=True))
    assert plain == pytest.approx(0.5 * (1.0 / 49) / 2)
    assert split == pytest.approx((1.0 / 3) / 2)
    with pytest.raises(ValueError, match="others=True needs balanced"):
        losses.heatmap_mse(p5, t5, others=True)
    d_real = np.array([1.0, 3.0])
    d_fake = np.array([[0.5], [-0.5], [1.5]])
    assert float(losses.wgan_critic_loss(d_real, d_fake)) == pytest.approx(-(2.0 - 0.5))
    assert float(losses.wgan_generator_loss(d_fake)) == pytest.approx(-0.5)


def test_phi_l1_closed_form():
    phi = np.full((2, 3, 4, 2, 3), 0.5, np.float32)
    assert float(losses.phi_l1(phi)) == 0.0
    phi[0, 1, 2, 1, 0] = 0.9
    phi[1, 0, 0, 0, 2] = 0.1
    assert float(losses.phi_l1(phi)) == pytest.approx(0.8, rel=1e-6)


def test_displacement_l2_gradient_loop_and_linear_field():
    rng = np.random.default_rng(3)
    u = rng.normal(size=(2, 4, 5, 3, 3)).astype(np.float64)
    terms = []
    for k in range(3):
        d = []
        for idx in np.ndindex(u.shape):
            if idx[k + 1] + 1 < u.shape[k + 1]:
                nxt = list(idx)
                nxt[k + 1] += 1
                d.append((u[tuple(nxt)] - u[idx]) ** 2)
        terms.append(np.mean(d))
    np.testing.assert_allclose(
        float(losses.displacement_l2_gradient(u.astype(np.float32))), np.mean(terms), rtol=1e-5
    )
    # u_0 = 0.5 x along axis 0 only (2D): only d/dx0 of component 0 is non-zero -> (0.25 / 2) / 2
    x = np.arange(6, dtype=np.float32)
    lin = np.zeros((1, 6, 4, 2), np.float32)
    lin[..., 0] = 0.5 * x[:, None]
    assert float(losses.displacement_l2_gradient(lin)) == pytest.approx(0.25 / 2 / 2)


def test_losses_are_jittable():
    a = jnp.ones((1, 5, 5, 1))
    f = jax.jit(lambda x, y: losses.local_ncc(x, y, window=3) + losses.mse(x, y))
    assert np.isfinite(float(f(a, a + 1)))


def test_validation_errors():
    a = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="target"):
        losses.mse(a, a[:, :3])
    with pytest.raises(ValueError, match="normalize"):
        losses.mse(a, a, mask=a[..., 0], normalize="voxels")
    with pytest.raises(ValueError, match="mask"):
        losses.mse(a, a, mask=np.ones((1, 4)))
    with pytest.raises(ValueError, match="window"):
        losses.local_ncc(a, a, window=4)
    with pytest.raises(ValueError, match="phi"):
        losses.phi_l1(np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="disp"):
        losses.displacement_l2_gradient(np.zeros((1, 4, 4, 3)))
