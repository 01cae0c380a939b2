"""Optimisers (PyTorch-compatible), schedules, freezing, parameter clipping and host-side controllers.

Learning-rate control from the host (reduce-on-plateau) goes through an injected hyper-parameter
``lr_scale`` (``optax.inject_hyperparams``): changing it changes a value in ``opt_state`` only, so
the jitted step is not recompiled. See :func:`lr_scale`, :func:`set_lr_scale`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax

__all__ = [
    "constant",
    "warmup_cosine",
    "multistep",
    "step_decay",
    "make_schedule",
    "adam",
    "sgd",
    "rmsprop",
    "lr_scale",
    "set_lr_scale",
    "get_lr_scale",
    "frozen",
    "clip_params",
    "make_optimizer",
    "ReduceOnPlateau",
    "EarlyStopping",
]


# ---------------------------------------------------------------- schedules (step -> lr)


def constant(value):
    """Schedule ``step -> value``."""
    return optax.constant_schedule(float(value))


def warmup_cosine(peak_value, total_steps, *, warmup_steps=0, init_value=0.0, end_value=0.0):
    """Linear warm-up ``init_value -> peak_value`` over ``warmup_steps``, then cosine to ``end_value``.

    For ``warmup_steps <= t <= total_steps``: ``end + (peak - end) * (1 + cos(pi * (t - W) /
    (total - W))) / 2``; constant ``end_value`` after ``total_steps``.
    """
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps: expected > warmup_steps ({warmup_steps}), got {total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=float(init_value),
        peak_value=float(peak_value),
        warmup_steps=int(warmup_steps),
        decay_steps=int(total_steps),
        end_value=float(end_value),
    )


def multistep(base_value, boundaries, gamma=0.1):
    """PyTorch ``MultiStepLR``: ``base * gamma ** (number of boundaries <= step)``."""
    bounds = sorted(int(b) for b in boundaries)
    if any(b <= 0 for b in bounds):
        raise ValueError(f"boundaries: expected positive steps, got {list(boundaries)}")
    return optax.piecewise_constant_schedule(float(base_value), {b: float(gamma) for b in bounds})


def step_decay(base_value, every, factor):
    """Staircase decay ``base * factor ** floor(step / every)`` (e.g. x0.98 every 100 steps)."""
    if every <= 0:
        raise ValueError(f"every: expected a positive number of steps, got {every}")
    return optax.exponential_decay(
        float(base_value), transition_steps=int(every), decay_rate=float(factor), staircase=True
    )


def make_schedule(cfg, learning_rate):
    """Schedule from a config dict ``{"name": "constant"|"warmup_cosine"|"multistep"|"step_decay", ...}``."""
    cfg = dict(cfg or {})
    name = cfg.pop("name", "constant")
    if name == "constant":
        return constant(learning_rate)
    if name == "warmup_cosine":
        return warmup_cosine(learning_rate, **cfg)
    if name == "multistep":
        return multistep(learning_rate, **cfg)
    if name == "step_decay":
        return step_decay(learning_rate, **cfg)
    raise ValueError(
        f"schedule.name: expected one of constant, warmup_cosine, multistep, step_decay, got {name!r}"
    )


# ---------------------------------------------------------------- optimisers


def _with_decay(tx, weight_decay):
    if weight_decay:
        # PyTorch's (coupled) weight decay: g <- g + wd * p before the optimiser.
        return optax.chain(optax.add_decayed_weights(float(weight_decay)), tx)
    return tx


def adam(learning_rate, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """``torch.optim.Adam``: Adam with L2 weight decay added to the gradient (not AdamW)."""
    return _with_decay(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), weight_decay)


def sgd(learning_rate, *, momentum=0.0, weight_decay=0.0, nesterov=False):
    """``torch.optim.SGD`` (dampening 0): ``b = m b + (g + wd p)``; ``p -= lr b`` (first ``b = g``)."""
    return _with_decay(
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov), weight_decay
    )


def rmsprop(learning_rate, *, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
    """``torch.optim.RMSprop``: ``v = a v + (1-a) g^2``; ``p -= lr g / (sqrt(v) + eps)`` (eps outside)."""
    return _with_decay(
        optax.rmsprop(
            learning_rate,
            decay=alpha,
            eps=eps,
            eps_in_sqrt=False,
            initial_scale=0.0,
            centered=centered,
            momentum=momentum or None,
        ),
        weight_decay,
    )


def _scale_by_lr_scale(lr_scale):
    return optax.scale(lr_scale)


def lr_scale(initial=1.0):
    """Transformation multiplying updates by an injected ``lr_scale`` (host-settable, no recompile)."""
    return optax.inject_hyperparams(_scale_by_lr_scale)(lr_scale=float(initial))


_INJECT_STATES = tuple(
    t
    for t in (
        getattr(optax, "InjectHyperparamsState", None),
        getattr(optax, "InjectStatefulHyperparamsState", None),
    )
    if t is not None
)


def _is_inject_state(x):
    return isinstance(x, _INJECT_STATES)


def set_lr_scale(opt_state, value):
    """Return ``opt_state`` with every injected ``lr_scale`` set to ``value`` (same sharding)."""

    def setv(node):
        if _is_inject_state(node) and "lr_scale" in node.hyperparams:
            old = node.hyperparams["lr_scale"]
            new = np.asarray(value, dtype=old.dtype)
            if isinstance(old, jax.Array):
                new = jax.make_array_from_callback((), old.sharding, lambda idx: new[idx])
            return node._replace(hyperparams={**node.hyperparams, "lr_scale": new})
        return node

    return jax.tree_util.tree_map(setv, opt_state, is_leaf=_is_inject_state)


def get_lr_scale(opt_state):
    """The injected ``lr_scale`` value in ``opt_state`` (first found), or None when there is none."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_inject_state):
        if _is_inject_state(node) and "lr_scale" in node.hyperparams:
            return float(np.asarray(jax.device_get(node.hyperparams["lr_scale"])))
    return None


def frozen(tx, trainable):
    """Apply ``tx`` to trainable leaves only; frozen leaves get zero updates and keep no state.

    ``trainable``: a pytree of bools like params (True = trains) or a callable ``params -> tree``.
    Frozen leaves' optimiser state is absent (``optax.MaskedNode``), so it cannot move.
    """

    def labels(params):
        mask = trainable(params) if callable(trainable) else trainable
        return jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def clip_params(params, limit):
    """Clip every parameter to ``[-limit, limit]`` (WGAN critic), via ``optax.tree.clip``."""
    if limit is None:
        return params
    if not float(limit) > 0:
        raise ValueError(f"limit: expected a positive clip value, got {limit}")
    return optax.tree.clip(params, -limit, limit)


_OPTIMIZERS = {"adam": adam, "sgd": sgd, "rmsprop": rmsprop}


def make_optimizer(config):
    """Build ``chain([clip_by_global_norm], optimiser(schedule), lr_scale, [ema_params])`` from a config.

    Keys (dict or ``ConfigDict``): ``name`` (adam|sgd|rmsprop), ``learning_rate``, optional
    ``schedule`` (see :func:`make_schedule`), ``weight_decay``, ``momentum`` (sgd/rmsprop),
    ``b1``/``b2``/``eps``/``alpha``/``nesterov``/``centered``, ``grad_clip_norm``, ``ema_decay``,
    ``ema_warmup_steps`` (an int: linear ramp of the decay; or ``"mean_teacher"``:
    :func:`medjax.train.ema.mean_teacher_decay`), ``trainable`` (mask tree/callable for :func:`frozen`).
    """
    from medjax.train.ema import ema_params, mean_teacher_decay

    cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    name = cfg.pop("name", "adam")
    if name not in _OPTIMIZERS:
        raise ValueError(f"name: expected one of {sorted(_OPTIMIZERS)}, got {name!r}")
    if "learning_rate" not in cfg:
        raise ValueError("learning_rate: expected a value in the optimiser config, got none")
    lr = float(cfg.pop("learning_rate"))
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"learning_rate: expected a finite value >= 0, got {lr}")
    schedule = make_schedule(cfg.pop("schedule", None), lr)
    grad_clip = cfg.pop("grad_clip_norm", None)
    ema_decay = cfg.pop("ema_decay", None)
    ema_warmup = cfg.pop("ema_warmup_steps", 0) or 0
    trainable = cfg.pop("trainable", None)
    allowed = {
        "adam": {"b1", "b2", "eps", "weight_decay"},
        "sgd": {"momentum", "weight_decay", "nesterov"},
        "rmsprop": {"alpha", "eps", "weight_decay", "momentum", "centered"},
    }[name]
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"{name}: expected options among {sorted(allowed)}, got {sorted(unknown)}")
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(float(grad_clip)))
    parts += [_OPTIMIZERS[name](schedule, **cfg), lr_scale()]
    tx = optax.chain(*parts)
    if trainable is not None:
        tx = frozen(tx, trainable)
    if ema_decay is not None:
        if ema_warmup == "mean_teacher":
            ema = ema_params(mean_teacher_decay(float(ema_decay)))
        elif isinstance(ema_warmup, int | float) and not isinstance(ema_warmup, bool):
            ema = ema_params(float(ema_decay), warmup_steps=int(ema_warmup))
        else:
            raise ValueError(
                f"ema_warmup_steps: expected an int or 'mean_teacher', got {ema_warmup!r}"
            )
        tx = optax.chain(tx, ema)
    return tx


# ---------------------------------------------------------------- host-side controllers


class _Monitor:
    def __init__(self, mode, threshold, threshold_mode):
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}")
        self.mode, self.threshold, self.threshold_mode = mode, float(threshold), threshold_mode
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0

    def _better(self, x):
        t, best = self.threshold, self.best
        if self.mode == "min":
            return x < (best * (1 - t) if self.threshold_mode == "rel" else best - t)
        return x > (best * (1 + t) if self.threshold_mode == "rel" else best + t)

    def _observe(self, metric):
        x = float(metric)
        if math.isnan(x):
            raise ValueError(f"metric: expected a number, got {metric}")
        if self._better(x):
            self.best, self.num_bad = x, 0
            return True
        self.num_bad += 1
        return False


class ReduceOnPlateau(_Monitor):
    """Host-side ``torch.optim.lr_scheduler.ReduceLROnPlateau`` driven by a validation metric.

    ``step(metric)`` returns the current ``scale`` (multiplier of the base lr), lowered by ``factor``
    after more than ``patience`` evaluations without improvement (relative ``threshold``), never
    below ``min_lr / base_lr``. Apply it with ``set_lr_scale(state.opt_state, plateau.scale)``.
    """

    def __init__(
        self,
        factor=0.2,
        patience=30,
        mode="min",
        min_lr=0.0,
        *,
        base_lr=1.0,
        threshold=1e-4,
        threshold_mode="rel",
        cooldown=0,
    ):
        super().__init__(mode, threshold, threshold_mode)
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor: expected a value in (0, 1), got {factor}")
        if patience < 0:
            raise ValueError(f"patience: expected >= 0, got {patience}")
        if base_lr <= 0:
            raise ValueError(f"base_lr: expected > 0, got {base_lr}")
        self.factor, self.patience, self.cooldown = float(factor), int(patience), int(cooldown)
        self.min_scale = float(min_lr) / float(base_lr)
        self.base_lr = float(base_lr)
        self.scale = 1.0
        self.cooldown_counter = 0
        self.num_reductions = 0

    @property
    def lr(self):
        """Current learning rate ``base_lr * scale``."""
        return self.base_lr * self.scale

    def step(self, metric):
        """Record one validation value; return the (possibly reduced) lr scale."""
        self._observe(metric)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            new = max(self.scale * self.factor, self.min_scale)
            if self.scale - new > 1e-8 * max(self.scale, 1e-30):
                self.scale = new
                self.num_reductions += 1
            self.cooldown_counter = self.cooldown
            self.num_bad = 0
        return self.scale

    def state_dict(self):
        """JSON-serialisable state for checkpoints."""
        return {
            "best": self.best,
            "num_bad": self.num_bad,
            "scale": self.scale,
            "cooldown_counter": self.cooldown_counter,
            "num_reductions": self.num_reductions,
        }

    def load_state_dict(self, d):
        """Restore from :meth:`state_dict`."""
        self.best = float(d["best"])
        self.num_bad = int(d["num_bad"])
        self.scale = float(d["scale"])
        self.cooldown_counter = int(d["cooldown_counter"])
        self.num_reductions = int(d.get("num_reductions", 0))


class EarlyStopping(_Monitor):
    """Host-side early stopping on a validation metric.

    ``step(metric)`` returns True (and sets ``should_stop``) once ``patience`` consecutive values
    fail to improve on the best by more than ``min_delta`` (absolute).
    """

    def __init__(self, patience=50, mode="min", min_delta=0.0):
        super().__init__(mode, min_delta, "abs")
        if patience < 1:
            raise ValueError(f"patience: expected >= 1, got {patience}")
        self.patience = int(patience)
        self.should_stop = False

    def step(self, metric):
        """Record one validation value; return whether training should stop."""
        self.last_improved = self._observe(metric)
        if self.num_bad >= self.patience:
            self.should_stop = True
        return self.should_stop

    def state_dict(self):
        """JSON-serialisable state for checkpoints."""
        return {"best": self.best, "num_bad": self.num_bad, "should_stop": self.should_stop}

    def load_state_dict(self, d):
        """Restore from :meth:`state_dict`."""
        self.best = float(d["best"])
        self.num_bad = int(d["num_bad"])
        self.should_stop = bool(d["should_stop"])
