"""Train-step builders and the one place where steps are jitted with explicit shardings.

Every builder returns a pure ``step(state, batch) -> (state, metrics)``. Per-step randomness is
``fold_in(state.rng, state.step)`` (then ``fold_in`` per phase), so a step is deterministic and a
resumed run draws the same keys as an uninterrupted one.
"""

from __future__ import annotations

import jax

from medjax.train.mesh import data_sharded, replicated
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
