"""Primitive layers with the semantics of the originals: convolutions, activations, dropout, resampling.

All layers are channels-last ``(B, *S, C)`` and work for 1, 2 or 3 spatial axes (the kernel rank
follows the input). Convolutions route through :func:`medjax.nn.conv.conv_general_dilated`, so the
CPU lowering of small-channel and patch convolutions applies to every network built from them.

- :class:`Conv`: padding ``"SAME"``, ``"VALID"``, ``"SYMMETRIC"`` (TensorFlow's edge-including mirror
  pad of ``dilation * (k // 2)`` then a valid convolution), an int or per-axis ints (torch's
  symmetric zero padding) or per-axis ``(low, high)`` pairs; dilation; groups.
- :class:`ConvTranspose`: torch's ``ConvTranspose{2,3}d`` (output ``(i - 1) s - 2 p + d (k - 1) +
  op + 1``, groups), with the kernel stored as torch's weight moved to ``(*K, C_in, C_out / groups)``.
- :class:`PReLU` (one slope, or one per channel, initialised at 0.25 as torch), :func:`leaky_relu`
  partials, :class:`Dropout` (element or channel dropout, torch's ``Dropout3d``).
- :func:`upsample` / :class:`Upsample`: nearest (integer factors, torch's ``mode="nearest"``) and
  (bi/tri)linear with or without ``align_corners``; :func:`max_pool` / :func:`avg_pool` with torch
  padding (max pools pad with -inf).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medjax.nn import conv as _conv
from medjax.ops.resize import resize as _resize_fn

__all__ = [
    "Conv",
    "ConvTranspose",
    "Dropout",
    "PReLU",
    "Upsample",
    "apply_act",
    "avg_pool",
    "leaky_relu",
    "max_pool",
    "upsample",
]

Dtype = Any


def _tuple(name, value, n):
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(
            f"{name}: expected an int or {n} values (one per spatial axis), got {value}"
        )
    return value


def _spatial_ndim(x, name="x"):
    if x.ndim < 3:
        raise ValueError(
            f"{name}: expected (B, *S, C) with at least one spatial axis, got {x.shape}"
        )
    return x.ndim - 2


def _dimension_numbers(n):
    spatial = "DHWXYZUV"[:n]  # any letters but N, C, I, O
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def _padding(padding, kernel, strides, dilation):
    """lax padding for a Conv ``padding`` field; ``"SAME"`` where torch's padding equals it."""
    n = len(kernel)
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID"):
            raise ValueError(
                f"padding: expected 'SAME', 'VALID', 'SYMMETRIC', ints or pairs, got {padding!r}"
            )
        return p
    if isinstance(padding, int):
        pairs = [(padding, padding)] * n
    else:
        items = tuple(padding)
        if len(items) != n:
            raise ValueError(
                f"padding: expected {n} entries (one per spatial axis), got {padding!r}"
            )
        pairs = [
            (int(p), int(p)) if isinstance(p, int) else tuple(int(q) for q in p) for p in items
        ]
    same = all(
        s == 1 and k % 2 == 1 and lo == hi == d * (k - 1) // 2
        for (lo, hi), k, s, d in zip(pairs, kernel, strides, dilation, strict=True)
    )
    return "SAME" if same else pairs


class Conv(nn.Module):
    """Convolution ``(B, *S, C_in) -> (B, *S', features)`` with parameters ``kernel`` and ``bias``.

    ``kernel`` has shape ``(*kernel_size, C_in / groups, features)`` (torch's ``(O, I, *K)`` moved to
    ``(*K, I, O)``) and is lecun-normal by default; ``bias`` is zeros. ``padding`` as in the module
    docstring (default ``"SAME"``). Computed in ``dtype`` with float32 parameters.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence = "SAME"
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        n = _spatial_ndim(x)
        k = _tuple("kernel_size", self.kernel_size, n)
        s = _tuple("strides", self.strides, n)
        d = _tuple("dilation", self.dilation, n)
        c = x.shape[-1]
        if c % self.groups or self.features % self.groups:
            raise ValueError(
                f"x: expected input channels ({c}) and features ({self.features}) divisible by "
                f"groups={self.groups}"
            )
        kernel = self.param(
            "kernel", self.kernel_init, k + (c // self.groups, self.features), jnp.float32
        )
        if isinstance(self.padding, str) and self.padding.upper() == "SYMMETRIC":
            pads = [(dd * (kk // 2), dd * (kk // 2)) for kk, dd in zip(k, d, strict=True)]
            x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)], mode="symmetric")
            padding = "VALID"
        else:
            padding = _padding(self.padding, k, s, d)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = _conv.conv_general_dilated(
            x,
            kernel,
            s,
            padding,
            rhs_dilation=d,
            dimension_numbers=lax.conv_dimension_numbers(
                x.shape, kernel.shape, _dimension_numbers(n)
            ),
            feature_group_count=self.groups,
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


class ConvTranspose(nn.Module):
    """torch's ``ConvTranspose{1,2,3}d``: ``(B, *S, C_in) -> (B, *S', features)``.

    ``S'_i = (S_i - 1) * strides - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1``.
    Parameters: ``kernel (*kernel_size, C_in, features / groups)`` (torch's weight ``(C_in,
    C_out / groups, *K)`` with its first two axes moved last) and ``bias (features,)``. A patch
    transposed convolution (kernel = stride, no padding, one group) is one matrix product on CPU.
    """

    features: int
    kernel_size: int | Sequence[int] = 2
    strides: int | Sequence[int] = 2
    padding: int | Sequence[int] = 0
    output_padding: int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        n = _spatial_ndim(x)
        k = _tuple("kernel_size", self.kernel_size, n)
        s = _tuple("strides", self.strides, n)
        p = _tuple("padding", self.padding, n)
        op = _tuple("output_padding", self.output_padding, n)
        d = _tuple("dilation", self.dilation, n)
        c, g = x.shape[-1], self.groups
        if c % g or self.features % g:
            raise ValueError(
                f"x: expected input channels ({c}) and features ({self.features}) divisible by groups={g}"
            )
        kernel = self.param("kernel", self.kernel_init, k + (c, self.features // g), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if k == s and not any(p) and not any(op) and g == 1 and d == (1,) * n:
            flip = tuple(slice(None, None, -1) for _ in range(n))
            y = _conv.conv_transpose_patch(x, kernel[flip])
        elif d == (1,) * n and _conv.enabled and jax.default_backend() == "cpu":
            # XLA:CPU's input-dilated convolution multiplies the zeros between input voxels too
            # (SkipDenseNet3D's stride-16 up-block: 4096x the work); an overlap-add does not.
            y = _conv.conv_transpose_overlap(x, kernel, s, p, op, g)
        else:
            # The gradient of the forward convolution: dilate the input by the stride, pad by
            # d (k - 1) - p, and convolve with the flipped kernel regrouped to (*K, C_in / g, C_out).
            w = kernel[tuple(slice(None, None, -1) for _ in range(n))]
            w = w.reshape(k + (g, c // g, self.features // g))
            w = jnp.moveaxis(w, n, n + 1).reshape(k + (c // g, self.features))
            if g > 1 and _conv.enabled and jax.default_backend() == "cpu":
                # XLA:CPU runs a grouped input-dilated convolution about 1000x slower than the
                # ungrouped one (SkipDenseNet3D's 18^3 up-block: 111 s vs 0.07 s at 16^3), so
                # use the block-diagonal dense kernel (*K, C_in, C_out) instead: same result.
                wg = w.reshape(k + (c // g, g, self.features // g))
                eye = jnp.eye(g, dtype=w.dtype)[:, None, :, None]  # (in group, 1, out group, 1)
                w = (wg[..., None, :, :, :] * eye).reshape(k + (c, self.features))
                g = 1
            pads = [
                (dd * (kk - 1) - pp, dd * (kk - 1) - pp + oo)
                for kk, pp, oo, dd in zip(k, p, op, d, strict=True)
            ]
            y = lax.conv_general_dilated(
                x,
                w,
                (1,) * n,
                pads,
                lhs_dilation=s,
                rhs_dilation=d,
                dimension_numbers=_dimension_numbers(n),
                feature_group_count=g,
            )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


class PReLU(nn.Module):
    """torch's ``PReLU``: ``max(0, x) + a * min(0, x)`` with ``a`` (``negative_slope``) learnt.

    ``channelwise=True`` learns one slope per channel (``PReLU(C)``), else one in all
    (``PReLU()``); initialised to ``init_value`` (torch's 0.25).
    """

    channelwise: bool = True
    init_value: float = 0.25

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1],) if self.channelwise else ()
        a = self.param(
            "negative_slope", nn.initializers.constant(self.init_value), shape, jnp.float32
        )
        return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


def leaky_relu(negative_slope: float = 0.01) -> Callable:
    """``functools.partial(jax.nn.leaky_relu, negative_slope=...)`` (torch's default slope 0.01)."""
    return functools.partial(jax.nn.leaky_relu, negative_slope=negative_slope)


def _is_module_factory(act) -> bool:
    f = act.func if isinstance(act, functools.partial) else act
    return isinstance(f, type) and issubclass(f, nn.Module)


def apply_act(act, x, *, name: str = "act"):
    """Apply ``act``: None (identity), a function, or a linen module class/partial (e.g. PReLU).

    Call it inside a compact ``__call__``: a module factory is instantiated with ``name``.
    """
    if act is None:
        return x
    if _is_module_factory(act):
        return act(name=name)(x)
    return act(x)


class Dropout(nn.Module):
    """Dropout at ``rate`` in training (``train=True``, rng collection ``"dropout"``), identity otherwise.

    ``channelwise=True`` drops whole channels per sample (torch's ``Dropout2d``/``Dropout3d``): the
    mask is shared over the spatial axes.
    """

    rate: float
    channelwise: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate: expected 0 <= rate < 1, got {self.rate}")
        if self.rate == 0.0 or not train:
            return x
        dims = tuple(range(1, x.ndim - 1)) if self.channelwise else ()
        return nn.Dropout(self.rate, broadcast_dims=dims)(x, deterministic=False)


def upsample(x, scale, *, mode: str = "nearest", align_corners: bool = False):
    """Upsample ``(B, *S, C)`` by ``scale`` (an int or one per axis): torch's ``interpolate``.

    ``mode="nearest"`` repeats each voxel (integer factors); ``mode="linear"`` (bi/trilinear) uses
    :func:`medjax.ops.resize` with ``align_corners``.
    """
    n = _spatial_ndim(x)
    if mode == "nearest":
        factors = _tuple("scale", scale, n)
        for axis, f in enumerate(factors):
            if f != 1:
                x = jnp.repeat(x, f, axis=1 + axis)
        return x
    if mode in ("linear", "bilinear", "trilinear"):
        return _resize_fn(x, scale, align_corners=align_corners)
    raise ValueError(f"mode: expected 'nearest' or 'linear', got {mode!r}")


class Upsample(nn.Module):
    """:func:`upsample` as a module (no parameters)."""

    scale: int | Sequence[int] = 2
    mode: str = "nearest"
    align_corners: bool = False

    @nn.compact
    def __call__(self, x):
        return upsample(x, self.scale, mode=self.mode, align_corners=self.align_corners)


def _pool_args(x, window, strides, padding):
    n = _spatial_ndim(x)
    w = _tuple("window", window, n)
    s = w if strides is None else _tuple("strides", strides, n)
    if isinstance(padding, str):
        pads = padding.upper()
    else:
        pads = [(p, p) for p in _tuple("padding", padding, n)]
    return w, s, pads


def max_pool(x, window, strides=None, padding=0):
    """Max pooling ``(B, *S, C)`` (torch's ``MaxPool``; padding with -inf); ``strides`` defaults to ``window``."""
    w, s, p = _pool_args(x, window, strides, padding)
    return nn.max_pool(x, w, strides=s, padding=p)


def avg_pool(x, window, strides=None, padding=0):
    """Average pooling ``(B, *S, C)`` (torch's ``AvgPool`` with ``count_include_pad=True``)."""
    w, s, p = _pool_args(x, window, strides, padding)
    return nn.avg_pool(x, w, strides=s, padding=p, count_include_pad=True)
