"""medjax.ops.crop_at / paste_at against a NumPy loop: clamping, vmap over organs, jit, adjointness."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.ops import crop_at, paste_at


def _numpy_start(c, size, spatial):
    return [
        min(max(int(np.round(ci)) - s // 2, 0), n - s)
        for ci, s, n in zip(c, size, spatial, strict=True)
    ]


def _numpy_crop(volume, centres, size):
    out = []
    for v, c in zip(volume, centres, strict=True):
        st = _numpy_start(c, size, v.shape[:-1])
        out.append(v[tuple(slice(a, a + s) for a, s in zip(st, size, strict=True))])
    return np.stack(out)


def _numpy_paste(volume, patch, centres):
    out = volume.copy()
    for b, c in enumerate(centres):
        st = _numpy_start(c, patch.shape[1:-1], volume.shape[1:-1])
        out[(b,) + tuple(slice(a, a + s) for a, s in zip(st, patch.shape[1:-1], strict=True))] = (
            patch[b]
        )
    return out


class TestCropPaste(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_loop_with_clamping(self):
        rng = np.random.default_rng(0)
        vol = rng.normal(size=(3, 10, 12, 9, 2)).astype(np.float32)
        # inside, beyond the low edge, beyond the high edge, fractional
        centres = np.array([[5, 6, 4], [-3, 0.4, 1], [20, 11.6, 8.5]], np.float32)
        size = (4, 6, 3)
        got = self.variant(lambda v, c: crop_at(v, c, size))(vol, centres)
        chex.assert_trees_all_close(np.asarray(got), _numpy_crop(vol, centres, size))
        patch = rng.normal(size=(3, *size, 2)).astype(np.float32)
        pasted = self.variant(paste_at)(vol, patch, centres)
        chex.assert_trees_all_close(np.asarray(pasted), _numpy_paste(vol, patch, centres))


def test_vmap_over_organs_and_traced_centres():
    rng = np.random.default_rng(1)
    vol = jnp.asarray(rng.normal(size=(2, 8, 16, 16, 1)).astype(np.float32))
    centres = rng.uniform(0, 16, size=(3, 2, 3)).astype(np.float32)  # (organs, B, ndim)
    crops = jax.jit(jax.vmap(lambda c: crop_at(vol, c, (4, 6, 6))))(centres)
    assert crops.shape == (3, 2, 4, 6, 6, 1)
    for o in range(3):
        chex.assert_trees_all_close(
            np.asarray(crops[o]), _numpy_crop(np.asarray(vol), centres[o], (4, 6, 6))
        )


def test_paste_into_zeros_is_the_adjoint_of_crop_and_gradients_flow():
    rng = np.random.default_rng(2)
    v = jnp.asarray(rng.normal(size=(2, 7, 9, 3)).astype(np.float32))
    p = jnp.asarray(rng.normal(size=(2, 3, 4, 3)).astype(np.float32))
    c = jnp.asarray([[1.0, 8.0], [3.0, 4.0]])
    lhs = jnp.vdot(crop_at(v, c, (3, 4)), p)
    rhs = jnp.vdot(v, paste_at(jnp.zeros_like(v), p, c))
    np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-5)
    g = jax.grad(lambda v: jnp.sum(crop_at(v, c, (3, 4)) * p))(v)
    chex.assert_trees_all_close(g, paste_at(jnp.zeros_like(v), p, c))
    gp = jax.grad(lambda p: jnp.sum(paste_at(v, p, c) ** 2))(p)
    chex.assert_trees_all_close(gp, 2 * p)


def test_bad_arguments_are_named():
    v = jnp.zeros((2, 8, 8, 1))
    with pytest.raises(ValueError, match="centres"):
        crop_at(v, jnp.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="inside the volume"):
        crop_at(v, jnp.zeros((2, 2)), 9)
    with pytest.raises(ValueError, match="patch"):
        paste_at(v, jnp.zeros((2, 4, 4, 2)), jnp.zeros((2, 2)))
