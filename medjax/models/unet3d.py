"""MedicalZoo's ``UNET3D``: Isensee et al.'s 2017 modified 3D U-Net (``lib/medzoo/Unet3D.py``).

Residual context modules with instance norm and leaky ReLU (0.01), nearest-neighbour upscaling,
and deep supervision summed into the logits. :func:`load_torch_state_dict` imports a checkpoint
of the original (its own key names).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import _medzoo
from medjax.nn.layers import Conv, Dropout, leaky_relu, upsample
from medjax.nn.norm import InstanceNorm

__all__ = ["UNet3D", "load_torch_state_dict", "torch_spec"]

Dtype = Any

_lrelu = leaky_relu(0.01)


def _inorm(x):
    return InstanceNorm(epsilon=1e-5)(x)


class UNet3D(nn.Module):
    """Modified 3D U-Net: ``(B, D, H, W, in_channels) -> logits (B, D, H, W, num_classes)``.

    Spatial sizes must be multiples of 16 with more than one voxel at 1/16 resolution (so 32^3 is
    the smallest cube): the level-5 instance norm needs more than one voxel, and the original
    fails at a concatenation otherwise. ``ValueError`` names the constraint.

    The same as the original, kept so that its checkpoints import:

    - every level 2-5 applies **the same** ``norm_lrelu_conv_cX`` (IN, LReLU, conv) twice, with
      one set of weights, around a channel dropout (``Dropout3d``, ``dropout_rate`` 0.6);
    - level 1's context is taken *before* the instance norm (``LReLU(sum)``);
    - the upscale blocks are IN, LReLU, nearest x2, *then* the 3^3 conv, IN, LReLU;
    - logits = ``conv3d_l4`` output + up2(up2(ds2_1x1(ds2)) + ds3_1x1(ds3)) (deep supervision
      summed in; both up2 are nearest x2); no softmax (the original builds a Softmax and a Sigmoid
      and never calls them; they have no parameters).

    All 26 convolutions have no bias; instance norm has no affine parameters (eps 1e-5, biased
    variance, in evaluation too), so ``train`` changes dropout only (rng collection
    ``"dropout"``). ``dropout_rate`` is a medjax field (the original fixes p = 0.6; 0 turns
    dropout off). Submodules carry the original's attribute names (``conv3d_c1_1``,
    ``norm_lrelu_conv_c2``, ...).
    """

    in_channels: int = 2
    num_classes: int = 4
    base_n_filter: int = 8
    dropout_rate: float = 0.6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        spatial = _medzoo.check_input(
            "UNet3D", x, ndim=3, channels=self.in_channels, multiple=16, min_size=16
        )
        if all(s == 16 for s in spatial):
            raise ValueError(
                f"x: UNet3D needs more than one voxel at 1/16 resolution (the level-5 instance "
                f"norm), so at least one spatial size >= 32, got {spatial}"
            )
        f = self.base_n_filter

        def conv(features, name, kernel=3, strides=1):
            return Conv(
                features,
                kernel,
                strides=strides,
                padding=kernel // 2,
                use_bias=False,
                dtype=self.dtype,
                name=name,
            )

        def dropout(y):
            return Dropout(self.dropout_rate, channelwise=True)(y, train)

        def upscale(y, features, name):
            y = upsample(_lrelu(_inorm(y)), 2)
            return _lrelu(_inorm(conv(features, name)(y)))

        # Level 1
        out = conv(f, "conv3d_c1_1")(x)
        residual = out
        out = dropout(conv(f, "conv3d_c1_2")(_lrelu(out)))
        out = conv(f, "lrelu_conv_c1")(_lrelu(out)) + residual
        contexts = [_lrelu(out)]
        out = _lrelu(_inorm(out))
        # Levels 2-5: one norm_lrelu_conv applied twice (shared weights)
        for level, mult in ((2, 2), (3, 4), (4, 8), (5, 16)):
            out = conv(f * mult, f"conv3d_c{level}", strides=2)(out)
            residual = out
            shared = conv(f * mult, f"norm_lrelu_conv_c{level}")
            out = dropout(shared(_lrelu(_inorm(out))))
            out = shared(_lrelu(_inorm(out))) + residual
            if level < 5:
                out = _lrelu(_inorm(out))
                contexts.append(out)
        out = upscale(out, f * 8, "norm_lrelu_upscale_conv_norm_lrelu_l0")
        out = _lrelu(_inorm(conv(f * 8, "conv3d_l0", kernel=1)(out)))
        # Localization pathway
        ds = []
        for level, mult in ((1, 16), (2, 8), (3, 4)):
            out = jnp.concatenate([out, contexts[4 - level]], axis=-1)
            out = _lrelu(_inorm(conv(f * mult, f"conv_norm_lrelu_l{level}")(out)))
            ds.append(out)
            out = conv(f * mult // 2, f"conv3d_l{level}", kernel=1)(out)
            out = upscale(out, f * mult // 4, f"norm_lrelu_upscale_conv_norm_lrelu_l{level}")
        out = jnp.concatenate([out, contexts[0]], axis=-1)
        out = _lrelu(_inorm(conv(f * 2, "conv_norm_lrelu_l4")(out)))
        out_pred = conv(self.num_classes, "conv3d_l4", kernel=1)(out)
        # Deep supervision (ds[1] is ds2 at 1/4 resolution, ds[2] is ds3 at 1/2)
        ds2 = conv(self.num_classes, "ds2_1x1_conv3d", kernel=1)(ds[1])
        ds3 = conv(self.num_classes, "ds3_1x1_conv3d", kernel=1)(ds[2])
        return out_pred + upsample(upsample(ds2, 2) + ds3, 2)


def torch_spec():
    """``(flax_path, torch_prefix, kind)`` for :class:`UNet3D` (any widths: only names matter)."""
    names = ["conv3d_c1_1", "conv3d_c1_2"]
    names += [f"conv3d_c{i}" for i in range(2, 6)] + [f"conv3d_l{i}" for i in range(5)]
    names += ["ds2_1x1_conv3d", "ds3_1x1_conv3d"]
    spec = [(n, n, "conv") for n in names]
    spec.append(("lrelu_conv_c1", "lrelu_conv_c1.1", "conv"))
    spec += [(f"norm_lrelu_conv_c{i}", f"norm_lrelu_conv_c{i}.2", "conv") for i in range(2, 6)]
    spec += [(f"conv_norm_lrelu_l{i}", f"conv_norm_lrelu_l{i}.0", "conv") for i in range(1, 5)]
    spec += [
        (
            f"norm_lrelu_upscale_conv_norm_lrelu_l{i}",
            f"norm_lrelu_upscale_conv_norm_lrelu_l{i}.3",
            "conv",
        )
        for i in range(4)
    ]
    return spec


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params": ...}`` of :class:`UNet3D` from the original's ``state_dict``.

    ``state_dict``: a mapping, a ``.pt``/``.pth`` or an ``.npz`` path (``module.`` stripped).
    ``in_channels``, ``num_classes`` and ``base_n_filter`` are read from the weight shapes unless
    given in ``model_kwargs``; a missing, unexpected or mis-shaped key raises ``ValueError``.
    """
    sd = _medzoo.read(state_dict)
    o, i = _medzoo.weight_shape(sd, "conv3d_c1_1.weight", "UNet3D")[:2]
    model_kwargs.setdefault("in_channels", i)
    model_kwargs.setdefault("base_n_filter", o)
    model_kwargs.setdefault(
        "num_classes", _medzoo.weight_shape(sd, "conv3d_l4.weight", "UNet3D")[0]
    )
    model = UNet3D(**model_kwargs)
    shape = (1, 32, 32, 32, model.in_channels)
    return _medzoo.load(model, sd, torch_spec(), shape, name="UNet3D")
