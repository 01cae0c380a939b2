"""Training state: parameters, model state (e.g. BatchNorm statistics), optimiser state and RNG."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState", "as_raw_key"]


def as_raw_key(rng, *, name="rng"):
    """Return ``rng`` as a raw ``uint32[2]`` PRNG key (accepts typed keys, raw keys or an int seed)."""
    if isinstance(rng, int):
        return jax.random.key_data(jax.random.key(rng))
    if hasattr(rng, "dtype") and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    rng = jnp.asarray(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(
            f"{name}: expected a PRNG key (uint32 array of shape (2,), a typed key or an int seed), "
            f"got dtype {rng.dtype} and shape {rng.shape}"
        )
    return rng


@struct.dataclass
class TrainState:
    """One model's training state, a pytree.

    Fields: ``step`` (int32 scalar), ``params``, ``model_state`` (dict of non-trainable collections,
    e.g. ``{"batch_stats": ...}``; ``{}`` when none), ``opt_state`` and ``rng`` (raw ``uint32[2]`` key,
    constant over training: per-step keys come from :meth:`step_rng`). ``apply_fn`` and ``tx`` are
    static (not pytree leaves). Several models are a dict of named TrainStates.
    """

    step: jax.Array
    params: Any
    model_state: dict
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, apply_fn, params, tx, rng, model_state=None):
        """Build a state at step 0 with ``tx.init(params)`` as optimiser state."""
        if not isinstance(tx, optax.GradientTransformation):
            raise ValueError(
                f"tx: expected an optax.GradientTransformation, got {type(tx).__name__}"
            )
        if model_state is None:
            model_state = {}
        if not isinstance(model_state, dict):
            raise ValueError(
                f"model_state: expected a dict of variable collections, got {type(model_state).__name__}"
            )
        model_state = dict(model_state)
        if "params" in model_state:
            raise ValueError("model_state: expected no 'params' collection, got one")
        return cls(
            step=jnp.asarray(0, jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            rng=as_raw_key(rng),
            apply_fn=apply_fn,
            tx=tx,
        )

    def apply_gradients(self, grads, **changes):
        """Return the state after one optimiser update with ``grads`` (same tree as params); step + 1.

        ``changes`` replace other fields at the same time (e.g. ``model_state=new_batch_stats``).
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

    def variables(self, params=None):
        """Flax variables dict ``{"params": params, **model_state}`` (``params`` defaults to ours)."""
        return {"params": self.params if params is None else params, **self.model_state}

    def step_rng(self, *names):
        """Per-step key: ``fold_in(rng, step)``, then ``fold_in`` each extra int ``name``; deterministic."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        for n in names:
            key = jax.random.fold_in(key, n)
        return key
