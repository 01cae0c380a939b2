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
from medjax.nn.layers import Conv, Dropout, apply_act
from medjax.nn.norm import make_norm

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


# ------------------------------------------------------------------------------------------------
# Blocks with injected norm and activation (the zoo, PnP-AdaNet and FocusNetV2 share these)


class ConvNormAct(nn.Module):
    """Convolution, norm and activation in either order: ``(B, *S, C) -> (B, *S', features)``.

    ``order="post"``: conv -> dropout -> norm -> act (the usual conv-BN-ReLU; dropout sits where
    PnP-AdaNet's ``conv_bn_2d`` puts it). ``order="pre"``: norm -> act -> conv -> dropout
    (pre-activation, as FocusNetV2 and the DenseNets). ``norm`` is a name or a factory
    (:func:`medjax.nn.norm.make_norm`); ``act`` is None, a function or a module class/partial
    (e.g. :class:`medjax.nn.layers.PReLU`). Submodules are named ``conv``, ``norm``, ``act``,
    ``dropout``. ``padding`` etc. as :class:`medjax.nn.layers.Conv`.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    dilation: int | Sequence[int] = 1
    use_bias: bool = False
    norm: Any = "batch"
    act: Any = nn.relu
    order: str = "post"
    dropout: float = 0.0
    channel_dropout: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.order not in ("post", "pre"):
            raise ValueError(f"order: expected 'post' or 'pre', got {self.order!r}")
        norm = make_norm(self.norm)

        def conv(y):
            y = Conv(
                self.features,
                self.kernel_size,
                strides=self.strides,
                padding=self.padding,
                dilation=self.dilation,
                use_bias=self.use_bias,
                dtype=self.dtype,
                name="conv",
            )(y)
            return Dropout(self.dropout, channelwise=self.channel_dropout, name="dropout")(y, train)

        if self.order == "pre":
            x = norm(name="norm")(x, train=train)
            x = apply_act(self.act, x, name="act")
            return conv(x)
        x = norm(name="norm")(conv(x), train=train)
        return apply_act(self.act, x, name="act")


def pad_channels(x, features):
    """Zero-pad the channel axis of ``(B, *S, C)`` to ``features``, half on each side (low side first).

    PnP-AdaNet's and HighResNet's parameter-free shortcut when a residual block widens.
    """
    c = x.shape[-1]
    if features < c:
        raise ValueError(f"features: expected >= the {c} input channels, got {features}")
    lo = (features - c) // 2
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(lo, features - c - lo)])


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al.): ``x * sigmoid(W2 relu(W1 mean_S(x)))``, shape unchanged.

    ``W1``: ``C -> C // reduction`` (``fc1``), ``W2``: back to ``C`` (``fc2``), both with biases
    (torch's two 1x1 convolutions; their weights import as Dense kernels).
    """

    reduction: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c // self.reduction < 1:
            raise ValueError(f"reduction: expected <= the {c} channels, got {self.reduction}")
        s = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        s = nn.relu(nn.Dense(c // self.reduction, dtype=self.dtype, name="fc1")(s))
        s = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name="fc2")(s))
        return x * s.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (c,)).astype(x.dtype)


class ResidualBlock(nn.Module):
    """Two-convolution residual block, post- or pre-activation: ``(B, *S, C) -> (B, *S/strides, features)``.

    ``preact=False`` (ResNet, PnP-AdaNet): ``act(norm(conv1(x)))``, ``norm(conv2(.))``, optional SE,
    then ``act(shortcut(x) + .)``. ``preact=True`` (FocusNetV2's SE block): ``conv1(act(norm(x)))``,
    ``conv2(act(norm(.)))``, optional SE, then ``shortcut + .`` with no activation after the add.

    ``shortcut``: ``"auto"`` (identity when the shape is kept, else a 1^d projection: conv + norm
    post-activation, norm + act + conv pre-activation), ``"projection"`` (always), ``"pad"``
    (strided subsampling and zero-padded channels, no parameters) or ``"identity"``.
    ``dilations`` gives conv1's and conv2's dilation (each an int or per axis); ``kernel_size`` and
    ``strides`` (conv1's) likewise. ``dropout`` follows each convolution. Submodules: ``conv1``,
    ``norm1``, ``act1``, ``conv2``, ``norm2``, ``se``, ``shortcut_conv``, ``shortcut_norm``, ``act``.
    """

    features: int
    strides: int | Sequence[int] = 1
    kernel_size: int | Sequence[int] = 3
    dilations: tuple = (1, 1)
    norm: Any = "batch"
    act: Any = nn.relu
    preact: bool = False
    shortcut: str = "auto"
    se_reduction: int | None = None
    dropout: float = 0.0
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.shortcut not in ("auto", "projection", "pad", "identity"):
            raise ValueError(
                f"shortcut: expected 'auto', 'projection', 'pad' or 'identity', got {self.shortcut!r}"
            )
        n = x.ndim - 2
        norm = make_norm(self.norm)
        strides = (self.strides,) * n if isinstance(self.strides, int) else tuple(self.strides)
        d1, d2 = self.dilations

        def conv(name, y, strides, dilation):
            k = (self.kernel_size,) * n if isinstance(self.kernel_size, int) else self.kernel_size
            dd = (dilation,) * n if isinstance(dilation, int) else tuple(dilation)
            pad = [(di * (ki - 1) // 2,) * 2 for ki, di in zip(k, dd, strict=True)]
            y = Conv(
                self.features,
                k,
                strides=strides,
                padding=pad,
                dilation=dd,
                use_bias=self.use_bias,
                dtype=self.dtype,
                name=name,
            )(y)
            return Dropout(self.dropout, name=f"dropout_{name}")(y, train)

        reshape = x.shape[-1] != self.features or any(s != 1 for s in strides)
        kind = self.shortcut
        if kind == "auto":
            kind = "projection" if reshape else "identity"
        if kind == "identity" and reshape:
            raise ValueError(
                f"shortcut: 'identity' needs the input shape kept, got {x.shape[-1]} -> "
                f"{self.features} channels with strides {strides}"
            )

        if self.preact:
            pre = apply_act(self.act, norm(name="norm1")(x, train=train), name="act1")
            y = conv("conv1", pre, strides, d1)
            y = apply_act(self.act, norm(name="norm2")(y, train=train), name="act2")
            y = conv("conv2", y, 1, d2)
        else:
            y = conv("conv1", x, strides, d1)
            y = apply_act(self.act, norm(name="norm1")(y, train=train), name="act1")
            y = norm(name="norm2")(conv("conv2", y, 1, d2), train=train)
        if self.se_reduction:
            y = SqueezeExcitation(self.se_reduction, dtype=self.dtype, name="se")(y)

        if kind == "projection":
            proj = Conv(
                self.features,
                1,
                strides=strides,
                padding=0,
                use_bias=False,
                dtype=self.dtype,
                name="shortcut_conv",
            )
            if self.preact:
                s = norm(name="shortcut_norm")(x, train=train)
                s = proj(apply_act(self.act, s, name="shortcut_act"))
            else:
                s = norm(name="shortcut_norm")(proj(x), train=train)
        elif kind == "pad":
            s = x[(slice(None),) + tuple(slice(None, None, st) for st in strides)]
            s = pad_channels(s, self.features)
        else:
            s = x
        out = y + s.astype(y.dtype)
        return out if self.preact else apply_act(self.act, out, name="act")
