"""Step builders vs hand-written NumPy loops: supervised, adversarial (WGAN), co-training."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.train.ema import ema_params, get_ema_params
from medjax.train.mesh import make_mesh, replicate, shard_batch
from medjax.train.state import TrainState
from medjax.train.steps import (
    adversarial_step,
    compile_step,
    cotraining_step,
    ramp_weight,
    supervised_step,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(8, 3)).astype(np.float32)
Y = RNG.normal(size=(8,)).astype(np.float32)


def _linear_state(w, tx, seed=0):
    return TrainState.create(
        apply_fn=lambda v, x: x @ v["params"]["w"],
        params={"w": jnp.asarray(w, jnp.float32)},
        tx=tx,
        rng=seed,
    )


def _mse_loss(params, model_state, batch, rng, rest):
    r = batch["x"] @ params["w"] - batch["y"]
    return jnp.mean(r**2), ({"key0": jax.random.key_data(rng)[0]}, model_state)


def test_supervised_step_matches_numpy_sgd():
    lr = 0.1
    mesh = make_mesh(jax.devices()[:1])
    state = replicate(_linear_state([0.1, -0.2, 0.3], optax.sgd(lr)), mesh)
    step = compile_step(supervised_step(_mse_loss), mesh)
    w = np.array([0.1, -0.2, 0.3], np.float64)
    for i in range(3):
        expected_loss = np.mean((X @ w - Y) ** 2)
        expected_key = jax.random.key_data(
            jax.random.fold_in(jax.random.fold_in(jax.random.key(0), i), 0)
        )
        state, m = step(state, shard_batch({"x": X, "y": Y}, mesh))
        np.testing.assert_allclose(float(m["loss"]), expected_loss, rtol=1e-5)
        assert int(m["key0"]) == int(expected_key[0])
        w = w - lr * 2.0 / len(Y) * X.T @ (X @ w - Y)
        np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5)
    assert int(state.step) == 3


def test_compile_step_rejects_non_callable():
    with pytest.raises(ValueError, match="step_fn"):
        compile_step(None, make_mesh())


# ---------------------------------------------------------------- adversarial (WGAN)

REAL = RNG.normal(loc=1.0, size=(8, 3)).astype(np.float32)
NOISE = RNG.normal(size=(8, 3)).astype(np.float32)
CLIP = 0.03
LR_C, LR_G = 0.05, 0.1


def _critic_loss(c, ms, gen, batch, rng, rest):
    fake = batch["z"] * gen.params["g"]
    loss = -(jnp.mean(batch["real"] @ c["c"]) - jnp.mean(fake @ c["c"]))
    return loss, ({}, ms)


def _gen_loss(g, ms, critic, batch, rng, rest):
    fake = batch["z"] * g["g"]
    return -jnp.mean(fake @ critic.params["c"]), ({}, ms)


def _gen_state():
    return TrainState.create(
        apply_fn=None, params={"g": jnp.array([0.5, -0.5, 0.2])}, tx=optax.sgd(LR_G), rng=0
    )


def _critic_state():
    return TrainState.create(
        apply_fn=None, params={"c": jnp.array([0.02, -0.01, 0.0])}, tx=optax.sgd(LR_C), rng=1
    )


def _adv_numpy(g, c, n_critic):
    # d/dc [-(mean(real) - mean(z*g)) . c] = -(mean(real) - mean(z) * g)
    for _ in range(n_critic):
        grad_c = -(REAL.mean(0) - NOISE.mean(0) * g)
        c = np.clip(c - LR_C * grad_c, -CLIP, CLIP)
    grad_g = -NOISE.mean(0) * c
    return g - LR_G * grad_g, c


def test_adversarial_step_matches_numpy_and_clips():
    n_critic = 3
    state = {"gen": _gen_state(), "critic": _critic_state()}
    step = jax.jit(adversarial_step(_gen_loss, _critic_loss, n_critic=n_critic, clip=CLIP))
    g, c = np.array([0.5, -0.5, 0.2]), np.array([0.02, -0.01, 0.0])
    batch = {"real": REAL, "z": NOISE}
    for i in range(3):
        state, m = step(state, batch)
        g, c = _adv_numpy(g, c, n_critic)
        np.testing.assert_allclose(np.asarray(state["critic"].params["c"]), c, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(state["gen"].params["g"]), g, rtol=1e-5, atol=1e-7)
        assert np.all(np.abs(np.asarray(state["critic"].params["c"])) <= CLIP + 1e-7)
        assert int(state["critic"].step) == n_critic * (i + 1)
        assert int(state["gen"].step) == i + 1
        assert int(m["n_critic"]) == n_critic
    # the clip was active: some critic weight sits on the bound
    assert np.isclose(np.max(np.abs(c)), CLIP)


def test_adversarial_clip_after_every_critic_step():
    seen = []

    def critic_loss(c, ms, gen, batch, rng, rest):
        # record the params each critic update starts from (all but the first come after a clip)
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), c["c"])
        return _critic_loss(c, ms, gen, batch, rng, rest)

    state = {"gen": _gen_state(), "critic": _critic_state()}
    big = {"real": REAL * 50.0, "z": NOISE}
    step = jax.jit(adversarial_step(_gen_loss, critic_loss, n_critic=4, clip=CLIP))
    state, _ = step(state, big)
    jax.effects_barrier()
    assert len(seen) == 4
    for v in seen[1:]:
        assert np.all(np.abs(v) <= CLIP + 1e-7)


def test_generator_frozen_during_critic_warmup():
    state = {"gen": _gen_state(), "critic": _critic_state()}
    g0 = np.asarray(state["gen"].params["g"]).copy()
    gen_opt0 = jax.tree_util.tree_leaves(state["gen"].opt_state)
    step = jax.jit(
        adversarial_step(_gen_loss, _critic_loss, n_critic=2, clip=CLIP, update_generator=False)
    )
    state, m = step(state, {"real": REAL, "z": NOISE})
    np.testing.assert_array_equal(np.asarray(state["gen"].params["g"]), g0)
    for a, b in zip(jax.tree_util.tree_leaves(state["gen"].opt_state), gen_opt0, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state["gen"].step) == 0 and int(state["critic"].step) == 2
    assert "gen/loss" not in m


def test_growing_n_critic_without_recompiling():
    traces = []

    def counted(state, batch):
        traces.append(1)
        return inner(state, batch)

    inner = adversarial_step(_gen_loss, _critic_loss, n_critic=lambda s: 1 + s // 2, clip=CLIP)
    step = jax.jit(counted)
    state = {"gen": _gen_state(), "critic": _critic_state()}
    counts = []
    for _ in range(4):
        state, m = step(state, {"real": REAL, "z": NOISE})
        counts.append(int(m["n_critic"]))
    assert counts == [1, 1, 2, 2]
    assert int(state["critic"].step) == 6
    assert len(traces) == 1


def test_critic_features_run_once_per_step_and_feed_the_critic():
    """critic_features: the frozen generator's output, computed once before the critic loop, is
    the critics' batch (the same numbers as computing it in every critic update); the generator
    update still gets the raw batch."""
    calls = []

    def features(gen, batch, rng, rest):
        jax.debug.callback(lambda: calls.append(1))
        return {"real": batch["real"], "fake": batch["z"] * gen.params["g"]}

    def critic_on_features(c, ms, gen, batch, rng, rest):
        loss = -(jnp.mean(batch["real"] @ c["c"]) - jnp.mean(batch["fake"] @ c["c"]))
        return loss, ({}, ms)

    def gen_on_raw(g, ms, critic, batch, rng, rest):
        assert set(batch) == {"real", "z"}
        return _gen_loss(g, ms, critic, batch, rng, rest)

    state = {"gen": _gen_state(), "critic": _critic_state()}
    step = jax.jit(
        adversarial_step(
            gen_on_raw, critic_on_features, n_critic=3, clip=CLIP, critic_features=features
        )
    )
    g, c = np.array([0.5, -0.5, 0.2]), np.array([0.02, -0.01, 0.0])
    for _ in range(2):
        state, _ = step(state, {"real": REAL, "z": NOISE})
        g, c = _adv_numpy(g, c, 3)
    jax.effects_barrier()
    assert len(calls) == 2  # once per step, not once per critic update
    np.testing.assert_allclose(np.asarray(state["critic"].params["c"]), c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(state["gen"].params["g"]), g, rtol=1e-5, atol=1e-7)


def test_adversarial_validation():
    with pytest.raises(ValueError, match="n_critic"):
        adversarial_step(_gen_loss, _critic_loss, n_critic=-1)
    with pytest.raises(ValueError, match="clip"):
        adversarial_step(_gen_loss, _critic_loss, clip=0.0)


# ---------------------------------------------------------------- co-training


def test_ramp_weight_closed_forms():
    steps = np.array([0, 10, 50, 100, 150])
    p = np.clip(steps / 100.0, 0, 1)
    got = np.array([float(ramp_weight(s, max_weight=0.1, ramp_steps=100)) for s in steps])
    np.testing.assert_allclose(got, 0.1 * (2 / (1 + np.exp(-10 * p)) - 1), rtol=1e-6, atol=1e-8)
    got = np.array([float(ramp_weight(s, ramp_steps=100, kind="exp")) for s in steps])
    np.testing.assert_allclose(got, np.exp(-5 * (1 - p) ** 2), rtol=1e-6)
    got = np.array([float(ramp_weight(s, ramp_steps=100, kind="linear")) for s in steps])
    np.testing.assert_allclose(got, p, rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        ramp_weight(1, ramp_steps=10, kind="cosine")


def _co_loss(params, ms, teacher, batch, rng, weight, rest):
    pred = batch["x"] @ params["w"]
    soft = teacher.apply_fn(teacher.variables(), batch["x"])
    hard = jnp.mean((pred - batch["y"]) ** 2)
    cons = jnp.mean((pred - soft) ** 2)
    return hard + weight * cons, ({"consistency": cons}, ms)


def test_cotraining_matches_numpy_loop():
    lr, decay, ramp = 0.1, 0.6, 4
    wa0, wb0 = np.array([0.3, -0.1, 0.2]), np.array([-0.4, 0.5, 0.1])
    tx = optax.chain(optax.sgd(lr), ema_params(decay))
    state = {"a": _linear_state(wa0, tx, seed=1), "b": _linear_state(wb0, tx, seed=2)}
    weight = functools.partial(ramp_weight, max_weight=0.5, ramp_steps=ramp)
    step = jax.jit(cotraining_step(_co_loss, weight=weight))

    a, b, ea, eb = wa0.copy(), wb0.copy(), wa0.copy(), wb0.copy()
    n = len(Y)
    for t in range(5):
        p = min(t / ramp, 1.0)
        w = 0.5 * (2 / (1 + np.exp(-10 * p)) - 1)
        ga = 2 / n * X.T @ (X @ a - Y) + w * 2 / n * X.T @ (X @ a - X @ eb)
        gb = 2 / n * X.T @ (X @ b - Y) + w * 2 / n * X.T @ (X @ b - X @ ea)
        a, b = a - lr * ga, b - lr * gb
        ea, eb = decay * ea + (1 - decay) * a, decay * eb + (1 - decay) * b
        state, m = step(state, {"x": X, "y": Y})
        np.testing.assert_allclose(float(m["weight"]), w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(state["a"].params["w"]), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state["b"].params["w"]), b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(get_ema_params(state["a"].opt_state)["w"]), ea, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(get_ema_params(state["b"].opt_state)["w"]), eb, rtol=1e-5, atol=1e-6
        )
    # the two models stay different (different initialisations) and the weight ramped up
    assert not np.allclose(a, b)
    assert float(m["weight"]) > 0.49


def test_supervised_step_reports_norms_like_numpy():
    lr = 0.1
    state = _linear_state([0.1, -0.2, 0.3], optax.sgd(lr))
    _, m = jax.jit(supervised_step(_mse_loss))(state, {"x": X, "y": Y})
    w = np.array([0.1, -0.2, 0.3])
    g = 2.0 / len(Y) * X.T @ (X @ w - Y)
    np.testing.assert_allclose(float(m["grad_norm"]), np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(float(m["update_norm"]), lr * np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(float(m["param_norm"]), np.linalg.norm(w - lr * g), rtol=1e-5)


def test_frozen_networks_reach_the_loss_as_arguments_not_constants():
    """A frozen 'teacher' entry of the state is passed to the loss as ``rest``; changing its
    params changes the result without recompiling, and the teacher itself never moves."""
    traces = []

    def loss(params, ms, batch, rng, rest):
        traces.append(1)
        target = batch["x"] @ rest["teacher"].params["w"]
        return jnp.mean((batch["x"] @ params["w"] - target) ** 2), ({}, ms)

    step = jax.jit(supervised_step(loss, key="student"))
    state = {
        "student": _linear_state([0.0, 0.0, 0.0], optax.sgd(0.1)),
        "teacher": _linear_state([1.0, 2.0, 3.0], optax.sgd(0.1)),
    }
    s1, m1 = step(state, {"x": X})
    teacher2 = state["teacher"].replace(params={"w": jnp.asarray([-1.0, 0.0, 1.0])})
    other = {**state, "teacher": teacher2}
    s2, m2 = step(other, {"x": X})
    assert len(traces) == 1  # one compilation for both teachers
    assert not np.isclose(float(m1["loss"]), float(m2["loss"]))
    np.testing.assert_array_equal(np.asarray(s1["teacher"].params["w"]), [1.0, 2.0, 3.0])
    assert int(s1["teacher"].step) == 0 and int(s1["student"].step) == 1
    with pytest.raises(ValueError, match="entry 'student'"):
        supervised_step(loss, key="student")(state["student"], {"x": X})


class TestSupervisedStepVariants(chex.TestCase):
    """The supervised step gives the same update with and without jit (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_same_update(self):
        state = _linear_state([0.1, -0.2, 0.3], optax.sgd(0.1))
        new, m = self.variant(supervised_step(_mse_loss))(state, {"x": X, "y": Y})
        w = np.array([0.1, -0.2, 0.3])
        w = w - 0.1 * 2.0 / len(Y) * X.T @ (X @ w - Y)
        chex.assert_trees_all_close(np.asarray(new.params["w"]), w, rtol=1e-5)


def test_cotraining_with_one_model_is_self_teaching_against_numpy():
    """models=("net",): the model learns from its OWN EMA teacher (the self-training baseline)."""
    lr, decay = 0.1, 0.6
    w0 = np.array([0.3, -0.1, 0.2])
    tx = optax.chain(optax.sgd(lr), ema_params(decay))
    state = {"net": _linear_state(w0, tx, seed=1), "frozen": _linear_state(w0, optax.sgd(lr))}
    step = jax.jit(cotraining_step(_co_loss, weight=0.5, models=("net",)))
    w, e, n = w0.copy(), w0.copy(), len(Y)
    for _ in range(3):
        g = 2 / n * X.T @ (X @ w - Y) + 0.5 * 2 / n * X.T @ (X @ w - X @ e)
        w = w - lr * g
        e = decay * e + (1 - decay) * w
        state, m = step(state, {"x": X, "y": Y})
        np.testing.assert_allclose(np.asarray(state["net"].params["w"]), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(get_ema_params(state["net"].opt_state)["w"]), e, rtol=1e-5, atol=1e-6
        )
    assert set(m) >= {"net/loss", "net/consistency", "net/grad_norm", "weight", "loss"}
    assert float(m["loss"]) == float(m["net/loss"])
    assert int(state["frozen"].step) == 0  # the other entries reach the loss as rest, unchanged
    with pytest.raises(ValueError, match="two different entry names"):
        cotraining_step(_co_loss, models=("a", "a"))
    with pytest.raises(ValueError, match="entries 'net'"):
        cotraining_step(_co_loss, models=("net",))({"a": state["net"]}, {"x": X, "y": Y})
