"""MedicalZoo's ``RESNETMED3D``: the Med3D ResNet segmenter (Chen et al. 2019).

A port of ``lib/medzoo/ResNet3DMedNet.py`` (``generate_resnet3d``): a 3D ResNet encoder with
BasicBlocks, dilated layers 3 and 4 instead of striding, and a transposed-convolution decoder
(``TranspConvNet``). :func:`load_torch_state_dict` imports a checkpoint of the original.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import _medzoo
from medjax.nn.blocks import ResidualBlock
from medjax.nn.layers import Conv, ConvTranspose, max_pool
from medjax.nn.norm import BatchNorm

__all__ = ["ResNetMed3D", "load_torch_state_dict", "torch_spec"]

Dtype = Any

#: BasicBlocks per layer for the depths built from BasicBlocks (50+ use Bottlenecks: not ported).
LAYERS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# (width, stride, dilation) of layer1..layer4
_PLAN = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))


class ResNetMed3D(nn.Module):
    """Med3D segmenter: ``(B, D, H, W, in_channels) -> logits (B, D, H, W, num_classes)``.

    The encoder reduces by 8 (stem conv stride 2, max pool, layer2 stride 2) and the decoder
    enlarges by 8, so the output equals the input only for sizes that are multiples of 8: other
    sizes raise ``ValueError`` (the original silently returns ``8 * ceil(S / 8)``).

    As the original at ``model_depth=18`` (``depth`` 10 and 34 are the same BasicBlock network
    with 1 or (3, 4, 6, 3) blocks; the Bottleneck depths 50-200 raise ``ValueError``):

    - stem: conv 7^3 stride 2 pad 3 (no bias), BN, ReLU, max pool 3 stride 2 pad 1;
    - layers 64, 128 (stride 2), 256 (dilation 2), 512 (dilation 4); in a BasicBlock conv1 has
      the layer's stride and dilation (padding = dilation) and **conv2 is never dilated**;
      shortcut type B (conv 1^3 + BN) in the first block of layers 2-4;
    - decoder: 3 x (transposed conv k2 s2 with bias -> 256, BN, ReLU), conv 3^3 -> 128 (no bias),
      BN, ReLU, conv 1^3 -> classes (no bias). No softmax; the original's forward prints the
      feature shape, this one does not.

    BatchNorm: torch's defaults (``train=True``: batch statistics, ``mutable=["batch_stats"]``);
    ``axis_name`` (medjax; default None) synchronises them over a ``pmap`` axis.
    The original's options that the factory leaves at their defaults (``shortcut_type="A"``,
    ``no_max_pool``, ``widen_factor``) are not ported.
    """

    in_channels: int = 2
    num_classes: int = 4
    depth: int = 18
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.depth not in LAYERS:
            raise ValueError(
                f"depth: expected one of {sorted(LAYERS)} (BasicBlock depths), got {self.depth}"
            )
        _medzoo.check_input("ResNetMed3D", x, ndim=3, channels=self.in_channels, multiple=8)
        y = Conv(64, 7, strides=2, padding=3, use_bias=False, dtype=self.dtype, name="conv1")(x)
        ax = self.axis_name
        y = nn.relu(BatchNorm(axis_name=ax, name="bn1")(y, train=train))
        y = max_pool(y, 3, 2, padding=1)
        for layer, ((width, stride, dilation), n) in enumerate(
            zip(_PLAN, LAYERS[self.depth], strict=True), start=1
        ):
            for i in range(n):
                y = ResidualBlock(
                    width,
                    strides=stride if i == 0 else 1,
                    dilations=(dilation, 1),
                    norm=_medzoo.batch_norm(ax),
                    act=nn.relu,
                    shortcut="auto",
                    dtype=self.dtype,
                    name=f"layer{layer}_{i}",
                )(y, train=train)
        for i in (1, 2, 3):
            y = ConvTranspose(256, 2, strides=2, dtype=self.dtype, name=f"segm_transp_{i}")(y)
            y = nn.relu(BatchNorm(axis_name=ax, name=f"segm_transp_{i}_bn")(y, train=train))
        y = Conv(128, 3, padding=1, use_bias=False, dtype=self.dtype, name="segm_conv_1")(y)
        y = nn.relu(BatchNorm(axis_name=ax, name="segm_conv_1_bn")(y, train=train))
        return Conv(
            self.num_classes, 1, padding=0, use_bias=False, dtype=self.dtype, name="segm_conv_final"
        )(y)


def torch_spec(depth: int = 18):
    """``(flax_path, torch_prefix, kind)`` for :class:`ResNetMed3D` of ``depth``."""
    if depth not in LAYERS:
        raise ValueError(f"depth: expected one of {sorted(LAYERS)}, got {depth}")
    spec = [("conv1", "conv1", "conv"), ("bn1", "bn1", "batch_norm")]
    for layer, n in enumerate(LAYERS[depth], start=1):
        for i in range(n):
            f, t = f"layer{layer}_{i}", f"layer{layer}.{i}"
            spec += [
                (f"{f}/conv1", f"{t}.conv1", "conv"),
                (f"{f}/norm1", f"{t}.bn1", "batch_norm"),
                (f"{f}/conv2", f"{t}.conv2", "conv"),
                (f"{f}/norm2", f"{t}.bn2", "batch_norm"),
            ]
            if i == 0 and layer > 1:
                spec += [
                    (f"{f}/shortcut_conv", f"{t}.downsample.0", "conv"),
                    (f"{f}/shortcut_norm", f"{t}.downsample.1", "batch_norm"),
                ]
    for i in (1, 2, 3):
        spec += [
            (f"segm_transp_{i}", f"segm.transp_{i}.0", "conv_transpose"),
            (f"segm_transp_{i}_bn", f"segm.transp_{i}.1", "batch_norm"),
        ]
    spec += [
        ("segm_conv_1", "segm.conv_1.0", "conv"),
        ("segm_conv_1_bn", "segm.conv_1.1", "batch_norm"),
        ("segm_conv_final", "segm.conv_final", "conv"),
    ]
    return spec


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` of :class:`ResNetMed3D` from the original's.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path. ``in_channels``,
    ``num_classes`` and ``depth`` (from the number of ``layerK.i`` blocks) are read from the keys
    unless given; a missing, unexpected or mis-shaped key raises ``ValueError`` naming it.
    """
    sd = _medzoo.read(state_dict)
    name = "ResNetMed3D"
    model_kwargs.setdefault("in_channels", _medzoo.weight_shape(sd, "conv1.weight", name)[1])
    model_kwargs.setdefault(
        "num_classes", _medzoo.weight_shape(sd, "segm.conv_final.weight", name)[0]
    )
    if "depth" not in model_kwargs:
        blocks = tuple(
            len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4)
        )
        depths = [d for d, layers in LAYERS.items() if layers == blocks]
        if not depths:
            raise ValueError(
                f"{name} checkpoint: blocks per layer {blocks} match no supported depth "
                f"(blocks per depth: {LAYERS})"
            )
        model_kwargs["depth"] = depths[0]
    model = ResNetMed3D(**model_kwargs)
    shape = (1, 8, 8, 8, model.in_channels)
    return _medzoo.load(model, sd, torch_spec(model.depth), shape, name=name)
