"""Joint brain registration + tumour segmentation (Estienne et al. 2020, Front. Comput. Neurosci.).

One V-Net-like encoder is applied separately to the moving image S and the fixed image R. A shared
segmentation decoder segments each image; a registration decoder reads the per-level merge of the two
encodings (S - R by default, or their concatenation) and predicts Phi in (0,1)^3, the spatial gradient
of the sampling grid (Christodoulidis et al. 2018). The grid is integrated with
``medjax.ops.integrate_gradients`` (Phi = 0.5 is exactly the identity; the original Keras code's
one-voxel offset is available with ``original_offset=True``), and the moving image and its predicted
segmentation probabilities are warped with ``medjax.ops.warp`` (border padding: the original clamped
indices but not weights, so it extrapolated out of range).

``SegmentationNet`` is the segmentation-only baseline (same encoder + segmentation decoder), the V-Net
the paper compares its segmentation against.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax import ops
from medjax.nn import conv
from medjax.nn.blocks import ConvAct, ResidualDecoder, ResidualEncoder

Dtype = Any
MERGES = ("subtract", "concat")


def _check_image(name, x, channels):
    if x.ndim < 3:
        raise ValueError(f"{name}: expected (B, *spatial, C), got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[-1]}")


class SegmentationNet(nn.Module):
    """Segmentation-only V-Net baseline: ``(B, *S, n_modalities) -> {"logits", "probs"}: (B, *S, n_classes)``."""

    f: int = 8
    multipliers: Sequence[int] = (1, 2, 4, 8, 16)
    enc_convs: Sequence[int] = (1, 2, 3, 3, 3)
    dec_convs: Sequence[int] = (3, 3, 2, 1)
    n_modalities: int = 4
    n_classes: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image, *, train: bool = False):
        del train  # no dropout or normalisation layers
        _check_image("image", image, self.n_modalities)
        widths = tuple(self.f * m for m in self.multipliers)
        skips = ResidualEncoder(widths, self.enc_convs, dtype=self.dtype, name="encoder")(image)
        feats = ResidualDecoder(widths, self.dec_convs, dtype=self.dtype, name="seg_decoder")(skips)
        logits = ConvAct(self.n_classes, 1, act=None, dtype=self.dtype, name="seg_head")(feats)
        logits = logits.astype(jnp.float32)
        return {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1)}


class JointRegSeg(nn.Module):
    """Joint registration + segmentation network.

    ``__call__(moving (B, *S, n_modalities), fixed (B, *S, n_modalities), *, train)`` returns a dict:

    - ``phi`` (B, *S, ndim): grid gradient in (0,1); 0.5 is the identity;
    - ``displacement`` (B, *S, ndim): voxel displacement (grid - identity);
    - ``warped`` (B, *S, n_modalities): moving image warped onto fixed;
    - ``seg_moving``/``seg_fixed`` (B, *S, n_classes): softmax probabilities (``*_logits`` too);
    - ``warped_seg`` (B, *S, n_classes): moving segmentation probabilities warped onto fixed.

    Spatial sizes must be divisible by ``2**(len(multipliers)-1)`` (16 by default).
    """

    f: int = 8
    multipliers: Sequence[int] = (1, 2, 4, 8, 16)
    enc_convs: Sequence[int] = (1, 2, 3, 3, 3)
    dec_convs: Sequence[int] = (3, 3, 2, 1)
    n_modalities: int = 4
    n_classes: int = 4
    merge: str = "subtract"
    original_offset: bool = False
    #: the registration head's kernel init: normal(phi_init_std), so that Phi starts at 0.5 (the
    #: identity) up to ~1e-5; ``phi_init_std=None`` uses Keras's glorot-uniform, as the original
    phi_init_std: float | None = 1e-5
    #: Phi's step around the identity (``medjax.ops.integrate_gradients``); 1.0 is the paper's
    step_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, moving, fixed, *, train: bool = False):
        del train  # no dropout or normalisation layers
        if self.merge not in MERGES:
            raise ValueError(f"merge: expected one of {MERGES}, got {self.merge!r}")
        _check_image("moving", moving, self.n_modalities)
        _check_image("fixed", fixed, self.n_modalities)
        if moving.shape != fixed.shape:
            raise ValueError(
                f"fixed: expected the moving image's shape {tuple(moving.shape)}, got {tuple(fixed.shape)}"
            )
        ndim = moving.ndim - 2
        widths = tuple(self.f * m for m in self.multipliers)

        encoder = ResidualEncoder(widths, self.enc_convs, dtype=self.dtype, name="encoder")
        seg_decoder = ResidualDecoder(widths, self.dec_convs, dtype=self.dtype, name="seg_decoder")
        seg_head = ConvAct(self.n_classes, 1, act=None, dtype=self.dtype, name="seg_head")

        skips_s = encoder(moving)
        skips_r = encoder(fixed)
        logits_s = seg_head(seg_decoder(skips_s)).astype(jnp.float32)
        logits_r = seg_head(seg_decoder(skips_r)).astype(jnp.float32)

        if self.merge == "subtract":
            merged = [s - r for s, r in zip(skips_s, skips_r, strict=True)]
        else:
            merged = [
                jnp.concatenate([s, r], axis=-1) for s, r in zip(skips_s, skips_r, strict=True)
            ]
        # Same decoder widths for both merges: concatenation only widens the decoder's inputs.
        reg_feats = ResidualDecoder(widths, self.dec_convs, dtype=self.dtype, name="reg_decoder")(
            merged
        )
        phi_logits = nn.Conv(
            ndim,
            (1,) * ndim,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=(
                nn.initializers.glorot_uniform()
                if self.phi_init_std is None
                else nn.initializers.normal(self.phi_init_std)
            ),
            bias_init=nn.initializers.zeros,
            name="reg_head",
            conv_general_dilated=conv.conv_general_dilated,
        )(reg_feats)
        phi = jax.nn.sigmoid(phi_logits.astype(jnp.float32))

        grid = ops.integrate_gradients(
            phi, original_offset=self.original_offset, step_scale=self.step_scale
        )
        displacement = ops.grid_to_displacement(grid)
        seg_s = jax.nn.softmax(logits_s, axis=-1)
        warped = ops.warp(moving.astype(jnp.float32), displacement, order=1, padding="border")
        warped_seg = ops.warp(seg_s, displacement, order=1, padding="border")
        return {
            "phi": phi,
            "displacement": displacement,
            "warped": warped,
            "seg_moving_logits": logits_s,
            "seg_fixed_logits": logits_r,
            "seg_moving": seg_s,
            "seg_fixed": jax.nn.softmax(logits_r, axis=-1),
            "warped_seg": warped_seg,
        }
