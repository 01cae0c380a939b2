"""Tests for the VoxelMorph registration baseline (medjax.models.voxelmorph)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.losses import voxelmorph_loss, voxelmorph_loss_terms
from medjax.models.voxelmorph import VoxelMorph
from medjax.nn.blocks import fast_init

S = 16
ENC, DEC = (4, 8, 8, 8), (8, 8, 8, 8, 8, 4, 4)


def _model(**kw):
    return VoxelMorph(enc_features=ENC, dec_features=DEC, **kw)


def _pair(b=2, c=1, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (b, S, S, S, c)), jax.random.normal(k2, (b, S, S, S, c))


def _with_flow(params, bias):
    p = flax.core.unfreeze(jax.tree_util.tree_map(lambda x: x, params))
    p["flow"]["kernel"] = jnp.zeros_like(p["flow"]["kernel"])
    p["flow"]["bias"] = jnp.asarray(bias, jnp.float32)
    return p


@pytest.mark.parametrize("field", ["displacement", "diffeomorphic"])
def test_shapes_and_identity(field):
    mov, fix = _pair(c=2)
    model = _model(n_modalities=2, field=field)
    params = fast_init(model, jax.random.key(0), mov, fix)["params"]
    out = model.apply({"params": params}, mov, fix)
    assert out["displacement"].shape == (2, S, S, S, 3)
    assert out["warped"].shape == mov.shape
    # The flow head starts at N(0, 1e-5): an almost-identity transform.
    assert float(jnp.abs(out["displacement"]).max()) < 1e-2
    out0 = model.apply({"params": _with_flow(params, [0.0, 0.0, 0.0])}, mov, fix)
    assert np.all(np.asarray(out0["displacement"]) == 0.0)
    np.testing.assert_array_equal(np.asarray(out0["warped"]), np.asarray(mov))


def test_constant_velocity_is_a_translation():
    mov, fix = _pair()
    model = _model(field="diffeomorphic")
    params = fast_init(model, jax.random.key(0), mov, fix)["params"]
    shift = [2.0, -1.0, 0.0]
    out = model.apply({"params": _with_flow(params, shift)}, mov, fix)
    # Scaling and squaring of a constant field composes translations: exactly the same shift.
    np.testing.assert_allclose(
        out["displacement"], np.broadcast_to(shift, (2, S, S, S, 3)), atol=1e-5
    )
    m = np.asarray(mov)
    # Integer shift: warped[x] = moving[x + shift] away from the clamped border.
    np.testing.assert_allclose(np.asarray(out["warped"])[:, :-2, 1:], m[:, 2:, :-1], atol=1e-5)


def test_loss_closed_form():
    rng = np.random.default_rng(0)
    warped = rng.normal(size=(2, 5, 4, 3, 1)).astype(np.float32)
    fixed = rng.normal(size=(2, 5, 4, 3, 1)).astype(np.float32)
    disp = rng.normal(size=(2, 5, 4, 3, 3)).astype(np.float32)
    lam = 0.37
    got = voxelmorph_loss_terms(
        {"warped": warped, "displacement": disp}, {"fixed": fixed}, similarity="mse", lam=lam
    )
    sim = np.mean((warped - fixed) ** 2)
    smooth = np.mean(
        [np.mean(np.diff(disp, axis=k + 1) ** 2) for k in range(3)]
    )  # forward differences per spatial axis, averaged over axes
    np.testing.assert_allclose(got["sim"], sim, rtol=1e-5)
    np.testing.assert_allclose(got["smooth"], smooth, rtol=1e-5)
    np.testing.assert_allclose(got["loss"], sim + lam * smooth, rtol=1e-5)
    ncc = voxelmorph_loss(
        {"warped": warped, "displacement": disp}, {"fixed": warped}, similarity="ncc", lam=0.0
    )
    assert float(ncc) < -0.9  # an image is perfectly correlated with itself
    with pytest.raises(ValueError, match="similarity"):
        voxelmorph_loss({"warped": warped, "displacement": disp}, {"fixed": fixed}, similarity="l1")


def test_input_validation():
    mov, fix = _pair()
    with pytest.raises(ValueError, match="divisible"):
        _model().init(jax.random.key(0), mov[:, :12], fix[:, :12])
    with pytest.raises(ValueError, match="field"):
        _model(field="bspline").init(jax.random.key(0), mov, fix)
    with pytest.raises(ValueError, match="moving"):
        _model(n_modalities=4).init(jax.random.key(0), mov, fix)


def _blob(centre):
    g = np.stack(np.meshgrid(*[np.arange(S)] * 3, indexing="ij"), -1).astype(np.float32)
    return np.exp(-np.sum((g - np.asarray(centre)) ** 2, -1) / (2 * 3.0**2))[None, ..., None]


def test_training_reduces_mse_on_a_shifted_blob():
    mov, fix = jnp.asarray(_blob((7, 8, 8))), jnp.asarray(_blob((9, 8, 8)))
    model = _model()
    params = fast_init(model, jax.random.key(0), mov, fix)["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    batch = {"fixed": fix}

    @jax.jit
    def step(params, opt):
        def lf(p):
            return voxelmorph_loss(model.apply({"params": p}, mov, fix), batch, lam=0.01)

        loss, g = jax.value_and_grad(lf)(params)
        upd, opt = tx.update(g, opt, params)
        grads_ok = jnp.all(
            jnp.asarray([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(g)])
        )
        return optax.apply_updates(params, upd), opt, loss, grads_ok

    before = float(jnp.mean((mov - fix) ** 2))
    for _ in range(60):
        params, opt, loss, ok = step(params, opt)
        assert bool(ok)
    out = model.apply({"params": params}, mov, fix)
    after = float(jnp.mean((out["warped"] - fix) ** 2))
    assert after < 0.5 * before, (before, after)
    # The blob moved by +2 along axis 0: the displacement at its centre points that way.
    assert float(out["displacement"][0, 9, 8, 8, 0]) < -0.5
