"""Schedules vs closed forms, PyTorch-parity optimisers, freezing, lr scale and host controllers."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medjax.train import optim
from medjax.train.state import TrainState
from tests.conftest import require_reference

# ---------------------------------------------------------------- schedules


def test_warmup_cosine_closed_form():
    f = optim.warmup_cosine(1.0, 100, warmup_steps=10, init_value=0.1, end_value=0.01)
    for t in [0, 5, 10, 40, 99, 100, 150]:
        if t < 10:
            want = 0.1 + (1.0 - 0.1) * t / 10
        elif t <= 100:
            want = 0.01 + (1.0 - 0.01) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
        else:
            want = 0.01
        np.testing.assert_allclose(float(f(t)), want, rtol=1e-5, err_msg=f"t={t}")
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine(1.0, 10, warmup_steps=10)


def test_multistep_and_step_decay_closed_form():
    f = optim.multistep(0.1, [30, 10], gamma=0.5)
    for t in [0, 9, 10, 29, 30, 100]:
        n = sum(t >= b for b in (10, 30))
        np.testing.assert_allclose(float(f(t)), 0.1 * 0.5**n, rtol=1e-6)
    g = optim.step_decay(3e-4, 100, 0.98)
    for t in [0, 99, 100, 250, 1000]:
        np.testing.assert_allclose(float(g(t)), 3e-4 * 0.98 ** (t // 100), rtol=1e-6)
    with pytest.raises(ValueError, match="every"):
        optim.step_decay(1.0, 0, 0.5)
    with pytest.raises(ValueError, match="schedule.name"):
        optim.make_schedule({"name": "poly"}, 1.0)


# ---------------------------------------------------------------- PyTorch parity

A = np.diag([1.0, 3.0, 0.5]).astype(np.float32)
C = np.array([1.0, -2.0, 0.5], np.float32)
W0 = np.array([0.5, 0.5, -1.0], np.float32)


def _quad_loss(w):
    d = w - C
    return 0.5 * (d @ A @ d)


def _run_optax(tx, n):
    w = jnp.asarray(W0)
    s = tx.init(w)
    out = []
    for _ in range(n):
        g = jax.grad(_quad_loss)(w)
        u, s = tx.update(g, s, w)
        w = optax.apply_updates(w, u)
        out.append(np.asarray(w))
    return np.stack(out)


def _run_torch(torch, make, n):
    w = torch.tensor(W0.copy(), requires_grad=True)
    opt = make([w])
    a, c = torch.tensor(A), torch.tensor(C)
    out = []
    for _ in range(n):
        opt.zero_grad()
        d = w - c
        (0.5 * d @ a @ d).backward()
        opt.step()
        out.append(w.detach().numpy().copy())
    return np.stack(out)


@pytest.mark.reference
@pytest.mark.parametrize(
    "kw", [{}, {"weight_decay": 1e-2}, {"momentum": 0.5}, {"centered": True, "alpha": 0.9}]
)
def test_rmsprop_matches_torch(kw):
    torch = require_reference("torch")
    ours = _run_optax(optim.rmsprop(3e-2, **kw), 8)
    ref = _run_torch(torch, lambda p: torch.optim.RMSprop(p, lr=3e-2, **kw), 8)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize(
    "kw", [{"momentum": 0.9, "weight_decay": 5e-4}, {"momentum": 0.9, "nesterov": True}, {}]
)
def test_sgd_matches_torch(kw):
    torch = require_reference("torch")
    ours = _run_optax(optim.sgd(0.1, **kw), 8)
    ref = _run_torch(torch, lambda p: torch.optim.SGD(p, lr=0.1, **kw), 8)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.reference
def test_adam_with_l2_matches_torch():
    torch = require_reference("torch")
    ours = _run_optax(optim.adam(1e-2, weight_decay=1e-2), 8)
    ref = _run_torch(torch, lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2), 8)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- freezing, clipping, lr scale


def _params():
    return {
        "frozen": {"k": jnp.array([1.0, 2.0])},
        "train": {"k": jnp.array([-1.0, 0.5])},
    }


def test_frozen_subtree_params_and_state_do_not_move():
    mask = {"frozen": {"k": False}, "train": {"k": True}}
    tx = optim.frozen(optim.adam(0.1, weight_decay=0.1), mask)
    state = TrainState.create(apply_fn=None, params=_params(), tx=tx, rng=0)
    s0 = state
    grads = {"frozen": {"k": jnp.array([1.0, 1.0])}, "train": {"k": jnp.array([1.0, -1.0])}}
    for _ in range(3):
        state = state.apply_gradients(grads)
    np.testing.assert_array_equal(np.asarray(state.params["frozen"]["k"]), [1.0, 2.0])
    assert not np.allclose(np.asarray(state.params["train"]["k"]), [-1.0, 0.5])

    def adam_states(opt_state):
        return [
            x
            for x in jax.tree_util.tree_leaves(
                opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
            )
            if isinstance(x, optax.ScaleByAdamState)
        ]

    (a0,), (a3,) = adam_states(s0.opt_state), adam_states(state.opt_state)
    for moments0, moments3 in ((a0.mu, a3.mu), (a0.nu, a3.nu)):
        # the frozen leaf keeps no optimiser state at all, so there is nothing that could move
        assert isinstance(moments0["frozen"]["k"], optax.MaskedNode)
        assert isinstance(moments3["frozen"]["k"], optax.MaskedNode)
        # the trainable leaf's moments started at zero and moved
        np.testing.assert_array_equal(np.asarray(moments0["train"]["k"]), [0.0, 0.0])
        assert np.all(np.asarray(moments3["train"]["k"]) != 0.0)
    # the same with a callable mask
    tx2 = optim.frozen(optim.sgd(0.1), lambda p: {"frozen": {"k": False}, "train": {"k": True}})
    s2 = TrainState.create(apply_fn=None, params=_params(), tx=tx2, rng=0).apply_gradients(grads)
    np.testing.assert_array_equal(np.asarray(s2.params["frozen"]["k"]), [1.0, 2.0])
    np.testing.assert_allclose(np.asarray(s2.params["train"]["k"]), [-1.1, 0.6], rtol=1e-6)


def test_clip_params():
    p = {"a": jnp.array([-0.5, 0.01, 0.2]), "b": jnp.array(0.04)}
    c = optim.clip_params(p, 0.03)
    np.testing.assert_allclose(np.asarray(c["a"]), [-0.03, 0.01, 0.03], rtol=1e-6)
    np.testing.assert_allclose(float(c["b"]), 0.03, rtol=1e-6)
    with pytest.raises(ValueError, match="limit"):
        optim.clip_params(p, -1.0)


def test_lr_scale_changes_update_without_retracing():
    tx = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1})
    state = TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx, rng=0)
    traces = []

    @jax.jit
    def step(s):
        traces.append(1)
        return s.apply_gradients({"w": jnp.ones(2)})

    s1 = step(state)
    np.testing.assert_allclose(np.asarray(s1.params["w"]), [-0.1, -0.1], rtol=1e-6)
    assert optim.get_lr_scale(s1.opt_state) == 1.0
    s1 = s1.replace(opt_state=optim.set_lr_scale(s1.opt_state, 0.2))
    assert abs(optim.get_lr_scale(s1.opt_state) - 0.2) < 1e-7
    s2 = step(s1)
    np.testing.assert_allclose(np.asarray(s2.params["w"]), [-0.12, -0.12], rtol=1e-6)
    assert len(traces) == 1


def test_make_optimizer_matches_manual_chain_and_validates():
    cfg = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-3,
            "schedule": {"name": "step_decay", "every": 2, "factor": 0.5},
            "ema_decay": 0.9,
        }
    )
    ours = _run_optax(optim.make_optimizer(cfg), 6)
    manual = optax.chain(
        optax.add_decayed_weights(1e-3),
        optax.sgd(optax.exponential_decay(0.1, 2, 0.5, staircase=True), momentum=0.9),
    )
    np.testing.assert_allclose(ours, _run_optax(manual, 6), rtol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        optim.make_optimizer({"name": "adam", "learning_rate": 1e-3, "momentum": 0.9})
    with pytest.raises(ValueError, match="name"):
        optim.make_optimizer({"name": "lamb", "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="learning_rate"):
        optim.make_optimizer({"name": "adam"})


# ---------------------------------------------------------------- host controllers


def test_reduce_on_plateau_by_hand():
    r = optim.ReduceOnPlateau(factor=0.5, patience=2, mode="min", min_lr=0.25)
    seq = [1.0, 0.9, 0.95, 0.92, 0.91, 0.95, 0.96, 0.97, 0.5, 0.6, 0.7, 0.8, 0.9]
    # bad counts: -,0,1,2,3->reduce(0.5),1,2,3->reduce(0.25),0(new best),1,2,3->reduce (floor 0.25)
    want = [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    got = [r.step(x) for x in seq]
    assert got == want
    assert r.num_reductions == 2 and r.best == 0.5
    # round trip through JSON
    r2 = optim.ReduceOnPlateau(factor=0.5, patience=2, min_lr=0.25)
    r2.load_state_dict(json.loads(json.dumps(r.state_dict())))
    assert r2.state_dict() == r.state_dict()
    rmax = optim.ReduceOnPlateau(factor=0.1, patience=0, mode="max")
    assert [rmax.step(x) for x in [1.0, 2.0, 1.5]] == [1.0, 1.0, pytest.approx(0.1)]
    with pytest.raises(ValueError, match="mode"):
        optim.ReduceOnPlateau(mode="up")
    with pytest.raises(ValueError, match="factor"):
        optim.ReduceOnPlateau(factor=2.0)


@pytest.mark.reference
def test_reduce_on_plateau_matches_torch():
    torch = require_reference("torch")
    rng = np.random.default_rng(1)
    seq = list(np.cumsum(rng.normal(0.0, 1.0, size=60)) + 100.0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.2, patience=3, cooldown=1, min_lr=1e-3
    )
    ours = optim.ReduceOnPlateau(factor=0.2, patience=3, cooldown=1, min_lr=1e-3, base_lr=0.3)
    for x in seq:
        sched.step(x)
        ours.step(x)
        np.testing.assert_allclose(ours.lr, opt.param_groups[0]["lr"], rtol=1e-9)
    assert ours.num_reductions >= 2


def test_early_stopping_by_hand():
    e = optim.EarlyStopping(patience=3, mode="max", min_delta=0.01)
    seq = [0.5, 0.6, 0.605, 0.59, 0.7, 0.7, 0.69, 0.705, 0.8]
    # bad: -,0,1,2,0,1,2,3->stop
    got = [e.step(x) for x in seq[:8]]
    assert got == [False] * 7 + [True]
    assert e.should_stop and e.best == 0.7
    e2 = optim.EarlyStopping(patience=3, mode="max")
    e2.load_state_dict(json.loads(json.dumps(e.state_dict())))
    assert e2.should_stop and e2.best == 0.7
    with pytest.raises(ValueError, match="patience"):
        optim.EarlyStopping(patience=0)
