"""MedicalZoo's ``UNET2D``: the 2-D U-Net of ``lib/medzoo/Unet2D.py`` (from milesial/Pytorch-UNet).

Four max-pool levels of double conv-BN-ReLU (64-128-256-512-512), bilinear upsampling with
``align_corners=True``, zero-padding to the skip size and ``[skip, up]`` concatenation.
:func:`load_torch_state_dict` imports a checkpoint of the original (its own key names).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import _medzoo
from medjax.nn.layers import Conv, max_pool, upsample
from medjax.nn.norm import BatchNorm

__all__ = ["Unet", "load_torch_state_dict", "torch_spec"]

Dtype = Any

_DOWN = (("down1", 128), ("down2", 256), ("down3", 512), ("down4", 512))
_UP = (("up1", 256), ("up2", 128), ("up3", 64), ("up4", 64))


class _DoubleConv(nn.Module):
    """(conv 3x3 pad 1 with bias, BN, ReLU) twice: ``conv_0``, ``bn_0``, ``conv_1``, ``bn_1``."""

    features: int
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(2):
            x = Conv(self.features, 3, padding=1, dtype=self.dtype, name=f"conv_{i}")(x)
            x = nn.relu(BatchNorm(axis_name=self.axis_name, name=f"bn_{i}")(x, train=train))
        return x


class Unet(nn.Module):
    """2-D U-Net: ``(B, H, W, in_channels) -> logits (B, H, W, num_classes)``.

    Any spatial size of at least 16 (four floor-halving max pools must leave one pixel;
    ``ValueError`` otherwise). Each up step: bilinear x2 with ``align_corners=True``, zero-pad
    the result to the skip's size (``diff // 2`` before, the rest after, as the original's
    ``F.pad``), concatenate ``[skip, up]``, double conv. The head is a 1x1 conv with a bias; no
    softmax. BatchNorm: torch's defaults (``train=True``: batch statistics,
    ``mutable=["batch_stats"]``; ``axis_name``, a medjax field, synchronises them over a ``pmap``
    axis). No dropout. Same as the original throughout.
    """

    in_channels: int = 2
    num_classes: int = 4
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        _medzoo.check_input("Unet", x, ndim=2, channels=self.in_channels, min_size=16)
        skips = [_DoubleConv(64, self.dtype, self.axis_name, name="inc")(x, train)]
        for name, c in _DOWN:
            skips.append(
                _DoubleConv(c, self.dtype, self.axis_name, name=name)(max_pool(skips[-1], 2), train)
            )
        y = skips.pop()
        for name, c in _UP:
            skip = skips.pop()
            y = upsample(y, 2, mode="linear", align_corners=True)
            pads = [(0, 0)]
            for s, u in zip(skip.shape[1:3], y.shape[1:3], strict=True):
                pads.append(((s - u) // 2, s - u - (s - u) // 2))
            y = jnp.pad(y, pads + [(0, 0)])
            y = _DoubleConv(c, self.dtype, self.axis_name, name=name)(
                jnp.concatenate([skip, y.astype(skip.dtype)], axis=-1), train
            )
        return Conv(self.num_classes, 1, padding=0, dtype=self.dtype, name="outc")(y)


def torch_spec():
    """``(flax_path, torch_prefix, kind)`` for :class:`Unet`."""
    blocks = [("inc", "inc.conv.conv")]
    blocks += [(n, f"{n}.mpconv.1.conv") for n, _ in _DOWN]
    blocks += [(n, f"{n}.conv.conv") for n, _ in _UP]
    spec = []
    for f, t in blocks:
        for i, (conv, bn) in enumerate(((0, 1), (3, 4))):
            spec += [
                (f"{f}/conv_{i}", f"{t}.{conv}", "conv"),
                (f"{f}/bn_{i}", f"{t}.{bn}", "batch_norm"),
            ]
    spec.append(("outc", "outc.conv", "conv"))
    return spec


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` of :class:`Unet` from the original's.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path. ``in_channels`` and
    ``num_classes`` are read from the shapes unless given; a missing, unexpected or mis-shaped
    key raises ``ValueError`` naming it.
    """
    sd = _medzoo.read(state_dict)
    model_kwargs.setdefault(
        "in_channels", _medzoo.weight_shape(sd, "inc.conv.conv.0.weight", "Unet")[1]
    )
    model_kwargs.setdefault("num_classes", _medzoo.weight_shape(sd, "outc.conv.weight", "Unet")[0])
    model = Unet(**model_kwargs)
    shape = (1, 16, 16, model.in_channels)
    return _medzoo.load(model, sd, torch_spec(), shape, name="Unet")
