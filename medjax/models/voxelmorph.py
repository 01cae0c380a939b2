"""VoxelMorph baseline (Balakrishnan et al. 2018/2019): unsupervised learning-based registration.

The moving and fixed images are concatenated on the channel axis and fed to a small U-Net (stride-2
3^d conv + LeakyReLU(0.2) encoder; conv, nearest x2 upsampling and skip concatenation decoder; extra
full-resolution convs). A 3^d conv head (init N(0, 1e-5)) predicts either a displacement field or a
stationary velocity field integrated by scaling and squaring (``medjax.ops.integrate_velocity``,
the "diffeomorphic" variant). The loss is an image similarity (MSE or local NCC) plus
``lam`` times the squared spatial gradient of the displacement.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax import ops
from medjax.nn import conv
from medjax.nn.blocks import ConvAct

Dtype = Any
FIELDS = ("displacement", "diffeomorphic")


def _lrelu(x):
    return nn.leaky_relu(x, 0.2)


def _upsample2(x):
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x


class VoxelMorph(nn.Module):
    """VoxelMorph U-Net: ``(moving, fixed): (B, *S, C) -> {"displacement", "warped", "velocity"}``.

    ``displacement`` (B, *S, ndim) in voxels; ``warped`` (B, *S, C); ``velocity`` is the raw head
    output (equal to the displacement when ``field="displacement"``). Spatial sizes must be divisible
    by ``2**len(enc_features)``. ``dec_features`` has at least ``len(enc_features)`` entries: one conv
    before each upsampling, the rest at full resolution.
    """

    enc_features: Sequence[int] = (16, 32, 32, 32)
    dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16)
    n_modalities: int = 1
    field: str = "displacement"
    int_steps: int = 7
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, moving, fixed, *, train: bool = False):
        del train
        if self.field not in FIELDS:
            raise ValueError(f"field: expected one of {FIELDS}, got {self.field!r}")
        if len(self.dec_features) < len(self.enc_features):
            raise ValueError(
                f"dec_features: expected at least {len(self.enc_features)} entries, got {len(self.dec_features)}"
            )
        for name, x in (("moving", moving), ("fixed", fixed)):
            if x.ndim < 3 or x.shape[-1] != self.n_modalities:
                raise ValueError(
                    f"{name}: expected (B, *spatial, {self.n_modalities}), got shape {tuple(x.shape)}"
                )
        if moving.shape != fixed.shape:
            raise ValueError(
                f"fixed: expected the moving image's shape {tuple(moving.shape)}, got {tuple(fixed.shape)}"
            )
        factor = 2 ** len(self.enc_features)
        if any(s % factor for s in moving.shape[1:-1]):
            raise ValueError(
                f"moving: expected spatial sizes divisible by {factor}, got {tuple(moving.shape[1:-1])}"
            )
        ndim = moving.ndim - 2

        x = jnp.concatenate([moving, fixed], axis=-1).astype(jnp.float32)
        skips = [x]
        for feat in self.enc_features:
            x = ConvAct(feat, 3, strides=2, act=_lrelu, dtype=self.dtype)(x)
            skips.append(x)
        n_up = len(self.enc_features)
        for i, feat in enumerate(self.dec_features):
            x = ConvAct(feat, 3, act=_lrelu, dtype=self.dtype)(x)
            if i < n_up:
                skip = skips[n_up - 1 - i]
                x = jnp.concatenate([_upsample2(x), skip.astype(x.dtype)], axis=-1)
        field = nn.Conv(
            ndim,
            (3,) * ndim,
            padding="SAME",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(1e-5),
            bias_init=nn.initializers.zeros,
            name="flow",
            conv_general_dilated=conv.conv_general_dilated,
        )(x).astype(jnp.float32)
        if self.field == "diffeomorphic":
            disp = ops.integrate_velocity(field, steps=self.int_steps)
        else:
            disp = field
        warped = ops.warp(moving.astype(jnp.float32), disp, order=1, padding="border")
        return {"displacement": disp, "warped": warped, "velocity": field}
