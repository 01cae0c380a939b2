"""Densely connected blocks: dense layers and blocks, transitions, and DenseASPP.

Channels-last ``(B, *S, C)``, 2D or 3D, with injected ``norm`` (a name or factory, see
:func:`medjax.nn.norm.make_norm`) and ``act``; every block takes ``train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.nn.blocks import ConvNormAct
from medjax.nn.layers import avg_pool, max_pool

__all__ = ["DenseASPP", "DenseBlock", "DenseLayer", "Transition"]

Dtype = Any


class DenseLayer(nn.Module):
    """Pre-activation dense layer: ``[x, new]`` with ``new`` = (norm-act-conv1^d ->) norm-act-conv k^d.

    ``(B, *S, C) -> (B, *S, C + growth)``. ``bottleneck`` (e.g. 4 * growth, DenseNet-BC) adds the
    1^d convolution first; ``dropout`` follows the last convolution. Submodules ``bottleneck`` and
    ``layer`` (:class:`~medjax.nn.blocks.ConvNormAct` with ``order="pre"``).
    """

    growth: int
    bottleneck: int | None = None
    kernel_size: int | Sequence[int] = 3
    norm: Any = "batch"
    act: Any = nn.relu
    dropout: float = 0.0
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = x
        if self.bottleneck:
            y = ConvNormAct(
                self.bottleneck,
                1,
                padding=0,
                use_bias=self.use_bias,
                norm=self.norm,
                act=self.act,
                order="pre",
                dtype=self.dtype,
                name="bottleneck",
            )(y, train)
        k = self.kernel_size
        ks = (k,) * (x.ndim - 2) if isinstance(k, int) else tuple(k)
        y = ConvNormAct(
            self.growth,
            ks,
            padding=tuple(kk // 2 for kk in ks),
            use_bias=self.use_bias,
            norm=self.norm,
            act=self.act,
            order="pre",
            dropout=self.dropout,
            dtype=self.dtype,
            name="layer",
        )(y, train)
        return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class DenseBlock(nn.Module):
    """A sequence of :class:`DenseLayer` s with growths ``growth_rates``: ``C -> C + sum(growth_rates)``.

    Layers are named ``layer_0``, ``layer_1``, ...
    """

    growth_rates: Sequence[int]
    bottleneck_factor: int | None = None
    kernel_size: int | Sequence[int] = 3
    norm: Any = "batch"
    act: Any = nn.relu
    dropout: float = 0.0
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, g in enumerate(self.growth_rates):
            x = DenseLayer(
                g,
                bottleneck=self.bottleneck_factor * g if self.bottleneck_factor else None,
                kernel_size=self.kernel_size,
                norm=self.norm,
                act=self.act,
                dropout=self.dropout,
                use_bias=self.use_bias,
                dtype=self.dtype,
                name=f"layer_{i}",
            )(x, train)
        return x


class Transition(nn.Module):
    """DenseNet transition: norm-act-conv1^d to ``features``, then a 2^d pooling (``avg``/``max``/None).

    ``(B, *S, C) -> (B, *S/2, features)``. Submodule ``conv`` (a pre-activation ConvNormAct).
    """

    features: int
    pool: str | None = "avg"
    norm: Any = "batch"
    act: Any = nn.relu
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvNormAct(
            self.features,
            1,
            padding=0,
            use_bias=self.use_bias,
            norm=self.norm,
            act=self.act,
            order="pre",
            dtype=self.dtype,
            name="conv",
        )(x, train)
        if self.pool == "avg":
            return avg_pool(x, 2)
        if self.pool == "max":
            return max_pool(x, 2)
        if self.pool is None:
            return x
        raise ValueError(f"pool: expected 'avg', 'max' or None, got {self.pool!r}")


class DenseASPP(nn.Module):
    """DenseASPP (Yang et al. 2018): densely connected dilated branches, ``C -> C + len(dilations) * growth``.

    Branch k: norm-act-conv1^d to ``mid_features`` then norm-act-conv3^d to ``growth`` with
    dilation ``dilations[k]`` (in-plane only, ``(1, d, d)``, when ``in_plane`` and 3D), each conv
    with a bias (FocusNetV2's ``DenseASPPBlock``). The branch reads every earlier output;
    ``new_first=True`` puts each new output before the features (``[a_k, ..., a_1, x]``, FocusNetV2's
    order), else after. Branches are named ``branch_0``, ... with ``reduce`` and ``conv`` inside.
    """

    dilations: Sequence[int] = (3, 6, 12, 18)
    mid_features: int = 64
    growth: int = 32
    in_plane: bool = True
    new_first: bool = True
    norm: Any = "batch"
    act: Any = nn.relu
    use_bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = x.ndim - 2
        feat = x
        for k, d in enumerate(self.dilations):
            dil = (1,) + (d,) * (n - 1) if (self.in_plane and n == 3) else (d,) * n
            y = _Branch(
                self.mid_features,
                self.growth,
                dil,
                self.norm,
                self.act,
                self.use_bias,
                self.dropout,
                self.dtype,
                name=f"branch_{k}",
            )(feat, train)
            y = y.astype(feat.dtype)
            feat = jnp.concatenate([y, feat] if self.new_first else [feat, y], axis=-1)
        return feat


class _Branch(nn.Module):
    mid_features: int
    growth: int
    dilation: tuple
    norm: Any
    act: Any
    use_bias: bool
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, train):
        y = ConvNormAct(
            self.mid_features,
            1,
            padding=0,
            use_bias=self.use_bias,
            norm=self.norm,
            act=self.act,
            order="pre",
            dtype=self.dtype,
            name="reduce",
        )(x, train)
        return ConvNormAct(
            self.growth,
            3,
            padding=self.dilation,
            dilation=self.dilation,
            use_bias=self.use_bias,
            norm=self.norm,
            act=self.act,
            order="pre",
            dropout=self.dropout,
            dtype=self.dtype,
            name="conv",
        )(y, train)
