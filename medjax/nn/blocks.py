"""Reusable 3D convolutional blocks: conv + activation, residual levels, V-Net-style encoder/decoder.

All blocks are channels-last ``(B, *S, C)`` and work for any number of spatial dimensions (the
kernel rank follows the input). ``dtype`` is the compute dtype; parameters stay float32.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn import conv as _conv

Dtype = Any


def rbg_key(rng):
    """An ``"rbg"`` PRNG key derived deterministically from ``rng`` (typed key, raw uint32[2] or int seed)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    if hasattr(rng, "dtype") and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(rng) == jax.random.key_impl(jax.random.key(0, impl="rbg")):
            return rng
        rng = jax.random.key_data(rng)
    raw = jnp.asarray(rng, jnp.uint32).reshape(-1)
    if raw.shape != (2,):
        raise ValueError(
            f"rng: expected a PRNG key, raw uint32[2] key or int, got shape {raw.shape}"
        )
    data = jnp.concatenate([raw, raw ^ jnp.uint32(0x9E3779B9)])
    return jax.random.wrap_key_data(data, impl="rbg")


def fast_init(module, rng, *args, **kwargs):
    """``jax.jit(module.init)`` with an ``"rbg"`` key derived from ``rng``: the variables dict.

    XLA:CPU compiles the threefry-based initialisers of a deep 3D network very slowly (minutes for
    the joint registration network); the RBG generator compiles in seconds. Deterministic in ``rng``.
    """
    key = rbg_key(rng)
    return jax.jit(lambda k, *a: module.init(k, *a, **kwargs))(key, *args)


def _ndim(x):
    return x.ndim - 2


class ConvAct(nn.Module):
    """Convolution (``SAME`` padding) followed by an optional activation: ``(B, *S, Cin) -> (B, *S', features)``."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    act: Callable | None = nn.relu
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        d = _ndim(x)
        x = nn.Conv(
            self.features,
            (self.kernel_size,) * d,
            strides=(self.strides,) * d,
            padding="SAME",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=self.kernel_init,
            conv_general_dilated=_conv.conv_general_dilated,
        )(x)
        return x if self.act is None else self.act(x)


class PatchConvTranspose(nn.Module):
    """``flax.linen.ConvTranspose(features, factor^d, strides=factor, padding="VALID")``, same params.

    Computed by :func:`medjax.nn.conv.conv_transpose_patch` (a matrix product and a reshape on CPU,
    where XLA's transposed convolution is slow; ``lax.conv_transpose`` elsewhere). Parameters:
    ``kernel (*factor^d, C, features)`` (lecun-normal) and ``bias (features,)`` (zeros), float32.
    """

    features: int
    factor: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = _ndim(x)
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.factor,) * d + (x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return _conv.conv_transpose_patch(x, kernel) + bias


class UpConvAct(nn.Module):
    """Transposed convolution ``factor``^d stride ``factor`` + activation: ``(B, *S, C) -> (B, *(factor*S), features)``."""

    features: int
    factor: int = 2
    act: Callable | None = nn.relu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = PatchConvTranspose(
            self.features, self.factor, dtype=self.dtype, name="ConvTranspose_0"
        )(x)
        return x if self.act is None else self.act(x)


class ResidualLevel(nn.Module):
    """``num_convs`` 3^d conv+ReLU layers whose output is added to the input: ``(B, *S, C) -> (B, *S, C)``.

    The V-Net residual unit; the input width must equal ``features``.
    """

    features: int
    num_convs: int
    act: Callable = nn.relu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.features:
            raise ValueError(
                f"x: expected {self.features} channels for a residual level, got {x.shape[-1]}"
            )
        y = x
        for _ in range(self.num_convs):
            y = ConvAct(self.features, 3, act=self.act, dtype=self.dtype)(y)
        return y + x


class ResidualUpLevel(nn.Module):
    """V-Net decoder level: up = ReLU(ConvT(x)); out = convs(concat[skip, up]) + up.

    Shapes: ``x (B, *S, Cx)``, ``skip (B, *(2S), Cs)`` -> ``(B, *(2S), features)``.
    """

    features: int
    num_convs: int
    act: Callable = nn.relu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip):
        up = UpConvAct(self.features, 2, act=self.act, dtype=self.dtype)(x)
        if up.shape[1:-1] != skip.shape[1:-1]:
            raise ValueError(
                f"skip: expected spatial shape {up.shape[1:-1]} (2x the input), got {skip.shape[1:-1]}"
            )
        y = jnp.concatenate([skip.astype(up.dtype), up], axis=-1)
        for _ in range(self.num_convs):
            y = ConvAct(self.features, 3, act=self.act, dtype=self.dtype)(y)
        return y + up


class ResidualEncoder(nn.Module):
    """V-Net encoder: 1^d linear lift to ``widths[0]``, residual levels, stride-2 2^d conv+ReLU between.

    Input ``(B, *S, C)`` with every spatial size divisible by ``2**(len(widths)-1)``. Returns the list of
    level outputs (skips), shallow to deep: ``[(B, *S, widths[0]), (B, *S/2, widths[1]), ...]``.
    """

    widths: Sequence[int] = (8, 16, 32, 64, 128)
    convs: Sequence[int] = (1, 2, 3, 3, 3)
    act: Callable = nn.relu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if len(self.widths) != len(self.convs):
            raise ValueError(
                f"convs: expected {len(self.widths)} entries (one per width), got {len(self.convs)}"
            )
        factor = 2 ** (len(self.widths) - 1)
        if any(s % factor for s in x.shape[1:-1]):
            raise ValueError(
                f"x: expected spatial sizes divisible by {factor}, got {tuple(x.shape[1:-1])}"
            )
        x = ConvAct(self.widths[0], 1, act=None, dtype=self.dtype)(x)
        skips = []
        for i, (w, n) in enumerate(zip(self.widths, self.convs, strict=True)):
            if i > 0:
                x = ConvAct(w, 2, strides=2, act=self.act, dtype=self.dtype)(x)
            x = ResidualLevel(w, n, act=self.act, dtype=self.dtype)(x)
            skips.append(x)
        return skips


class ResidualDecoder(nn.Module):
    """V-Net decoder over encoder skips (shallow to deep); returns ``(B, *S, widths[0])`` features.

    Level i (deep to shallow) upsamples with a stride-2 transposed conv, concatenates the skip, applies
    ``convs[i]`` 3^d convs and adds the upsampled tensor. ``widths`` are listed shallow to deep like the
    encoder's; ``convs`` deep to shallow (one entry per upsampling).
    """

    widths: Sequence[int] = (8, 16, 32, 64, 128)
    convs: Sequence[int] = (3, 3, 2, 1)
    act: Callable = nn.relu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, skips):
        if len(skips) != len(self.widths):
            raise ValueError(f"skips: expected {len(self.widths)} levels, got {len(skips)}")
        if len(self.convs) != len(self.widths) - 1:
            raise ValueError(
                f"convs: expected {len(self.widths) - 1} entries (one per upsampling), got {len(self.convs)}"
            )
        x = skips[-1]
        for j, n in enumerate(self.convs):
            level = len(self.widths) - 2 - j
            x = ResidualUpLevel(self.widths[level], n, act=self.act, dtype=self.dtype)(
                x, skips[level]
            )
        return x
