"""Exponential moving average of PARAMETERS, kept as optax state (teacher / weight-averaged copy)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["EmaParamsState", "ema_params", "ema_decay_at", "get_ema_params", "mean_teacher_decay"]


class EmaParamsState(NamedTuple):
    """State of :func:`ema_params`: ``count`` (int32 updates so far) and ``ema`` (the teacher params)."""

    count: jax.Array
    ema: Any


def ema_decay_at(count, decay, warmup_steps=0):
    """Decay used for the update after ``count`` earlier updates.

    ``decay`` is a float or a callable ``count -> decay``. With ``warmup_steps = W > 0`` it is
    ramped linearly: ``decay * min(1, count / W)``, so the first update copies the student.
    """
    count = jnp.asarray(count, jnp.float32)
    d = decay(count) if callable(decay) else jnp.asarray(decay, jnp.float32)
    if warmup_steps:
        d = d * jnp.minimum(1.0, count / float(warmup_steps))
    return d


def mean_teacher_decay(decay):
    """Decay schedule of Mean Teacher (Tarvainen & Valpola 2017), used by co-training teachers.

    Returns ``count -> min(decay, 1 - 1 / (count + 2))`` for :func:`ema_params`: the reference code
    updates with ``min(1 - 1 / (global_step + 1), decay)`` after incrementing ``global_step``, so the
    first update (``count = 0``) averages with weight 1/2 and the teacher is a true running mean of
    the students so far until ``decay`` takes over.
    """
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
    return lambda count: jnp.minimum(decay, 1.0 - 1.0 / (jnp.asarray(count, jnp.float32) + 2.0))


def ema_params(decay, *, warmup_steps=0, dtype=None):
    """Optax transformation keeping an EMA of the parameters AFTER each update; updates pass through.

    Place it LAST in an ``optax.chain`` (outside ``frozen``/``masked`` wrappers) and call ``update``
    with ``params``. After update ``t`` (``t = 0, 1, ...``):
    ``ema = d_t * ema + (1 - d_t) * (params + updates)`` with ``d_t = ema_decay_at(t, decay,
    warmup_steps)``; the initial ema is a copy of ``params``. Read it with :func:`get_ema_params`.
    ``decay`` may be a callable of the update count, e.g. :func:`mean_teacher_decay`.
    ``dtype`` optionally sets the teacher's dtype (default: the params' dtype).
    """
    if not callable(decay) and not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")

    def init_fn(params):
        ema = jax.tree_util.tree_map(
            lambda p: jnp.array(p, dtype=dtype or jnp.asarray(p).dtype), params
        )
        return EmaParamsState(count=jnp.zeros([], jnp.int32), ema=ema)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("params: ema_params needs the parameters in update(), got None")
        d = ema_decay_at(state.count, decay, warmup_steps)
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(
            lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, new_params
        )
        return updates, EmaParamsState(count=optax.safe_int32_increment(state.count), ema=ema)

    return optax.GradientTransformation(init_fn, update_fn)


def get_ema_params(opt_state, *, index=None):
    """Return the teacher params found anywhere inside ``opt_state`` (chained, nested, masked, injected).

    Raises ValueError when none is found, or when several are and ``index`` is None.
    """
    found = [
        leaf.ema
        for leaf in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, EmaParamsState)
        )
        if isinstance(leaf, EmaParamsState)
    ]
    if not found:
        raise ValueError(
            "opt_state: expected an ema_params state inside (add medjax.train.ema.ema_params to "
            "the optimiser chain), got none"
        )
    if index is None:
        if len(found) > 1:
            raise ValueError(
                f"opt_state: expected one ema_params state, got {len(found)}; pass index="
            )
        return found[0]
    return found[index]
