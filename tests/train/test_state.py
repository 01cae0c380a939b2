"""TrainState: create, apply_gradients, per-step keys, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.train.state import TrainState


def _state(rng=0, tx=None):
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    return TrainState.create(
        apply_fn=lambda v, x: v["params"]["w"] * x + v["params"]["b"],
        params=params,
        tx=tx or optax.sgd(0.1),
        rng=rng,
    )


def test_create_fields():
    s = _state()
    assert s.step.dtype == jnp.int32 and int(s.step) == 0
    assert s.model_state == {}
    assert s.rng.dtype == jnp.uint32 and s.rng.shape == (2,)
    np.testing.assert_array_equal(s.rng, jax.random.key_data(jax.random.key(0)))
    # static fields are not leaves: leaves are step, params (2), rng
    assert len(jax.tree_util.tree_leaves(s)) == 4


def test_typed_and_raw_keys_agree():
    a = _state(rng=jax.random.key(3))
    b = _state(rng=jax.random.key_data(jax.random.key(3)))
    np.testing.assert_array_equal(a.rng, b.rng)


def test_apply_gradients_is_sgd_by_hand():
    s = _state()
    grads = {"w": jnp.array([0.5, 1.0]), "b": jnp.array(-1.0)}
    s2 = s.apply_gradients(grads, model_state={"batch_stats": {"m": jnp.ones(2)}})
    np.testing.assert_allclose(s2.params["w"], [1.0 - 0.05, -2.0 - 0.1], rtol=1e-6)
    np.testing.assert_allclose(s2.params["b"], 0.5 + 0.1, rtol=1e-6)
    assert int(s2.step) == 1
    assert "batch_stats" in s2.model_state


def test_jit_roundtrip_and_variables():
    s = _state()

    @jax.jit
    def f(s):
        return s.apply_gradients(jax.tree_util.tree_map(jnp.ones_like, s.params))

    s2 = f(s)
    assert int(s2.step) == 1
    y = s2.apply_fn(s2.variables(), 2.0)
    np.testing.assert_allclose(y, (s2.params["w"] * 2.0 + s2.params["b"]), rtol=1e-6)


def test_step_rng_depends_on_step_and_phase():
    s = _state()
    k0 = jax.random.key_data(s.step_rng())
    k0b = jax.random.key_data(s.step_rng())
    k0p = jax.random.key_data(s.step_rng(1))
    k1 = jax.random.key_data(s.replace(step=s.step + 1).step_rng())
    np.testing.assert_array_equal(k0, k0b)
    assert not np.array_equal(k0, k0p)
    assert not np.array_equal(k0, k1)
    expected = jax.random.key_data(jax.random.fold_in(jax.random.key(0), 0))
    np.testing.assert_array_equal(k0, expected)


def test_validation():
    with pytest.raises(ValueError, match="rng"):
        _state(rng=jnp.zeros(3, jnp.uint32))
    with pytest.raises(ValueError, match="tx"):
        TrainState.create(apply_fn=None, params={}, tx="adam", rng=0)
    with pytest.raises(ValueError, match="model_state"):
        TrainState.create(apply_fn=None, params={}, tx=optax.sgd(1.0), rng=0, model_state=[1])
