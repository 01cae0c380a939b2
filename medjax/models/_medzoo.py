"""Shared checks and the torch import step of the MedicalZoo ports (not public).

Every MedicalZoo network validates its input the same way (rank, channel count, spatial sizes) and
imports a torch ``state_dict`` the same way: read it, infer the settings the shapes fix, build the
spec, and :func:`medjax.models.torch_import.convert` against ``jax.eval_shape`` of ``init``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from medjax.models import torch_import


def check_input(name, x, *, ndim: int, channels: int, multiple: int = 1, min_size: int = 1):
    """Raise ``ValueError`` unless ``x`` is ``(B, *S, channels)`` with ``ndim`` spatial axes.

    Every spatial size must be a multiple of ``multiple`` and at least ``min_size``.
    """
    shape = tuple(x.shape)
    if len(shape) != ndim + 2:
        raise ValueError(
            f"x: {name} expects (B, {', '.join('DHW'[-ndim:])}, C) with {ndim} spatial axes, "
            f"got shape {shape}"
        )
    if shape[-1] != channels:
        raise ValueError(
            f"x: {name} was built for in_channels={channels}, got {shape[-1]} channels "
            f"(shape {shape})"
        )
    spatial = shape[1:-1]
    if any(s % multiple or s < min_size for s in spatial):
        rule = f"multiples of {multiple}" if multiple > 1 else "sizes"
        raise ValueError(
            f"x: {name} needs spatial {rule} of at least {max(min_size, multiple)}, got {spatial}"
        )
    return spatial


def weight_shape(sd: Mapping, key: str, name: str):
    """The shape of ``sd[key]``, or ``ValueError`` naming the key the network needs."""
    if key not in sd:
        raise ValueError(
            f"{name} checkpoint: missing key {key} (needed to infer the network's settings); "
            f"got keys {sorted(sd)[:5]} ..."
        )
    return tuple(sd[key].shape)


def load(
    model,
    state_dict,
    spec: list,
    example_shape: tuple,
    *,
    name: str,
):
    """Flax variables of ``model`` from a torch ``state_dict`` (already read) and ``spec``.

    The template is ``jax.eval_shape(model.init, ...)`` on an input of ``example_shape``, so
    nothing is computed and a mismatch of any key or shape raises ``ValueError``.
    """
    x = jax.ShapeDtypeStruct(example_shape, jnp.float32)
    template = jax.eval_shape(lambda k, a: model.init(k, a), jax.random.key(0), x)
    return torch_import.convert(state_dict, spec, template, name=name)


def read(state_dict):
    """``torch_import.read_state_dict`` (path, ``.npz`` or mapping; ``module.`` stripped)."""
    return torch_import.read_state_dict(state_dict)
