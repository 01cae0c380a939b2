"""Shared checks and the torch import step of the MedicalZoo ports (not public).

Every MedicalZoo network validates its input the same way (rank, channel count, spatial sizes) and
imports a torch ``state_dict`` the same way: read it, infer the settings the shapes fix, build the
spec, and :func:`medjax.models.torch_import.convert` against ``jax.eval_shape`` of ``init``.

:class:`DenseBlock` is the dense block of SkipDenseNet3D and DenseVoxelNet, whose dense layer
(an ``nn.Sequential`` subclass) registers its ``drop_layer`` as a child, so that the Sequential's
own forward already applies it and the layer's ``forward`` applies it a second time: in training
the new features go through two independent dropouts (zeroed with probability ``1 - (1 - p)^2``,
the survivors scaled by ``1 / (1 - p)^2``). ``dropout_twice=False`` applies it once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import torch_import
from medjax.nn.blocks import ConvNormAct
from medjax.nn.layers import Dropout
from medjax.nn.norm import BatchNorm


def batch_norm(axis_name: str | None = None):
    """The BatchNorm of the zoo's blocks: ``"batch"``, or synchronised over ``axis_name`` (pmap).

    ``axis_name=None`` gives the name ``"batch"`` itself, so that a network built without it is
    exactly the network it was (same modules, same parameter tree).
    """
    return "batch" if axis_name is None else functools.partial(BatchNorm, axis_name=axis_name)


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


def load(model, state_dict, spec: list, example_shape: tuple, *, name=None, ignore_prefixes=()):
    """Flax variables of ``model`` from a torch ``state_dict`` (already read) and ``spec``.

    The template is ``jax.eval_shape(model.init, ...)`` on an input of ``example_shape``, so
    nothing is computed and a mismatch of any key or shape raises ``ValueError`` naming the torch
    key. ``ignore_prefixes`` drops the keys of submodules the original defines but never calls.
    """
    x = jax.ShapeDtypeStruct(tuple(example_shape), jnp.float32)
    template = jax.eval_shape(lambda k, a: model.init(k, a), jax.random.key(0), x)
    return torch_import.convert(
        state_dict,
        spec,
        template,
        name=name or type(model).__name__,
        ignore_prefixes=ignore_prefixes,
    )


def read(state_dict):
    """``torch_import.read_state_dict`` (path, ``.npz`` or mapping; ``module.`` stripped)."""
    return torch_import.read_state_dict(state_dict)


class _DenseLayer(nn.Module):
    growth: int
    bottleneck: int | None
    drop_rate: float
    dropout_twice: bool
    dtype: Any
    norm: Any = "batch"

    @nn.compact
    def __call__(self, x, train):
        y = x
        if self.bottleneck:
            y = ConvNormAct(
                self.bottleneck,
                1,
                padding=0,
                norm=self.norm,
                order="pre",
                dtype=self.dtype,
                name="bottleneck",
            )(y, train)
        y = ConvNormAct(
            self.growth,
            3,
            padding=1,
            norm=self.norm,
            order="pre",
            dropout=self.drop_rate,
            dtype=self.dtype,
            name="layer",
        )(y, train)
        if self.dropout_twice:
            y = Dropout(self.drop_rate, name="drop_layer")(y, train)
        return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers ``layer_j``: ``C -> C + num_layers * growth`` (module docstring).

    Each layer: (BN, ReLU, 1^3 conv to ``bottleneck`` ->) BN, ReLU, 3^3 conv to ``growth`` (no
    biases), dropout ``drop_rate`` (twice when ``dropout_twice``), then ``[x, new]``. Children
    ``bottleneck`` and ``layer`` (:class:`~medjax.nn.blocks.ConvNormAct`, pre-activation), named
    as :class:`medjax.nn.dense.DenseBlock` names them. ``norm``: BatchNorm by default
    (:func:`batch_norm` for a synchronised one).
    """

    num_layers: int
    growth: int
    bottleneck: int | None = None
    drop_rate: float = 0.0
    dropout_twice: bool = True
    dtype: Any = jnp.float32
    norm: Any = "batch"

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j in range(self.num_layers):
            x = _DenseLayer(
                self.growth,
                self.bottleneck,
                self.drop_rate,
                self.dropout_twice,
                self.dtype,
                self.norm,
                name=f"layer_{j}",
            )(x, train)
        return x
