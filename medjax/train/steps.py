"""Train-step builders and the one place where steps are jitted with explicit shardings.

Every builder returns a pure ``step(state, batch) -> (state, metrics)``. Per-step randomness is
``fold_in(state.rng, state.step)`` (then ``fold_in`` per phase), so a step is deterministic and a
resumed run draws the same keys as an uninterrupted one.

The state may hold more than the networks a step trains (a frozen source segmenter, a pre-trained
shape autoencoder, a teacher): every loss receives the **rest of the state** as its last argument
``rest`` (a dict of the entries the step does not update, gradients stopped), so frozen networks
reach the loss as arguments of the compiled step, never as constants baked into it.

Every step also reports the global norms of its gradients, parameters and updates
(``grad_norm``, ``param_norm``, ``update_norm``; prefixed per network in the adversarial and
co-training steps): adversarial training is diagnosed by them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medjax.nn.conv import canonical_gradients
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


def _rest(state, exclude):
    """The entries of a dict state that a step does not update, with gradients stopped."""
    if not isinstance(state, dict):
        return {}
    return jax.lax.stop_gradient({k: v for k, v in state.items() if k not in exclude})


def _norms(old, new, grads):
    """Global norms of ``grads``, of the new params and of the update ``new - old``."""
    return {
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new.params),
        "update_norm": optax.tree.norm(jax.tree.map(lambda a, b: b - a, old.params, new.params)),
    }


def _step_key(state, phase, axis_name):
    key = state.step_rng(phase)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key


def supervised_step(loss_fn, *, key=None, axis_name=None):
    """Build a one-model step.

    ``loss_fn(params, model_state, batch, rng, rest) -> (loss, (metrics, new_model_state))``;
    ``rng`` is a typed key. The state is a TrainState (``key=None``; ``rest`` is ``{}``) or a dict
    of them whose entry ``key`` is trained while the others reach the loss as ``rest``
    (unchanged, gradients stopped). Returns ``step(state, batch) -> (state, {"loss", "grad_norm",
    "param_norm", "update_norm", **metrics})``.
    Under ``jax.pmap`` pass ``axis_name``: gradients, loss and metrics are ``pmean``-ed over it and
    the key also folds in the device index (BatchNorm must use the same ``axis_name``).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        if key is None:
            st, rest = state, {}
            _check_state(st, "state")
        else:
            if not isinstance(state, dict) or key not in state:
                raise ValueError(
                    f"state: expected a dict with entry {key!r}, got {type(state).__name__}"
                )
            st, rest = state[key], _rest(state, (key,))
            _check_state(st, f"state[{key!r}]")
        rng = _step_key(st, 0, axis_name)
        with jax.named_scope("forward_backward"):
            (loss, (metrics, new_model_state)), grads = grad_fn(
                st.params, st.model_state, batch, rng, rest
            )
        with jax.named_scope("update"):
            grads = _pmean(grads, axis_name)
            new = st.apply_gradients(grads, model_state=new_model_state)
        metrics = _pmean({**metrics, "loss": loss}, axis_name)
        metrics.update(_norms(st, new, grads))
        return (new if key is None else {**state, key: new}), metrics

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
    critic_features=None,
    gen="gen",
    critic="critic",
    axis_name=None,
):
    """Build a WGAN-style step for a dict state holding TrainStates ``state[gen]`` and ``state[critic]``.

    Per call: ``n_critic`` critic updates (generator frozen), each followed by clipping the critic's
    params to ``[-clip, clip]`` (``clip=None``: no clipping; ``clip`` may also be a callable
    ``params -> params``, e.g. one that clips only the conv kernels), then one generator update
    against the updated (frozen) critic. Signatures:
    ``critic_loss_fn(critic_params, critic_model_state, gen_state, batch, rng, rest)`` and
    ``gen_loss_fn(gen_params, gen_model_state, critic_state, batch, rng, rest)``, each returning
    ``(loss, (metrics, new_model_state))``; the other model arrives as a TrainState whose params
    get no gradient, and ``rest`` holds the state's other entries (e.g. a frozen segmenter).

    ``n_critic`` is an int, or a callable ``gen_step -> int`` evaluated INSIDE the jitted step on
    the generator's step counter (e.g. ``lambda s: 20 + s // 300``): the critic loop is a
    ``lax.fori_loop`` with a traced trip count, so a growing ``n_critic`` never recompiles.
    ``critic_batch(batch, i)`` optionally picks critic iteration ``i``'s batch (default: the whole
    batch, with a fresh key each iteration). ``critic_features(gen_state, batch, rng, rest) ->
    critic batch`` (optional) runs ONCE per step before the critic loop, with the generator frozen
    (e.g. the generator's feature maps of both domains, which no critic update changes); the critic
    updates then receive its output (gradients stopped; ``critic_batch`` picks from it) instead of
    ``batch``, so the generator's forward pass is not repeated for every critic update. The
    generator update still receives ``batch``. The critic loop's body is traced inside
    :func:`medjax.nn.conv.canonical_gradients` (on CPU, gradient convolutions in a loop body are
    otherwise many times slower). ``update_generator=False`` gives a critic warm-up step.
    Metrics: ``critic/*`` (last critic iteration, with its norms), ``gen/*`` (with norms),
    ``n_critic`` and ``loss``. Under ``jax.pmap`` pass ``axis_name`` (as for :func:`supervised_step`).
    """
    if isinstance(n_critic, int) and n_critic < 0:
        raise ValueError(f"n_critic: expected >= 0, got {n_critic}")
    if clip is not None and not callable(clip) and not float(clip) > 0:
        raise ValueError(f"clip: expected a positive value, a callable or None, got {clip}")
    clip_fn = clip if callable(clip) else (lambda p: clip_params(p, clip))
    critic_grad = jax.value_and_grad(critic_loss_fn, has_aux=True)
    gen_grad = jax.value_and_grad(gen_loss_fn, has_aux=True)

    def critic_update(c, g, batch, i, rest):
        b = batch if critic_batch is None else critic_batch(batch, i)
        rng = _step_key(c, 1, axis_name)
        (loss, (metrics, new_ms)), grads = critic_grad(c.params, c.model_state, g, b, rng, rest)
        grads = _pmean(grads, axis_name)
        new = c.apply_gradients(grads, model_state=new_ms)
        new = new.replace(params=clip_fn(new.params))
        metrics = _pmean({**metrics, "loss": loss}, axis_name)
        return new, {**metrics, **_norms(c, new, grads)}

    def step(state, batch):
        if not isinstance(state, dict) or gen not in state or critic not in state:
            raise ValueError(
                f"state: expected a dict with entries {gen!r} and {critic!r}, got "
                f"{sorted(state) if isinstance(state, dict) else type(state).__name__}"
            )
        g, c = state[gen], state[critic]
        _check_state(g, f"state[{gen!r}]")
        _check_state(c, f"state[{critic!r}]")
        rest = _rest(state, (gen, critic))
        n = n_critic(g.step) if callable(n_critic) else n_critic
        n = jnp.asarray(n, jnp.int32)
        frozen_gen = g.replace(params=jax.lax.stop_gradient(g.params))
        c_batch = batch
        if critic_features is not None:
            with jax.named_scope("critic_features"):
                key = _step_key(g, 3, axis_name)
                c_batch = jax.lax.stop_gradient(critic_features(frozen_gen, batch, key, rest))
        with jax.named_scope("critic"):
            shapes = jax.eval_shape(
                lambda cc: critic_update(cc, frozen_gen, c_batch, 0, rest)[1], c
            )

            def body(i, carry):
                return critic_update(carry[0], frozen_gen, c_batch, i, rest)

            # The loop body is traced with loop-friendly convolution gradients: XLA:CPU runs the
            # gradient convolutions of a loop body 16-25x slower otherwise (medjax.nn.conv).
            with canonical_gradients():
                c, c_metrics = jax.lax.fori_loop(0, n, body, (c, _zeros_like_shape(shapes)))
        metrics = {f"critic/{k}": v for k, v in c_metrics.items()}
        metrics["n_critic"] = n
        if update_generator:
            frozen_critic = c.replace(params=jax.lax.stop_gradient(c.params))
            with jax.named_scope("generator"):
                rng = _step_key(g, 2, axis_name)
                (g_loss, (g_metrics, new_ms)), grads = gen_grad(
                    g.params, g.model_state, frozen_critic, batch, rng, rest
                )
                grads = _pmean(grads, axis_name)
                new_g = g.apply_gradients(grads, model_state=new_ms)
                g_metrics, g_loss = _pmean((g_metrics, g_loss), axis_name)
            metrics.update({f"gen/{k}": v for k, v in g_metrics.items()})
            metrics.update({f"gen/{k}": v for k, v in _norms(g, new_g, grads).items()})
            metrics["gen/loss"] = g_loss
            metrics["loss"] = g_loss
            g = new_g
        else:
            metrics["loss"] = c_metrics["loss"]
        return {**state, gen: g, critic: c}, metrics

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


def cotraining_step(loss_fn, *, weight=1.0, models=("a", "b"), axis_name=None):
    """Build a co-training step for a dict state with TrainStates ``state[a]``, ``state[b]`` (Huang et al. 2020).

    Each model's ``tx`` must end with :func:`medjax.train.ema.ema_params` (its own EMA teacher).
    ``loss_fn(params, model_state, teacher, batch, rng, weight, rest) -> (loss, (metrics,
    new_model_state))``, where ``teacher`` is the OTHER model's TrainState with its params replaced
    by its EMA params (no gradient; use ``teacher.apply_fn(teacher.variables(), ...)``) and
    ``rest`` the state's other entries. ``weight`` is a float or ``callable(step) -> weight`` (e.g.
    a :func:`ramp_weight` partial) of model a's step. Both models update from the teachers as they
    were before this step. Metrics: ``a/*``, ``b/*`` (with norms), ``weight`` and ``loss`` (the
    mean of both losses). Under ``jax.pmap`` pass ``axis_name`` (as for :func:`supervised_step`).

    ``models=("net",)`` (one name) is self-teaching, the baseline co-training is compared with
    (Mean Teacher, or self-training with an EMA teacher): the model's ``teacher`` is its OWN EMA.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    models = tuple(models)
    if len(models) not in (1, 2) or len(set(models)) != len(models):
        raise ValueError(
            f"models: expected two different entry names (or one, for self-teaching), got {models!r}"
        )
    na, nb = models if len(models) == 2 else models * 2
    pairs = ((na, nb), (nb, na)) if len(models) == 2 else ((na, na),)

    def step(state, batch):
        if not isinstance(state, dict) or any(m not in state for m in models):
            raise ValueError(
                f"state: expected a dict with entries {' and '.join(map(repr, models))}"
            )
        for name in models:
            _check_state(state[name], f"state[{name!r}]")
        rest = _rest(state, models)
        w = weight(state[na].step) if callable(weight) else weight
        w = jnp.asarray(w, jnp.float32)
        teachers = {}
        for name in models:
            st = state[name]
            ema = jax.lax.stop_gradient(get_ema_params(st.opt_state))
            teachers[name] = st.replace(params=ema)
        new, metrics = {}, {"weight": w}
        for i, (name, other) in enumerate(pairs):
            st = state[name]
            with jax.named_scope(f"model_{name}"):
                rng = _step_key(st, 10 + i, axis_name)
                (loss, (m, new_ms)), grads = grad_fn(
                    st.params, st.model_state, teachers[other], batch, rng, w, rest
                )
                grads = _pmean(grads, axis_name)
                new[name] = st.apply_gradients(grads, model_state=new_ms)
                m, loss = _pmean((m, loss), axis_name)
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
            metrics.update({f"{name}/{k}": v for k, v in _norms(st, new[name], grads).items()})
            metrics[f"{name}/loss"] = loss
        metrics["loss"] = sum(metrics[f"{name}/loss"] for name in models) / len(models)
        return {**state, **new}, metrics

    return step
