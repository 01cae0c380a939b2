"""EMA of parameters as optax state: NumPy-loop closed form, warm-up, lookup in nested states."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.train.ema import ema_decay_at, ema_params, get_ema_params, mean_teacher_decay
from medjax.train.optim import frozen, lr_scale, make_optimizer
from medjax.train.state import TrainState

P0 = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array(0.3, np.float32)}
GRADS = [
    {"w": np.array([0.5, 1.0, -1.0], np.float32) * (k + 1), "b": np.array(0.2 * k, np.float32)}
    for k in range(5)
]


def _numpy_ema(lr, decays):
    p = {k: v.astype(np.float64) for k, v in P0.items()}
    e = {k: v.copy() for k, v in p.items()}
    for g, d in zip(GRADS, decays, strict=False):
        p = {k: p[k] - lr * g[k] for k in p}
        e = {k: d * e[k] + (1 - d) * p[k] for k in p}
    return p, e


def _run(tx, n=5):
    state = TrainState.create(
        apply_fn=None, params=jax.tree_util.tree_map(jnp.asarray, P0), tx=tx, rng=0
    )
    for g in GRADS[:n]:
        state = state.apply_gradients(g)
    return state


def test_ema_matches_numpy_loop():
    state = _run(optax.chain(optax.sgd(0.1), ema_params(0.9)))
    p, e = _numpy_ema(0.1, [0.9] * 5)
    ema = get_ema_params(state.opt_state)
    for k in P0:
        np.testing.assert_allclose(np.asarray(state.params[k]), p[k], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ema[k]), e[k], rtol=1e-6)
    # a true average: the teacher lags behind the student
    assert not np.allclose(np.asarray(ema["w"]), np.asarray(state.params["w"]))


def test_ema_warmup_is_linear_ramp_of_decay():
    state = _run(optax.chain(optax.sgd(0.1), ema_params(0.9, warmup_steps=4)))
    decays = [0.9 * min(1.0, t / 4) for t in range(5)]
    assert decays[0] == 0.0
    _, e = _numpy_ema(0.1, decays)
    ema = get_ema_params(state.opt_state)
    for k in P0:
        np.testing.assert_allclose(np.asarray(ema[k]), e[k], rtol=1e-6)
    np.testing.assert_allclose(float(ema_decay_at(2, 0.9, 4)), 0.45, rtol=1e-6)


def _mean_teacher_reference(decay, n):
    """Tarvainen & Valpola's update_ema_variables: alpha = min(1 - 1/(global_step + 1), decay),
    called after ``global_step += 1``."""
    alphas, global_step = [], 0
    for _ in range(n):
        global_step += 1
        alphas.append(min(1 - 1 / (global_step + 1), decay))
    return alphas


def test_mean_teacher_decay_matches_the_reference_loop():
    alphas = _mean_teacher_reference(0.7, 5)
    np.testing.assert_allclose(alphas[:3], [0.5, 2 / 3, 0.7])  # a running mean, then the decay
    state = _run(optax.chain(optax.sgd(0.1), ema_params(mean_teacher_decay(0.7))))
    _, e = _numpy_ema(0.1, alphas)
    for k in P0:
        np.testing.assert_allclose(np.asarray(get_ema_params(state.opt_state)[k]), e[k], rtol=1e-6)
    # the same through make_optimizer's config
    tx = make_optimizer(
        {"name": "sgd", "learning_rate": 0.1, "ema_decay": 0.7, "ema_warmup_steps": "mean_teacher"}
    )
    ema = get_ema_params(_run(tx).opt_state)
    for k in P0:
        np.testing.assert_allclose(np.asarray(ema[k]), e[k], rtol=1e-6)
    with pytest.raises(ValueError, match="ema_warmup_steps"):
        make_optimizer(
            {"name": "sgd", "learning_rate": 0.1, "ema_decay": 0.7, "ema_warmup_steps": "cosine"}
        )


def test_first_update_without_warmup_and_callable_decay():
    state = _run(optax.chain(optax.sgd(0.1), ema_params(lambda t: 0.5 + 0.1 * t)), n=3)
    _, e = _numpy_ema(0.1, [0.5, 0.6, 0.7])
    np.testing.assert_allclose(np.asarray(get_ema_params(state.opt_state)["w"]), e["w"], rtol=1e-6)


def test_get_ema_params_in_nested_states():
    trainable = {"w": True, "b": False}
    inner = optax.chain(
        optax.clip_by_global_norm(100.0),
        frozen(optax.chain(optax.adam(0.1), lr_scale()), trainable),
        ema_params(0.5),
    )
    tx = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(optax.scale(learning_rate), inner)
    )(learning_rate=1.0)
    state = _run(tx, n=2)
    ema = get_ema_params(state.opt_state)
    assert set(ema) == {"w", "b"}
    # frozen b: teacher stays at its initial value; trainable w moved
    np.testing.assert_allclose(np.asarray(ema["b"]), P0["b"])
    assert not np.allclose(np.asarray(ema["w"]), P0["w"])
    # a dict of named optimiser states with one teacher each
    nested = {"a": state.opt_state, "b": (state.opt_state,)}
    with pytest.raises(ValueError, match="expected one"):
        get_ema_params(nested)
    np.testing.assert_allclose(
        np.asarray(get_ema_params(nested, index=1)["w"]), np.asarray(ema["w"])
    )
    with pytest.raises(ValueError, match="ema_params"):
        get_ema_params(optax.sgd(0.1).init(P0))


def test_ema_validation_and_dtype():
    with pytest.raises(ValueError, match="decay"):
        ema_params(1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        ema_params(0.9, warmup_steps=-1)
    tx = ema_params(0.9, dtype=jnp.float16)
    s = tx.init(P0)
    assert s.ema["w"].dtype == jnp.float16
    with pytest.raises(ValueError, match="params"):
        tx.update(P0, s)
