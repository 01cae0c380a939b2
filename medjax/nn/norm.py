"""Normalisation layers with PyTorch's (and TensorFlow's) semantics, chosen by name or injected.

Every norm here is a linen module called as ``norm(x, train=...)`` on channels-last ``(B, *S, C)``,
so that a block can take ``norm`` as a field (a name such as ``"batch"`` or a ``functools.partial``
of a class, as the Flax examples inject ``norm``) and call it the same way whatever it is:

- :class:`BatchNorm`: batch statistics in training, running statistics in evaluation, kept in the
  ``"batch_stats"`` collection (``mean``, ``var``). ``momentum`` follows Flax's convention
  (``running = momentum * running + (1 - momentum) * batch``, so torch's ``momentum=0.1`` is 0.9
  here and TensorFlow's ``decay=0.9`` is 0.9). ``unbiased_running_var`` (True, as torch) updates
  the running variance with the unbiased batch variance; normalisation always uses the biased one.
  ``axis_name`` averages the statistics over a ``pmap``/``shard_map`` axis (synchronised BN).
- :class:`InstanceNorm`: per sample and channel over space, biased variance, in training and
  evaluation alike (torch's ``InstanceNorm3d`` defaults: ``affine=False``, no running statistics).
- :class:`GroupNorm`: contiguous groups of channels (torch's ``GroupNorm``).
- :class:`NoNorm`: the identity.

:func:`make_norm` turns a name (``"batch"``/``"bn"``, ``"instance"``/``"in"``, ``"group"``/``"gn"``,
``"none"``) or a module class/partial into a factory ``norm(name=...) -> module``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "NoNorm", "NORMS", "make_norm"]

Dtype = Any


def _check_input(name, x, min_ndim=3):
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected an input (B, *S, C) with at least one spatial axis, got shape {x.shape}"
        )


class BatchNorm(nn.Module):
    """Batch normalisation over every axis but the last: ``(B, *S, C) -> (B, *S, C)``.

    Parameters ``scale`` (ones) and ``bias`` (zeros) when ``use_scale``/``use_bias``; running
    statistics ``batch_stats/mean`` (zeros) and ``batch_stats/var`` (ones). ``train=True`` uses and
    updates batch statistics (call ``apply`` with ``mutable=["batch_stats"]``); ``train=False`` uses
    the running ones. Computation is in float32 whatever ``dtype`` (the output dtype) is.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    unbiased_running_var: bool = True
    axis_name: str | None = None
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_input("x", x, 2)
        c = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        mean_v = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var_v = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(xf, axes)
            mean_sq = jnp.mean(jnp.square(xf), axes)
            n = jnp.asarray(xf.size // c, jnp.float32)
            if self.axis_name is not None and not self.is_initializing():
                mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
                n = n * jax.lax.psum(1.0, self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
            if not self.is_initializing():
                running = var * n / jnp.maximum(n - 1.0, 1.0) if self.unbiased_running_var else var
                m = self.momentum
                mean_v.value = m * mean_v.value + (1.0 - m) * mean
                var_v.value = m * var_v.value + (1.0 - m) * running
        else:
            mean, var = mean_v.value, var_v.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return y.astype(self.dtype or x.dtype)


class InstanceNorm(nn.Module):
    """Instance normalisation: each (sample, channel) over its spatial axes, biased variance.

    ``affine=True`` adds ``scale``/``bias`` parameters per channel. Raises ``ValueError`` on one
    spatial element (the variance is undefined; torch raises too). ``train`` is accepted and ignored.
    """

    epsilon: float = 1e-5
    affine: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        _check_input("x", x)
        spatial = x.shape[1:-1]
        if math.prod(spatial) <= 1:
            raise ValueError(
                f"x: expected more than 1 spatial element per channel for instance norm, "
                f"got spatial shape {tuple(spatial)} (the input is too small for this network)"
            )
        c = x.shape[-1]
        axes = tuple(range(1, x.ndim - 1))
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return y.astype(self.dtype or x.dtype)


class GroupNorm(nn.Module):
    """Group normalisation over contiguous blocks of ``C / num_groups`` channels and all space.

    Parameters ``scale``/``bias`` per channel when ``affine``. ``train`` is accepted and ignored.
    """

    num_groups: int = 8
    epsilon: float = 1e-5
    affine: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        _check_input("x", x)
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(
                f"x: expected channels divisible by num_groups={self.num_groups}, got {c} channels"
            )
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (g, c // g))
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = jnp.mean(xf, axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return y.astype(self.dtype or x.dtype)


class NoNorm(nn.Module):
    """The identity, with the norm call signature ``(x, train=False)``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return x


NORMS = {
    "batch": BatchNorm,
    "bn": BatchNorm,
    "instance": InstanceNorm,
    "in": InstanceNorm,
    "group": GroupNorm,
    "gn": GroupNorm,
    "none": NoNorm,
}


def make_norm(norm: str | Callable | None, **kwargs) -> Callable[..., nn.Module]:
    """A norm factory ``f(name=None) -> module`` from a name in :data:`NORMS`, a class/partial or None.

    ``kwargs`` are bound as defaults (a name's class, or a partial's). ``None`` means ``"none"``.
    Unknown names raise ``ValueError`` listing the known ones.
    """
    if norm is None:
        norm = "none"
    if isinstance(norm, str):
        key = norm.lower()
        if key not in NORMS:
            raise ValueError(
                f"norm: expected one of {sorted(NORMS)} or a module class, got {norm!r}"
            )
        cls = NORMS[key]
        return functools.partial(cls, **kwargs) if kwargs else cls
    if not callable(norm):
        raise ValueError(f"norm: expected a name or a callable module factory, got {norm!r}")
    return functools.partial(norm, **kwargs) if kwargs else norm
