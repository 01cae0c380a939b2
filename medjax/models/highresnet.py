"""MedicalZoo's ``HIGHRESNET``: HighRes3DNet (Li et al. 2017), ``lib/medzoo/HighResNet3D.py``.

Three stages of pre-activation residual blocks at full resolution with dilations 1, 2 and 4
(16, 32 and 64 channels), zero-padded channel shortcuts, and a 1^3 head with dropout.
:func:`load_torch_state_dict` imports a checkpoint of the original (its own key names).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import _medzoo
from medjax.nn.blocks import pad_channels
from medjax.nn.layers import Conv, Dropout
from medjax.nn.norm import BatchNorm

__all__ = ["HighResNet3D", "load_torch_state_dict", "torch_spec"]

Dtype = Any

# block name prefix, output channels, dilation (3 blocks of 2 sub-blocks each)
_STAGES = (("red_blocks", 16, 1), ("dil2block", 32, 2), ("dil4block", 64, 4))


class _PreAct(nn.Module):
    """BN, ReLU, conv (with bias, padding = dilation * (k - 1) / 2): ``bn`` and ``conv``."""

    features: int
    kernel_size: int = 3
    dilation: int = 1
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn")(x, train=train))
        pad = self.dilation * (self.kernel_size - 1) // 2
        return Conv(
            self.features,
            self.kernel_size,
            padding=pad,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv",
        )(y)


class HighResNet3D(nn.Module):
    """HighRes3DNet: ``(B, D, H, W, in_channels) -> logits (B, D, H, W, num_classes)``, any size.

    As the original (shortcut type ``"A"``, ``dropout_layer=True``), quirk kept:

    - ``ConvInit`` gives ``y1 = conv(x)`` and ``y2 = ReLU(BN(y1))``; the main path is fed the
      **raw** ``y1`` and ``y2`` is only the first residual: ``r1 = red1(y1)``,
      ``r2 = red2(r1 + y2)``, ``r3 = red3(r2 + r1)``; the dilated stages continue the same way
      (``d1 = dil2_1(r3 + r2)``, ``d2 = dil2_2(d1 + pad(r3))``, ``d3 = dil2_3(d2 + d1)``, ...),
      and the output is ``e3 + e2``. Kept so that trained checkpoints behave as they did.
    - ``pad`` zero-pads channels on both sides, ``[0 (C/2), x, 0 (C/2)]``.
    - head: conv 1^3 64 -> 80 (bias), channel dropout (``Dropout3d``, ``dropout_rate`` 0.5, rng
      collection ``"dropout"``), then BN, ReLU, conv 1^3 -> classes.

    Every sub-block is BN, ReLU, 3^3 conv with a bias (pre-activation). BatchNorm: torch's defaults
    (``train=True``: batch statistics, ``mutable=["batch_stats"]``). ``dropout_rate`` is a medjax
    field (0 turns dropout off). The original's other settings, ``shortcut_type="B"`` (1^3
    projection shortcuts) and ``dropout_layer=False``, are not used by MedicalZoo's factory and
    are not ported. ``axis_name`` (medjax; default None) synchronises every BatchNorm over a
    ``pmap`` axis.
    """

    in_channels: int = 2
    num_classes: int = 4
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        _medzoo.check_input("HighResNet3D", x, ndim=3, channels=self.in_channels)
        ax = self.axis_name
        y1 = Conv(16, 3, padding=1, dtype=self.dtype, name="conv_init_conv1")(x)
        y2 = nn.relu(BatchNorm(axis_name=ax, name="conv_init_norm")(y1, train=train))

        def block(name, features, dilation, h):
            for j in range(2):
                h = _PreAct(features, 3, dilation, self.dtype, ax, name=f"{name}_{j}")(h, train)
            return h

        prev, res = y1, y2  # the main-path input and the residual added to the first output
        for stage, (name, c, d) in enumerate(_STAGES):
            if stage:  # the previous stage's last two outputs; its last, padded, as residual
                prev, res = prev + res, pad_channels(prev, c)
            b1 = block(f"{name}1", c, d, prev)
            b2 = block(f"{name}2", c, d, b1 + res)
            b3 = block(f"{name}3", c, d, b2 + b1)
            prev, res = b3, b2
        out = prev + res
        out = Conv(80, 1, padding=0, dtype=self.dtype, name="conv_out_0")(out)
        out = Dropout(self.dropout_rate, channelwise=True)(out, train)
        return _PreAct(self.num_classes, 1, 1, self.dtype, ax, name="conv_out_2")(out, train)


def torch_spec():
    """``(flax_path, torch_prefix, kind)`` for :class:`HighResNet3D`."""
    spec = [
        ("conv_init_conv1", "conv_init.conv1", "conv"),
        ("conv_init_norm", "conv_init.norm.0", "batch_norm"),
    ]
    sub = {"red_blocks": "conv_red", "dil2block": "conv_dil", "dil4block": "conv_dil"}
    for name, _, _ in _STAGES:
        for i in (1, 2, 3):
            for j in (0, 1):
                t = f"{name}{i}.{j}.{sub[name]}"
                spec += [
                    (f"{name}{i}_{j}/bn", f"{t}.0", "batch_norm"),
                    (f"{name}{i}_{j}/conv", f"{t}.2", "conv"),
                ]
    spec += [
        ("conv_out_0", "conv_out.0", "conv"),
        ("conv_out_2/bn", "conv_out.2.conv_dil.0", "batch_norm"),
        ("conv_out_2/conv", "conv_out.2.conv_dil.2", "conv"),
    ]
    return spec


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` of :class:`HighResNet3D` from the original's.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path. ``in_channels`` and
    ``num_classes`` are read from the shapes unless given; a missing, unexpected or mis-shaped
    key raises ``ValueError`` naming it.
    """
    sd = _medzoo.read(state_dict)
    name = "HighResNet3D"
    model_kwargs.setdefault(
        "in_channels", _medzoo.weight_shape(sd, "conv_init.conv1.weight", name)[1]
    )
    model_kwargs.setdefault(
        "num_classes", _medzoo.weight_shape(sd, "conv_out.2.conv_dil.2.weight", name)[0]
    )
    model = HighResNet3D(**model_kwargs)
    shape = (1, 8, 8, 8, model.in_channels)
    return _medzoo.load(model, sd, torch_spec(), shape, name=name)
