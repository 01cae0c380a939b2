"""Train-step builders and the one place where steps are jitted with explicit shardings.

Every builder returns a pure ``step(state, batch) -> (state, metrics)``. Per-step randomness is
``fold_in(state.rng, state.step)`` (then ``fold_in`` per phase), so a step is deterministic and a
resumed run draws the same keys as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.train.ema import get_ema_params
from medjax.train.mesh import data_sharded, replicated
from medjax.train.optim import clip_params
from medjax.train.state import TrainState

__all__ = [
    "compile_step",
    "supervised_step",
    "adversarial_step",
    "cotraining_step",
    "ramp_weight",
]


def compile_step(step_fn, mesh, *, donate=True):
    """Jit ``step_fn(state, batch) -> (state, metrics)`` once for ``mesh``.

    State in/out is replicated, the batch is split over ``"data"`` (leading axis), metrics are
    replicated; with ``donate`` the input state's buffers are reused (do not touch it afterwards).
    """
    if not callable(step_fn):
        raise ValueError(f"step_fn: expected a callable, got {type(step_fn).__name__}")
    rep = replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(rep, data_sharded(mesh)),
        out_shardings=rep,
        donate_argnums=(0,) if donate else (),
    )


def _check_state(state, name):
    if not isinstance(state, TrainState):
        raise ValueError(f"{name}: expected a medjax.train.TrainState, got {type(state).__name__}")


def _pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _step_key(state, phase, axis_name):
    key = state.step_rng(phase)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key


def supervised_step(loss_fn, *, axis_name=None):
    """Build a one-model step.

    ``loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))``; ``rng`` is
    a typed key. Returns ``step(state, batch) -> (state, {"loss": ..., **metrics})``.
    Under ``jax.pmap`` pass ``axis_name``: gradients, loss and metrics are ``pmean``-ed over it and
    the key also folds in the device index (BatchNorm must use the same ``axis_name``).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        _check_state(state, "state")
        rng = _step_key(state, 0, axis_name)
        with jax.named_scope("forward_backward"):
            (loss, (metrics, new_model_state)), grads = grad_fn(
                state.params, state.model_state, batch, rng
            )
        with jax.named_scope("update"):
            grads = _pmean(grads, axis_name)
            state = state.apply_gradients(grads, model_state=new_model_state)
        metrics = _pmean({**metrics, "loss": loss}, axis_name)
        return state, metrics

    return step


def _zeros_like_shape(tree):
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def adversarial_step(
    gen_loss_fn,
    critic_loss_fn,
    *,
    n_critic=1,
    clip=None,
    update_generator=True,
    critic_batch=None,
    axis_name=None,
):
    """Build a WGAN-style step for ``{"gen": TrainState, "critic": TrainState}``.

    Per call: ``n_critic`` critic updates (generator frozen), each followed by clipping the critic's
    params to ``[-clip, clip]`` (``clip=None``: no clipping), then one generator update against
    the updated (frozen) critic. Signatures:
    ``critic_loss_fn(critic_params, critic_model_state, gen_state, batch, rng)`` and
    ``gen_loss_fn(gen_params, gen_model_state, critic_state, batch, rng)``, each returning
    ``(loss, (metrics, new_model_state))``; the other model arrives as a TrainState whose params
    get no gradient.

    ``n_critic`` is an int, or a callable ``gen_step -> int`` evaluated INSIDE the jitted step on
    the generator's step counter (e.g. ``lambda s: 20 + s // 300``): the critic loop is a
    ``lax.fori_loop`` with a traced trip count, so a growing ``n_critic`` never recompiles.
    ``critic_batch(batch, i)`` optionally picks critic iteration ``i``'s batch (default: the whole
    batch, with a fresh key each iteration). ``update_generator=False`` gives a critic warm-up step.
    Metrics: ``critic/*`` (last critic iteration), ``gen/*``, ``n_critic`` and ``loss``.
    Under ``jax.pmap`` pass ``axis_name`` (as for :func:`supervised_step`).
    """
    if isinstance(n_critic, int) and n_critic < 0:
        raise ValueError(f"n_critic: expected >= 0, got {n_critic}")
    if clip is not None and not float(clip) > 0:
        raise ValueError(f"clip: expected a positive value or None, got {clip}")
    critic_grad = jax.value_and_grad(critic_loss_fn, has_aux=True)
    gen_grad = jax.value_and_grad(gen_loss_fn, has_aux=True)

    def critic_update(critic, gen, batch, i):
        b = batch if critic_batch is None else critic_batch(batch, i)
        rng = _step_key(critic, 1, axis_name)
        (loss, (metrics, new_ms)), grads = critic_grad(
            critic.params, critic.model_state, gen, b, rng
        )
        critic = critic.apply_gradients(_pmean(grads, axis_name), model_state=new_ms)
        critic = critic.replace(params=clip_params(critic.params, clip))
        return critic, _pmean({**metrics, "loss": loss}, axis_name)

    def step(state, batch):
        gen, critic = state["gen"], state["critic"]
        _check_state(gen, "state['gen']")
        _check_state(critic, "state['critic']")
        n = n_critic(gen.step) if callable(n_critic) else n_critic
        n = jnp.asarray(n, jnp.int32)
        frozen_gen = gen.replace(params=jax.lax.stop_gradient(gen.params))
        with jax.named_scope("critic"):
            shapes = jax.eval_shape(lambda c: critic_update(c, frozen_gen, batch, 0)[1], critic)

            def body(i, carry):
                return critic_update(carry[0], frozen_gen, batch, i)

            critic, c_metrics = jax.lax.fori_loop(0, n, body, (critic, _zeros_like_shape(shapes)))
        metrics = {f"critic/{k}": v for k, v in c_metrics.items()}
        metrics["n_critic"] = n
        if update_generator:
            frozen_critic = critic.replace(params=jax.lax.stop_gradient(critic.params))
            with jax.named_scope("generator"):
                rng = _step_key(gen, 2, axis_name)
                (g_loss, (g_metrics, new_ms)), grads = gen_grad(
                    gen.params, gen.model_state, frozen_critic, batch, rng
                )
                gen = gen.apply_gradients(_pmean(grads, axis_name), model_state=new_ms)
                g_metrics, g_loss = _pmean((g_metrics, g_loss), axis_name)
            metrics.update({f"gen/{k}": v for k, v in g_metrics.items()})
            metrics["gen/loss"] = g_loss
            metrics["loss"] = g_loss
        else:
            metrics["loss"] = c_metrics["loss"]
        return {**state, "gen": gen, "critic": critic}, metrics

    return step


def ramp_weight(step, *, max_weight=1.0, ramp_steps, kind="sigmoid"):
    """Ramp-up weight at ``step`` with ``p = clip(step / ramp_steps, 0, 1)``.

    ``kind``: ``"sigmoid"`` ``max * (2 / (1 + exp(-10 p)) - 1)`` (co-training reimplementation),
    ``"exp"`` ``max * exp(-5 (1 - p)^2)`` (mean teacher), ``"linear"`` ``max * p``. Scalar float32.
    """
    if ramp_steps <= 0:
        raise ValueError(f"ramp_steps: expected > 0, got {ramp_steps}")
    p = jnp.clip(jnp.asarray(step, jnp.float32) / float(ramp_steps), 0.0, 1.0)
    if kind == "sigmoid":
        r = 2.0 / (1.0 + jnp.exp(-10.0 * p)) - 1.0
    elif kind == "exp":
        r = jnp.exp(-5.0 * (1.0 - p) ** 2)
    elif kind == "linear":
        r = p
    else:
        raise ValueError(f"kind: expected 'sigmoid', 'exp' or 'linear', got {kind!r}")
    return (max_weight * r).astype(jnp.float32)


def cotraining_step(loss_fn, *, weight=1.0, axis_name=None):
    """Build a co-training step for ``{"a": TrainState, "b": TrainState}`` (Huang et al. 2020).

    Each model's ``tx`` must end with :func:`medjax.train.ema.ema_params` (its own EMA teacher).
    ``loss_fn(params, model_state, teacher, batch, rng, weight) -> (loss, (metrics,
    new_model_state))``, where ``teacher`` is the OTHER model's TrainState with its params replaced
    by its EMA params (no gradient; use ``teacher.apply_fn(teacher.variables(), ...)``).
    ``weight`` is a float or ``callable(step) -> weight`` (e.g. a :func:`ramp_weight` partial) of
    model a's step. Both models update from the teachers as they were before this step.
    Metrics: ``a/*``, ``b/*``, ``weight`` and ``loss`` (the mean of both losses).
    Under ``jax.pmap`` pass ``axis_name`` (as for :func:`supervised_step`).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        a, b = state["a"], state["b"]
        _check_state(a, "state['a']")
        _check_state(b, "state['b']")
        w = weight(a.step) if callable(weight) else weight
        w = jnp.asarray(w, jnp.float32)
        teachers = {}
        for name, st in (("a", a), ("b", b)):
            ema = jax.lax.stop_gradient(get_ema_params(st.opt_state))
            teachers[name] = st.replace(params=ema)
        new, metrics = {}, {"weight": w}
        for i, (name, other) in enumerate((("a", "b"), ("b", "a"))):
            st = state[name]
            with jax.named_scope(f"model_{name}"):
                rng = _step_key(st, 10 + i, axis_name)
                (loss, (m, new_ms)), grads = grad_fn(
                    st.params, st.model_state, teachers[other], batch, rng, w
                )
                new[name] = st.apply_gradients(_pmean(grads, axis_name), model_state=new_ms)
                m, loss = _pmean((m, loss), axis_name)
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
            metrics[f"{name}/loss"] = loss
        metrics["loss"] = 0.5 * (metrics["a/loss"] + metrics["b/loss"])
        return {**state, **new}, metrics

    return step
