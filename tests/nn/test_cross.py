"""CrossConv / CrossBlock against a NumPy loop reference (2D and 3D)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.nn.cross import CrossBlock, CrossBlock3D, CrossConv, CrossConv3D


def np_conv_same(x, kernel, bias):
    """Zero-padded 'same' cross-correlation, channels-last, one image: x (*S, Ci) -> (*S, Co)."""
    nd = x.ndim - 1
    k = kernel.shape[0]
    p = k // 2
    xp = np.pad(x, [(p, p)] * nd + [(0, 0)])
    out = np.zeros(x.shape[:-1] + (kernel.shape[-1],), np.float64)
    for offset in np.ndindex(*(k,) * nd):
        window = xp[tuple(slice(o, o + s) for o, s in zip(offset, x.shape[:-1], strict=True))]
        out += window.astype(np.float64) @ kernel[offset].astype(np.float64)
    return out + bias


def np_cross_conv(query, support, kernel, bias):
    """Reference: z[b, i] = conv([query[b] || support[b, i]]) with one shared kernel."""
    b, n = support.shape[:2]
    out = np.zeros(support.shape[:-1] + (kernel.shape[-1],))
    for bi in range(b):
        for i in range(n):
            x = np.concatenate([query[bi], support[bi, i]], axis=-1)
            out[bi, i] = np_conv_same(x, kernel, bias)
    return out


def np_params(module, *inputs, seed=0):
    """Random parameters (host-drawn, non-zero biases) with the module's tree and shapes."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32), shapes)


def lrelu(x):
    return np.where(x >= 0, x, 0.01 * x)


@pytest.mark.parametrize("cls,spatial", [(CrossConv, (8, 6)), (CrossConv3D, (4, 6, 5))])
def test_cross_conv_matches_numpy_loop(cls, spatial):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, *spatial, 3)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(2, 3, *spatial, 2)), jnp.float32)
    m = cls(features=4)
    params = np_params(m, q, s)  # non-zero bias, so that its placement is checked too
    out = m.apply(params, q, s)
    ref = np_cross_conv(
        np.asarray(q),
        np.asarray(s),
        np.asarray(params["params"]["kernel"]),
        params["params"]["bias"],
    )
    assert out.shape == (2, 3, *spatial, 4)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_cross_conv_shared_kernel_any_support_size_and_equivariance():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 8, 8, 2)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(1, 5, 8, 8, 2)), jnp.float32)
    m = CrossConv(features=3)
    params = np_params(m, q, s[:, :1])
    assert params["params"]["kernel"].shape == (3, 3, 4, 3)  # independent of the support size
    out = m.apply(params, q, s)
    perm = np.array([3, 0, 4, 1, 2])
    out_perm = m.apply(params, q, s[:, perm])
    np.testing.assert_allclose(np.asarray(out_perm), np.asarray(out[:, perm]), atol=1e-6)
    # element i only depends on support element i
    one = m.apply(params, q, s[:, 2:3])
    np.testing.assert_allclose(np.asarray(one[:, 0]), np.asarray(out[:, 2]), atol=1e-6)


@pytest.mark.parametrize("cls,spatial", [(CrossBlock, (8, 8)), (CrossBlock3D, (4, 4, 6))])
def test_cross_block_matches_numpy_reference(cls, spatial):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, *spatial, 2)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(2, 3, *spatial, 3)), jnp.float32)
    m = cls(features=4, conv_features=5)
    params = np_params(m, q, s)
    p = jax.tree.map(np.asarray, params["params"])
    u, v = m.apply(params, q, s)
    z = np_cross_conv(np.asarray(q), np.asarray(s), p["cross"]["kernel"], p["cross"]["bias"])
    zu = z.mean(axis=1)
    u_ref = np.stack(
        [
            lrelu(np_conv_same(zu[b], p["query_conv"]["kernel"], p["query_conv"]["bias"]))
            for b in range(2)
        ]
    )
    v_ref = np.stack(
        [
            np.stack(
                [
                    lrelu(
                        np_conv_same(
                            z[b, i], p["support_conv"]["kernel"], p["support_conv"]["bias"]
                        )
                    )
                    for i in range(3)
                ]
            )
            for b in range(2)
        ]
    )
    assert u.shape == (2, *spatial, 5) and v.shape == (2, 3, *spatial, 5)
    np.testing.assert_allclose(np.asarray(u), u_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(v), v_ref, atol=1e-4, rtol=1e-4)


def test_cross_block_query_is_permutation_invariant():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 8, 8, 1)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(1, 4, 8, 8, 2)), jnp.float32)
    m = CrossBlock(features=4)
    params = np_params(m, q, s)
    u, v = m.apply(params, q, s)
    perm = np.array([2, 3, 1, 0])
    u2, v2 = m.apply(params, q, s[:, perm])
    np.testing.assert_allclose(np.asarray(u2), np.asarray(u), atol=1e-5)
    np.testing.assert_allclose(np.asarray(v2), np.asarray(v[:, perm]), atol=1e-5)


def test_init_follows_spec():
    # Kaiming-normal fan-in: sqrt(2 / fan_in) for activated convs, sqrt(1 / fan_in) for cross conv.
    q = jnp.zeros((1, 8, 8, 32))
    s = jnp.zeros((1, 1, 8, 8, 32))
    m = CrossBlock(features=64)
    p = jax.jit(m.init)(jax.random.key(10, impl="rbg"), q, s)["params"]
    fan_cross = 9 * 64
    fan_conv = 9 * 64
    np.testing.assert_allclose(np.std(p["cross"]["kernel"]), np.sqrt(1 / fan_cross), rtol=0.05)
    np.testing.assert_allclose(np.std(p["query_conv"]["kernel"]), np.sqrt(2 / fan_conv), rtol=0.05)
    np.testing.assert_allclose(
        np.std(p["support_conv"]["kernel"]), np.sqrt(2 / fan_conv), rtol=0.05
    )
    for name in ("cross", "query_conv", "support_conv"):
        assert not np.any(np.asarray(p[name]["bias"]))
    assert not np.allclose(p["query_conv"]["kernel"], p["support_conv"]["kernel"])  # unshared


def test_cross_conv_rejects_mismatched_shapes():
    m = CrossConv(features=2)
    q = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match="support"):
        jax.eval_shape(m.init, jax.random.key(0), q, jnp.zeros((1, 2, 6, 8, 1)))
    with pytest.raises(ValueError, match="support"):
        jax.eval_shape(m.init, jax.random.key(0), q, jnp.zeros((1, 8, 8, 1)))
