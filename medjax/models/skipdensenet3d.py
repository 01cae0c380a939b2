"""MedicalZoo's SkipDenseNet3D (``SkipDenseNet3D.py``; after Bui et al. 2017, 3D-SkipDenseSeg).

- Stem: three 3^3 convs (no bias; BN-ReLU between them), BN-ReLU, and a 2^3 stride-2 conv
  (``conv_pool_first``). The final concatenation reads conv2's output **before** that BN-ReLU.
- Four dense blocks of 4 bottleneck layers (BN, ReLU, 1^3 conv to ``bn_size * growth_rate``, BN,
  ReLU, 3^3 conv to ``growth_rate``, dropout, ``[x, new]``), with transitions between them (BN,
  ReLU, 1^3 conv to half the channels, no bias; BN, ReLU, 2^3 stride-2 conv **with a bias**).
  Channels at the defaults: 96 -> 48 -> 112 -> 56 -> 120 -> 60 -> 124.
- After block i (i = 0..3), ``upsampling_blocks_i``: a ``ConvTranspose3d(C_i, classes, kernel
  2^(i+1) + 2, stride 2^(i+1), padding 1, groups=classes, no bias)`` back to full resolution
  (class j reads only channels ``[j C_i / classes, (j + 1) C_i / classes)``).
- Head: ``[up_0, up_1, up_2, up_3, stem conv2 output]`` (4 classes + 32 channels), BN, ReLU, 1^3
  conv with a bias.

``(B, D, H, W, in_channels) -> (B, D, H, W, num_classes)`` logits; D, H, W multiples of 16.

How it differs from the original, and why:

- ``in_channels`` is a field: the original's factory never passes it (``__init__.py:47``), so the
  original always takes 2 channels. The default is 2.
- ``num_classes`` must divide every block's width (96, 112, 120, 124 at the defaults: 1, 2 or 4
  classes), because the up-blocks are grouped; the original fails at construction, here
  ``ValueError`` names the widths. A spatial size that is not a multiple of 16 raises
  ``ValueError`` too (the original fails at a concatenation).
- ``block_config`` stays the original's (4, 4, 4, 4) and ``bn_size`` 4: the head's width is
  hard-coded for four blocks in the original (``classes * 4 + num_init_features``).
- Initialisation is Flax's defaults (lecun-normal convs), not the original's kaiming init: it
  changes no forward result, and imported weights replace it.
- Dropout (``drop_rate``, element-wise) runs only with ``train=True`` and needs the ``"dropout"``
  rng. The original applies it **twice** to each dense layer's new features: its ``_DenseLayer``
  is an ``nn.Sequential`` whose ``drop_layer`` attribute is registered as a child, so the
  Sequential's forward runs it and the layer's ``forward`` runs it again (zeroed with
  probability 1 - 0.9^2 = 0.19 at the default, survivors scaled by 1/0.81). ``dropout_twice=True``
  (the default) keeps that; ``False`` drops once.

1,552,256 parameters at the factory's settings (2 channels, 4 classes), the original's count.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models._medzoo import DenseBlock, batch_norm, load
from medjax.models.torch_import import read_state_dict
from medjax.nn.blocks import ConvNormAct
from medjax.nn.layers import Conv, ConvTranspose
from medjax.nn.norm import BatchNorm

__all__ = ["SkipDenseNet3D", "block_widths", "load_torch_state_dict", "torch_spec"]

Dtype = Any

BLOCK_CONFIG = (4, 4, 4, 4)
BN_SIZE = 4
#: input spatial sizes must be multiples of this (the stem conv and three transitions halve it).
SIZE_MULTIPLE = 2 ** len(BLOCK_CONFIG)


def block_widths(num_init_features: int = 32, growth_rate: int = 16) -> tuple[int, ...]:
    """Channels after each dense block (96, 112, 120, 124 at the defaults)."""
    widths, c = [], num_init_features
    for i, n in enumerate(BLOCK_CONFIG):
        c += n * growth_rate
        widths.append(c)
        if i != len(BLOCK_CONFIG) - 1:
            c //= 2
    return tuple(widths)


class _Transition(nn.Module):
    """BN, ReLU, 1^3 conv (no bias) to ``features``; BN, ReLU, 2^3 stride-2 conv with a bias."""

    features: int
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = batch_norm(self.axis_name)
        x = ConvNormAct(
            self.features,
            1,
            padding=0,
            use_bias=False,
            norm=norm,
            order="pre",
            dtype=self.dtype,
            name="conv",
        )(x, train)
        return ConvNormAct(
            self.features,
            2,
            strides=2,
            padding=0,
            use_bias=True,
            norm=norm,
            order="pre",
            dtype=self.dtype,
            name="pool",
        )(x, train)


class SkipDenseNet3D(nn.Module):
    """SkipDenseNet3D: ``(B, D, H, W, in_channels) -> (B, D, H, W, num_classes)`` logits.

    Submodules: ``conv0``, ``norm0``, ``conv1``, ``norm1``, ``conv2``, ``norm2``,
    ``conv_pool_first``, ``dense_blocks_i`` (layers ``layer_j`` with ``bottleneck`` and ``layer``),
    ``transit_blocks_i`` (``conv``, ``pool``), ``upsampling_blocks_i``, ``bn_class``,
    ``conv_class``. See the module docstring for the differences from the original.
    ``axis_name`` (medjax; default None) synchronises every BatchNorm over a ``pmap`` axis.
    """

    in_channels: int = 2
    num_classes: int = 4
    growth_rate: int = 16
    num_init_features: int = 32
    drop_rate: float = 0.1
    dropout_twice: bool = True
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        widths = block_widths(self.num_init_features, self.growth_rate)
        if any(w % self.num_classes for w in widths):
            raise ValueError(
                f"num_classes: SkipDenseNet3D's grouped up-blocks need num_classes to divide every "
                f"block width {widths}, got {self.num_classes}"
            )
        if x.ndim != 5:
            raise ValueError(
                f"x: SkipDenseNet3D expects (B, D, H, W, C), got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x: SkipDenseNet3D was built for in_channels={self.in_channels}, got {x.shape[-1]}"
            )
        if any(s % SIZE_MULTIPLE for s in x.shape[1:4]):
            raise ValueError(
                f"x: SkipDenseNet3D needs spatial sizes that are multiples of {SIZE_MULTIPLE}, got "
                f"{tuple(x.shape[1:4])}"
            )
        f = self.num_init_features

        def conv(name, k=3, **kw):
            return Conv(f, k, use_bias=False, dtype=self.dtype, name=name, **kw)

        def bn_relu(name, y):
            return nn.relu(BatchNorm(axis_name=self.axis_name, name=name)(y, train=train))

        y = bn_relu("norm0", conv("conv0", padding=1)(x))
        y = bn_relu("norm1", conv("conv1", padding=1)(y))
        first = conv("conv2", padding=1)(y)
        out = conv("conv_pool_first", 2, strides=2, padding=0)(bn_relu("norm2", first))

        ups = []
        for i, n in enumerate(BLOCK_CONFIG):
            out = DenseBlock(
                n,
                self.growth_rate,
                bottleneck=BN_SIZE * self.growth_rate,
                drop_rate=self.drop_rate,
                dropout_twice=self.dropout_twice,
                dtype=self.dtype,
                norm=batch_norm(self.axis_name),
                name=f"dense_blocks_{i}",
            )(out, train)
            s = 2 ** (i + 1)
            ups.append(
                ConvTranspose(
                    self.num_classes,
                    s + 2,
                    strides=s,
                    padding=1,
                    groups=self.num_classes,
                    use_bias=False,
                    dtype=self.dtype,
                    name=f"upsampling_blocks_{i}",
                )(out)
            )
            if i != len(BLOCK_CONFIG) - 1:
                out = _Transition(
                    out.shape[-1] // 2, self.dtype, self.axis_name, name=f"transit_blocks_{i}"
                )(out, train)
        y = jnp.concatenate(ups + [first], axis=-1)
        y = bn_relu("bn_class", y)
        return Conv(self.num_classes, 1, padding=0, dtype=self.dtype, name="conv_class")(y)


# ------------------------------------------------------------------------------------------------
# The original's PyTorch checkpoints


def torch_spec(model: SkipDenseNet3D) -> list[tuple[str, str, str]]:
    """The ``(flax_path, torch_prefix, kind)`` spec of the original's ``state_dict``.

    ``features.conv0/norm0/conv1/norm1/conv2``, ``features_bn.norm2``, ``conv_pool_first``,
    ``dense_blocks.i.denselayerj.norm1/conv1/norm2/conv2``, ``upsampling_blocks.i``,
    ``transit_blocks.i.norm/conv/pool_norm/pool``, ``bn_class``, ``conv_class``.
    """
    if not isinstance(model, SkipDenseNet3D):
        raise ValueError(f"model: expected a SkipDenseNet3D, got {type(model).__name__}")
    spec = [
        ("conv0", "features.conv0", "conv"),
        ("norm0", "features.norm0", "batch_norm"),
        ("conv1", "features.conv1", "conv"),
        ("norm1", "features.norm1", "batch_norm"),
        ("conv2", "features.conv2", "conv"),
        ("norm2", "features_bn.norm2", "batch_norm"),
        ("conv_pool_first", "conv_pool_first", "conv"),
    ]
    for i, n in enumerate(BLOCK_CONFIG):
        for j in range(n):
            f, t = f"dense_blocks_{i}/layer_{j}", f"dense_blocks.{i}.denselayer{j + 1}"
            spec += [
                (f"{f}/bottleneck/norm", f"{t}.norm1", "batch_norm"),
                (f"{f}/bottleneck/conv", f"{t}.conv1", "conv"),
                (f"{f}/layer/norm", f"{t}.norm2", "batch_norm"),
                (f"{f}/layer/conv", f"{t}.conv2", "conv"),
            ]
        spec.append((f"upsampling_blocks_{i}", f"upsampling_blocks.{i}", "conv_transpose"))
        if i != len(BLOCK_CONFIG) - 1:
            f, t = f"transit_blocks_{i}", f"transit_blocks.{i}"
            spec += [
                (f"{f}/conv/norm", f"{t}.norm", "batch_norm"),
                (f"{f}/conv/conv", f"{t}.conv", "conv"),
                (f"{f}/pool/norm", f"{t}.pool_norm", "batch_norm"),
                (f"{f}/pool/conv", f"{t}.pool", "conv"),
            ]
    return spec + [("bn_class", "bn_class", "batch_norm"), ("conv_class", "conv_class", "conv")]


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` from an original SkipDenseNet3D checkpoint.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path (``module.`` prefixes stripped).
    ``in_channels``, ``num_init_features`` (``features.conv0``), ``num_classes`` (``conv_class``)
    and ``growth_rate`` (``dense_blocks.0.denselayer1.conv2``) are read from the shapes when not
    given. A missing, unexpected or mis-shaped key raises ``ValueError`` naming it.
    """
    sd = read_state_dict(state_dict)

    def shape(key):
        if key not in sd:
            raise ValueError(
                f"state_dict: missing key {key} (expected a SkipDenseNet3D checkpoint)"
            )
        return sd[key].shape

    kw = dict(model_kwargs)
    if "in_channels" not in kw or "num_init_features" not in kw:
        f, c = shape("features.conv0.weight")[:2]
        kw.setdefault("in_channels", c)
        kw.setdefault("num_init_features", f)
    kw.setdefault("num_classes", shape("conv_class.weight")[0])
    kw.setdefault("growth_rate", shape("dense_blocks.0.denselayer1.conv2.weight")[0])
    model = SkipDenseNet3D(**kw)
    return load(model, sd, torch_spec(model), (1,) + (SIZE_MULTIPLE,) * 3 + (model.in_channels,))
