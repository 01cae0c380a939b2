"""MedicalZoo's ``RESNET3DVAE``: Myronenko's (2018) encoder-decoder with a VAE regulariser.

A port of ``lib/medzoo/ResNet3D_VAE.py``: a GroupNorm(8) residual encoder (32-64-128-256), a
segmentation decoder, and a VAE branch that reconstructs the input from a 128-d latent. Its
loss is :func:`medjax.losses.vae.vae_loss`. :func:`load_torch_state_dict` imports a checkpoint
of the original (its own key names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import _medzoo
from medjax.nn.layers import Conv, Dropout, upsample
from medjax.nn.norm import GroupNorm

__all__ = ["ResNet3dVAE", "load_torch_state_dict", "torch_spec"]

Dtype = Any

_LATENT = 128  # half of linear_1's 256 outputs
_VAE_CHANNELS = 16  # the VAE's encoder channels


def _gn(name):
    return GroupNorm(num_groups=8, epsilon=1e-5, name=name)


class _GreenBlock(nn.Module):
    """``h = ReLU(GN(conv(ReLU(GN(x)))))``; returns ``conv_3(h) + h`` (the original's residual).

    Children ``norm_1``, ``conv_2``, ``norm_2``, ``conv_3``; channels unchanged.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = nn.relu(_gn("norm_1")(x))
        h = Conv(c, 3, padding=1, dtype=self.dtype, name="conv_2")(h)
        h = nn.relu(_gn("norm_2")(h))
        return Conv(c, 3, padding=1, dtype=self.dtype, name="conv_3")(h) + h


class _UpBlock2(nn.Module):
    """conv 1^3 (bias) *then* nearest x2: ``conv_1``."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return upsample(Conv(self.features, 1, padding=0, dtype=self.dtype, name="conv_1")(x), 2)


def _conv3(features, name, dtype, strides=1):
    return Conv(features, 3, strides=strides, padding=1, dtype=dtype, name=name)


class ResNet3dVAE(nn.Module):
    """Myronenko's network: ``(B, *dim, in_channels) -> (y, vae_out, mu, logvar)``.

    Returns, in the original's order: ``y`` segmentation logits ``(B, *dim, num_classes)``,
    ``vae_out`` the reconstruction ``(B, *dim, in_channels)``, ``mu`` and ``logvar``
    ``(B, 128)``. The input's spatial shape must equal ``dim`` and ``dim`` must be multiples of
    16 (the VAE's linear layers are sized from it); ``ValueError`` otherwise.

    As the original: GroupNorm(8) everywhere; every conv and linear has a bias; GreenBlock's
    residual adds its own post-GN-ReLU activation, not its input (``conv_3(h) + h``), kept so
    that checkpoints behave as trained; channel dropout (``Dropout3d``, ``dropout_rate`` 0.2, rng
    collection ``"dropout"``) after the first conv; UpBlock2 is conv 1^3 then nearest x2. The VAE
    branch flattens the 16-channel code in the original's ``(C, D, H, W)`` order and reshapes the
    decoded vector back as channel-first, so ``linear_1``/``linear_vu`` import unchanged.
    The original's unused ``UpBlock1`` is not built (it has no parameters in the model), nor its
    never-used ``norm="batch"`` GreenBlock option. ``dropout_rate`` is a medjax field (0: off).

    Deviation: the original samples ``z = mu + eps * exp(logvar / 2)`` with fresh noise on every
    call, so its ``vae_out`` is random even in evaluation. Here ``train=False`` decodes the mean
    (``z = mu``, deterministic); ``train=True`` samples ``eps`` from the rng collection ``"vae"``
    (``apply(..., rngs={"vae": key, "dropout": key2})``).
    """

    in_channels: int = 2
    num_classes: int = 4
    dim: Sequence[int] = (32, 32, 32)
    dropout_rate: float = 0.2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        dim = tuple(int(d) for d in self.dim)
        if len(dim) != 3 or any(d % 16 or d < 16 for d in dim):
            raise ValueError(f"dim: ResNet3dVAE needs 3 positive multiples of 16, got {self.dim}")
        spatial = _medzoo.check_input("ResNet3dVAE", x, ndim=3, channels=self.in_channels)
        if spatial != dim:
            raise ValueError(
                f"x: ResNet3dVAE was built for dim={dim}; the input's spatial shape must equal "
                f"it, got {spatial}"
            )
        dt = self.dtype
        # Encoder
        h = _conv3(32, "encoder_blue_1", dt)(x)
        h = Dropout(self.dropout_rate, channelwise=True, name="encoder_drop")(h, train)
        x1 = _GreenBlock(dt, name="encoder_green_1")(h)
        h = _conv3(64, "encoder_down_1", dt, strides=2)(x1)
        x2 = _GreenBlock(dt, name="encoder_green_2_2")(_GreenBlock(dt, name="encoder_green_2_1")(h))
        h = _conv3(128, "encoder_down_2", dt, strides=2)(x2)
        x3 = _GreenBlock(dt, name="encoder_green_3_2")(_GreenBlock(dt, name="encoder_green_3_1")(h))
        h = _conv3(256, "encoder_down_3", dt, strides=2)(x3)
        for i in (1, 2, 3, 4):
            h = _GreenBlock(dt, name=f"encoder_green_4_{i}")(h)
        x4 = h
        # Segmentation decoder
        h = _UpBlock2(128, dt, name="decoder_up_1")(x4)
        h = _GreenBlock(dt, name="decoder_green_1")(h + x3)
        h = _UpBlock2(64, dt, name="decoder_up_2")(h)
        h = _GreenBlock(dt, name="decoder_green_2")(h + x2)
        h = _UpBlock2(32, dt, name="decoder_up_3")(h)
        h = _GreenBlock(dt, name="decoder_green_3")(h + x1)
        y = _conv3(self.num_classes, "decoder_blue", dt)(h)
        # VAE branch
        b = x.shape[0]
        code = _conv3(_VAE_CHANNELS, "vae_VD_conv", dt, strides=2)(nn.relu(_gn("vae_VD_norm")(x4)))
        flat = jnp.moveaxis(code, -1, 1).reshape(b, -1)  # the original's (C, D, H, W) order
        stats = nn.Dense(2 * _LATENT, dtype=dt, name="vae_linear_1")(flat)
        mu, logvar = stats[:, :_LATENT], stats[:, _LATENT:]
        if train:
            eps = jax.random.normal(self.make_rng("vae"), mu.shape, mu.dtype)
            z = mu + eps * jnp.exp(0.5 * logvar)
        else:
            z = mu
        small = tuple(d // 16 for d in dim)
        v = nn.Dense(
            code.shape[-1] * small[0] * small[1] * small[2], dtype=dt, name="vae_linear_vu"
        )(z)
        v = jnp.moveaxis(v.reshape((b, code.shape[-1]) + small), 1, -1)
        v = _UpBlock2(256, dt, name="vae_VU")(nn.relu(v))
        for i, c in ((2, 128), (1, 64), (0, 32)):
            v = _UpBlock2(c, dt, name=f"vae_Vup{i}")(v)
            v = _GreenBlock(dt, name=f"vae_Vblock{i}")(v)
        vae_out = _conv3(self.in_channels, "vae_Vend", dt)(v)
        return y, vae_out, mu, logvar


def _green_spec(flax_path, torch_prefix):
    return [
        (f"{flax_path}/norm_1", f"{torch_prefix}.layer_1.0", "norm_affine"),
        (f"{flax_path}/conv_2", f"{torch_prefix}.layer_2.0", "conv"),
        (f"{flax_path}/norm_2", f"{torch_prefix}.layer_2.1", "norm_affine"),
        (f"{flax_path}/conv_3", f"{torch_prefix}.conv_3", "conv"),
    ]


def torch_spec():
    """``(flax_path, torch_prefix, kind)`` for :class:`ResNet3dVAE` (any ``dim``: names only)."""
    spec = [("encoder_blue_1", "encoder.blue_1.conv", "conv")]
    greens = ["green_1", "green_2_1", "green_2_2", "green_3_1", "green_3_2"]
    greens += [f"green_4_{i}" for i in (1, 2, 3, 4)]
    spec += [x for g in greens for x in _green_spec(f"encoder_{g}", f"encoder.{g}")]
    spec += [(f"encoder_down_{i}", f"encoder.down_{i}.conv", "conv") for i in (1, 2, 3)]
    for i in (1, 2, 3):
        spec.append((f"decoder_up_{i}/conv_1", f"decoder.up_{i}.conv_1", "conv"))
        spec += _green_spec(f"decoder_green_{i}", f"decoder.green_{i}")
    spec.append(("decoder_blue", "decoder.blue.conv", "conv"))
    spec += [
        ("vae_VD_norm", "vae.VD.0", "norm_affine"),
        ("vae_VD_conv", "vae.VD.2", "conv"),
        ("vae_linear_1", "vae.linear_1", "linear"),
        ("vae_linear_vu", "vae.linear_vu", "linear"),
        ("vae_VU/conv_1", "vae.VU.1.conv_1", "conv"),
    ]
    for i in (2, 1, 0):
        spec.append((f"vae_Vup{i}/conv_1", f"vae.Vup{i}.conv_1", "conv"))
        spec += _green_spec(f"vae_Vblock{i}", f"vae.Vblock{i}")
    spec.append(("vae_Vend", "vae.Vend.conv", "conv"))
    return spec


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params": ...}`` of :class:`ResNet3dVAE` from the original's.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path. ``in_channels`` and
    ``num_classes`` are read from the shapes unless given; ``dim`` is read from
    ``vae.linear_1``'s input size (``16 (D/16)^3``) as a cube unless given (a non-cubic ``dim``
    must be passed). A missing, unexpected or mis-shaped key raises ``ValueError`` naming it.
    """
    sd = _medzoo.read(state_dict)
    name = "ResNet3dVAE"
    model_kwargs.setdefault(
        "in_channels", _medzoo.weight_shape(sd, "encoder.blue_1.conv.weight", name)[1]
    )
    model_kwargs.setdefault(
        "num_classes", _medzoo.weight_shape(sd, "decoder.blue.conv.weight", name)[0]
    )
    if "dim" not in model_kwargs:
        n = _medzoo.weight_shape(sd, "vae.linear_1.weight", name)[1] // _VAE_CHANNELS
        side = round(n ** (1 / 3))
        if side**3 * _VAE_CHANNELS != _medzoo.weight_shape(sd, "vae.linear_1.weight", name)[1]:
            raise ValueError(
                f"{name} checkpoint: vae.linear_1 takes {n * _VAE_CHANNELS} inputs, which is not "
                "16 (D/16)^3 for a cubic dim; pass dim=(D, H, W)"
            )
        model_kwargs["dim"] = (16 * side,) * 3
    model = ResNet3dVAE(**model_kwargs)
    shape = (1, *model.dim, model.in_channels)
    return _medzoo.load(model, sd, torch_spec(), shape, name=name)
