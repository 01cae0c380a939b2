"""FocusNetV2 (Gao et al., MedIA 2021): S-Net, SOL heatmaps, per-organ SOS zoom-in, shape autoencoder.

A port of ``yhygao/focusnet-v2`` (``model/net.py``, ``model/model.py``, ``model/AE3D.py``) that
imports its checkpoints. Channels-last ``(B, D, H, W, C)``; every network takes ``train``
(BatchNorm uses batch statistics then; call ``apply`` with ``mutable=["batch_stats"]``).

- :class:`FocusNetV2` is ``focus_net`` (``sol=True, sos=True``: S-Net + SOL + SOS), ``focus_net(...,
  SOSNet=False)`` (``sos=False``) or ``s_net`` (``sol=False, sos=False``).
- :class:`SOSBranch` is one organ's ``SOS_branch``; :class:`HeatmapHead` is ``heatmap_pred``;
  :class:`ConvAE` is the adversarial shape autoencoder.
- :func:`load_pytorch_weights` / :func:`focusnet_from_state_dict` import an original ``state_dict``
  (with or without DataParallel's ``module.``), detecting the network from its keys.

Parameter counts (``jax.eval_shape``; equal to the originals'): S-Net 1,963,114; S-Net + SOL
2,018,637 (heatmap head 55,523); each SOS branch 1,610,031; full FocusNetV2 6,848,730; ConvAE
31,148,801.

Differences from the original (each on purpose):

- **Per-sample crop centres.** ``SOSNet_sep.center_locate`` takes one argmax over the whole batch
  tensor and clamps it to a hard-coded 40x192x192 volume, so it is right only at batch 1 and that
  size. Here each sample's own heatmap peak is located (first maximum in C order, as
  ``torch.argmax``) and clamped to its own volume (:func:`locate_small_organs`,
  :func:`medjax.ops.crop_at`); at batch 1 and 40x192x192 this is the original's centre.
- **Only the image is cropped.** The original crops and concatenates ``feature_map`` (32), ``o1``
  (32), the organ's heatmap (1) and the raw image (1), but ``SOS_branch`` reads only channel -1,
  the raw image (its last channel). Only ``x[..., -1:]`` is cropped here; the result is the same
  (with ``in_channels > 1`` that is the last input channel, as in the original).
- **Organs are a ``vmap`` axis**: the branches' parameters are stacked along a leading organ axis
  (``params/SOS/...`` has shape ``(n_small, ...)``); the checkpoint's ``SOS.SOS_module.{i}`` entries
  stack into it on import.
- **Outputs.** Always a dict (``s_net`` returned the bare logits tensor). ``small_result`` is
  ``(B, n_small, *crop_size, 1)`` and ``location`` an int32 array ``(B, n_small, 3)`` of clamped
  crop centres (z, h, w) (the original: a list of 3 Python tuples). ``small_label`` is not returned
  (the model takes no labels); :func:`crop_small_labels` cuts the same crops out of a label map.
  ``refined``/``refined_mask`` are new (:func:`paste_small_organs`): the original pastes the
  crops only in its validation script (``focusnet_validation.py``), into a separate small-organ
  map (``sigmoid > 0.5`` gives labels 2, 4, 5) that is scored on its own.
- **Refinement** (``refined``): inside organ j's box, the logit of its class L_j is replaced by
  ``max_{c != L_j} logits_c + s_j``, where ``s_j`` is the crop's 1-channel logit. So the organ's
  class wins exactly where ``sigmoid(s_j) > 0.5`` (the original's validation threshold) and loses to
  the best other class elsewhere in the box; the other classes' logits are untouched, and the
  softmax odds of L_j against the best other class are ``exp(s_j)``. Organs are pasted in order, so
  where two boxes overlap and both organs are present the later organ wins (the validation script
  also writes organs 2, 4, 5 in that order). With ``heatmap_threshold`` (0.6 at inference, as the
  validation script's ``max() > 0.6``; ``SOSNet_sep.threshold`` is stored but never read), an
  organ whose heatmap peak is not above it is not pasted; ``refined_mask (B, n_small)`` says which
  were. The threshold may also be given per call (``apply(..., heatmap_threshold=t)``, a traced
  scalar under ``jit``); its crop is still computed and returned in ``small_result``.
- **No gradient into the centre choice**: the heatmap is ``stop_gradient``-ed before the argmax and
  the crop is ``stop_gradient``-ed (the original detaches every crop).
- The unused ``se`` flag (SE is always on in the original) and ``SOSNet_sep``'s unused ``in_ch``
  are dropped; ``focus_net``'s ``detach`` option (never set by the scripts) is ``detach_heatmap``.
  ``norm="instance"`` gives ``norm='in'`` (2,014,157 params with SOL; the heatmap head keeps its
  hard-coded BatchNorm). ``norm='gn'`` fails in the original (``NUM_GROUP`` undefined); any medjax
  norm builds here, but only 'batch' and 'instance' checkpoints import.
- :class:`ConvAE` checks its input is exactly ``(B, 8, 64, 64, 1)`` (the original silently accepts a
  few other sizes whose flattening happens to give 16,384 features); its ``encode`` takes 5-D input
  (the original's unpacks 4 dims and fails).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models import torch_import
from medjax.nn.blocks import ResidualBlock
from medjax.nn.conv import canonical_gradients
from medjax.nn.dense import DenseASPP
from medjax.nn.layers import Conv, max_pool, upsample
from medjax.nn.norm import BatchNorm
from medjax.ops.crop import box_starts, crop_at, paste_at

__all__ = [
    "ConvAE",
    "FocusNetV2",
    "HeatmapHead",
    "SOSBranch",
    "SOSBranches",
    "crop_small_labels",
    "focusnet_from_state_dict",
    "load_pytorch_weights",
    "locate_small_organs",
    "paste_small_organs",
    "torch_spec",
]

Dtype = Any
SMALL_ORGANS = (2, 4, 5)  # PDDCA: chiasm, optic nerve L, optic nerve R
_BATCH_NAMES = ("batch", "bn")
_INSTANCE_NAMES = ("instance", "in")


# ------------------------------------------------------------------------------------------------
# Checks


def _check_volume(name, x, channels, net):
    """Raise unless ``x`` is ``(B, D, H, W, channels)`` with D even and H, W multiples of 4."""
    shape = tuple(x.shape)
    if len(shape) != 5:
        raise ValueError(f"{name}: {net} expects (B, D, H, W, C), got shape {shape}")
    if channels is not None and shape[-1] != channels:
        raise ValueError(
            f"{name}: {net} was built for {channels} input channels, got {shape[-1]} (shape {shape})"
        )
    d, h, w = shape[1:4]
    if d % 2 or h % 4 or w % 4 or min(d, h, w) < 1:
        raise ValueError(
            f"{name}: {net} needs D even and H, W multiples of 4 (pools (1,2,2) then (2,2,2)), "
            f"got spatial shape {(d, h, w)}"
        )
    return d, h, w


def _check_crop_size(crop_size):
    size = tuple(int(s) for s in crop_size)
    if len(size) != 3 or size[0] % 2 or size[1] % 4 or size[2] % 4 or min(size) < 1:
        raise ValueError(
            "crop_size: expected (D, H, W) with D even and H, W multiples of 4 (the SOS branch's "
            f"pools), got {tuple(crop_size)}"
        )
    return size


def _widths(value, n, name):
    widths = tuple(int(w) for w in value)
    if len(widths) != n or min(widths) < 1:
        raise ValueError(f"{name}: expected {n} positive channel counts, got {tuple(value)}")
    return widths


def _with_axis_name(norm, axis_name):
    """``norm`` with BatchNorm statistics synchronised over ``axis_name`` (names 'batch'/'bn' only)."""
    if axis_name is None:
        return norm
    if isinstance(norm, str) and norm.lower() in _BATCH_NAMES:
        return functools.partial(BatchNorm, axis_name=axis_name)
    return norm


# ------------------------------------------------------------------------------------------------
# Blocks


def _se_block(features, name, *, norm, reduction=2, kernel_size=3, dilation=1, dtype=jnp.float32):
    """``SEBasicBlock``: pre-activation, SE, no activation after the add; conv2 carries the dilation."""
    return ResidualBlock(
        features,
        kernel_size=kernel_size,
        dilations=(1, dilation),
        norm=norm,
        preact=True,
        se_reduction=reduction,
        dtype=dtype,
        name=name,
    )


class InConv(nn.Module):
    """``inconv``: conv (1,3,3) (no bias) + ReLU, then an SE block (1,3,3) with SE reduction 4."""

    features: int
    norm: Any = "batch"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(
            self.features,
            (1, 3, 3),
            padding=(0, 1, 1),
            use_bias=False,
            dtype=self.dtype,
            name="conv1",
        )(x)
        x = nn.relu(x)
        block = _se_block(
            self.features,
            "conv2",
            norm=self.norm,
            reduction=4,
            kernel_size=(1, 3, 3),
            dtype=self.dtype,
        )
        return block(x, train)


class UpBlock(nn.Module):
    """``up_block``: trilinear (align_corners) upsampling of ``x``, concat ``[skip, up]``, SE block."""

    features: int
    scale: tuple = (2, 2, 2)
    norm: Any = "batch"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip, train: bool = False):
        x = upsample(x, self.scale, mode="linear", align_corners=True)
        x = jnp.concatenate([skip.astype(x.dtype), x], axis=-1)
        return _se_block(self.features, "block", norm=self.norm, dtype=self.dtype)(x, train)


class HeatmapHead(nn.Module):
    """``heatmap_pred`` (SOL-Net): ``(B, *S, C) -> (B, *S, features)`` heatmaps after a sigmoid.

    BN-ReLU-conv3 (no bias), BN-ReLU-conv3 (no bias), conv1 (bias), sigmoid. The BatchNorms are
    hard-coded in the original whatever its ``norm`` (55,523 parameters for 32 -> 3); ``axis_name``
    synchronises their statistics over a ``pmap`` axis.
    """

    features: int = 3
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        for i in (1, 2):
            x = nn.relu(BatchNorm(axis_name=self.axis_name, name=f"bn{i}")(x, train=train))
            x = Conv(c, 3, padding=1, use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
        x = Conv(self.features, 1, padding=0, dtype=self.dtype, name="conv3")(x)
        return nn.sigmoid(x.astype(jnp.float32))


def _stage(x, name, features, n_blocks, train, *, norm, dilation=1, dtype=jnp.float32):
    """``_make_layer``: ``n_blocks`` SE blocks named ``{name}_0``, ``{name}_1``, ..."""
    for i in range(n_blocks):
        x = _se_block(features, f"{name}_{i}", norm=norm, dilation=dilation, dtype=dtype)(x, train)
    return x


class SOSBranch(nn.Module):
    """``SOS_branch``: one small organ's segmenter, ``(B, D, H, W, C) -> (B, D, H, W, num_classes)`` logits.

    Reads only the last input channel (the raw image; the original is fed 66 channels and slices
    ``x[:, -1:]``). inconv 1->24, 2 blocks 24->32 (o1), maxpool (1,2,2), 2 blocks 32->48 (o2),
    maxpool (2,2,2), 2 blocks 48->64 (no dilated stage), DenseASPP dilations (1,3,3), (1,5,5),
    (1,7,7), (1,9,9), up to o2 and o1 with the literal 3^3 convs, 1x1 ``out_conv``. Size-agnostic:
    D even, H and W multiples of 4. 1,610,031 parameters at the original's widths: ``features``
    (inconv, o1, o2, o3) = (24, 32, 48, 64) and ``aspp_features`` (1x1 reduction, growth) = (64, 32);
    smaller widths give a lighter branch of the same layout (not importable from the original).
    """

    num_classes: int = 1
    norm: Any = "batch"
    features: Sequence[int] = (24, 32, 48, 64)
    aspp_features: Sequence[int] = (64, 32)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        # Vmapped over the organs (SOSBranches), a convolution with per-organ weights becomes one
        # grouped convolution, whose gradient XLA:CPU runs 4-6x slower than the organs' one by one
        # (benchmarks/models.py: the whole FocusNetV2 step 61 s against S-Net's 21 s at
        # 16x128x128); written as forward-form convolutions, it runs as fast as separate ones.
        with canonical_gradients():
            return self._branch(x, train)

    def _branch(self, x, train):
        _check_volume("x", x, None, "SOSBranch")
        f0, f1, f2, f3 = _widths(self.features, 4, "features")
        mid, growth = _widths(self.aspp_features, 2, "aspp_features")
        kw = dict(norm=self.norm, dtype=self.dtype)
        x = InConv(f0, name="share_conv1x", **kw)(x[..., -1:], train)
        o1 = _stage(x, "share_conv1x_2", f1, 2, train, **kw)
        o2 = _stage(max_pool(o1, (1, 2, 2)), "share_conv2x", f2, 2, train, **kw)
        o3 = _stage(max_pool(o2, (2, 2, 2)), "share_conv4x", f3, 2, train, **kw)
        feat = DenseASPP(
            (3, 5, 7, 9), mid, growth, norm=self.norm, dtype=self.dtype, name="share_aspp"
        )(o3, train)
        lit1 = Conv(f2, 3, padding=1, dtype=self.dtype, name="share_literal1")(o2)
        out = UpBlock(f2, (2, 2, 2), name="share_up1", **kw)(feat, lit1, train)
        lit2 = Conv(f1, 3, padding=1, dtype=self.dtype, name="share_literal2")(o1)
        out = UpBlock(f1, (1, 2, 2), name="share_up2", **kw)(out, lit2, train)
        return Conv(self.num_classes, 1, padding=0, dtype=self.dtype, name="out_conv")(out)


#: All organs' SOS branches as one module, the organs a ``vmap`` axis: called as
#: ``SOSBranches(num_classes, norm=..., features=..., aspp_features=...)(crops, train)`` on crops
#: ``(n_small, B, *crop, C) -> (n_small, B, *crop, num_classes)`` logits, with every parameter and
#: BatchNorm statistic stacked along a leading organ axis. :class:`FocusNetV2` holds one under
#: ``SOS``; on its own (e.g. to train the branches on crops with S-Net frozen) its variables are
#: exactly FocusNetV2's ``params/SOS`` and ``batch_stats/SOS`` subtrees.
SOSBranches = nn.vmap(
    SOSBranch,
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(0, None),
    out_axes=0,
)


# ------------------------------------------------------------------------------------------------
# Small-organ localisation


def locate_small_organs(heatmap, crop_size):
    """Crop centres ``(B, n, 3)`` int32 and heatmap peaks ``(B, n)`` from heatmaps ``(B, D, H, W, n)``.

    Each sample's and organ's centre is its own heatmap argmax (the first maximum in (z, h, w)
    order, as ``torch.argmax``), clamped so that the ``crop_size`` box lies inside the volume: the
    original's ``[h, S - h]`` clamp with ``h = crop_size // 2``, per sample instead of once for the
    batch against a hard-coded 40x192x192. No gradient flows through it.
    """
    size = _check_crop_size(crop_size)
    hm = jax.lax.stop_gradient(jnp.asarray(heatmap))
    if hm.ndim != 5:
        raise ValueError(f"heatmap: expected (B, D, H, W, n), got shape {hm.shape}")
    b, *spatial, n = hm.shape
    if any(c > s for c, s in zip(size, spatial, strict=True)):
        raise ValueError(
            f"crop_size: expected a box inside the volume {tuple(spatial)}, got {size}"
        )
    flat = jnp.moveaxis(hm, -1, 1).reshape(b, n, -1)
    idx = jnp.argmax(flat, axis=-1)
    peak = jnp.max(flat, axis=-1)
    centre = jnp.stack(jnp.unravel_index(idx, tuple(spatial)), axis=-1).astype(jnp.int32)
    start = box_starts(centre.reshape(b * n, 3), size, tuple(spatial)).reshape(b, n, 3)
    return start + jnp.asarray(size, jnp.int32) // 2, peak


def crop_small_labels(labels, location, small_organs=SMALL_ORGANS, crop_size=(8, 64, 64)):
    """The original's ``small_label``: binary crops ``(B, n, *crop_size, 1)`` of ``labels (B, D, H, W)``.

    Crop j is ``labels == small_organs[j]`` in organ j's box around ``location[:, j]`` (the
    ``location`` output of :class:`FocusNetV2`), as float32.
    """
    labels = jnp.asarray(labels)
    if labels.ndim == 5 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 4:
        raise ValueError(f"labels: expected (B, D, H, W) integer labels, got shape {labels.shape}")
    size = _check_crop_size(crop_size)
    crops = [
        crop_at((labels == lab)[..., None].astype(jnp.float32), location[:, j], size)
        for j, lab in enumerate(small_organs)
    ]
    return jnp.stack(crops, axis=1)


def paste_small_organs(logits, small_result, location, small_organs=SMALL_ORGANS, mask=None):
    """S-Net logits ``(B, D, H, W, C)`` with each organ's crop logits pasted back: the ``refined`` output.

    ``small_result (B, n, *crop, 1)``, ``location (B, n, 3)`` and ``mask (B, n)`` (default all True)
    as :class:`FocusNetV2` returns them. Inside organ j's box the logit of class
    ``L = small_organs[j]`` becomes ``max_{c != L} logits_c + small_result[:, j]``: L wins exactly
    where the crop's sigmoid is above 0.5 and loses to the best other class elsewhere in the box;
    the other classes are untouched. Organs are pasted in order (a later one wins an overlap); an
    organ whose mask is False is not pasted.
    """
    logits, small_result = jnp.asarray(logits), jnp.asarray(small_result)
    n = len(tuple(small_organs))
    if (
        small_result.ndim != 6
        or small_result.shape[:2] != (logits.shape[0], n)
        or small_result.shape[-1] != 1
    ):
        raise ValueError(
            f"small_result: expected (B={logits.shape[0]}, n={n}, *crop, 1), got {small_result.shape}"
        )
    if mask is None:
        mask = jnp.ones(small_result.shape[:2], bool)
    size = small_result.shape[2:5]
    for j, label in enumerate(small_organs):
        box = crop_at(logits, location[:, j], size)
        others = jnp.max(box.at[..., label].set(-jnp.inf), axis=-1)
        new = box.at[..., label].set(others + small_result[:, j, ..., 0].astype(box.dtype))
        new = jnp.where(mask[:, j, None, None, None, None], new, box)
        logits = paste_at(logits, new, location[:, j])
    return logits


# ------------------------------------------------------------------------------------------------
# FocusNetV2


class FocusNetV2(nn.Module):
    """FocusNetV2 on ``(B, D, H, W, in_channels)``: a dict of S-Net logits, heatmaps and organ crops.

    Returns ``main_result`` (B, D, H, W, num_classes) S-Net logits; with ``sol``, ``heatmap``
    (B, D, H, W, n_small) after a sigmoid (``n_small = len(small_organs)``); with ``sos``,
    ``small_result`` (B, n_small, *crop_size, 1) the crops' logits, ``location`` (B, n_small, 3)
    int32 crop centres (z, h, w), ``refined`` (B, D, H, W, num_classes) the main logits with the
    crops pasted back and ``refined_mask`` (B, n_small) bool, which organs were pasted (see the
    module docstring for how the 1-channel crop logit overrides the class logits).

    ``sol=False, sos=False`` is ``s_net``; ``sol=True, sos=False`` is ``focus_net(SOSNet=False)``.
    Inputs need D even, H and W multiples of 4, and with ``sos`` a volume at least ``crop_size``.
    S-Net: inconv 1->32 (o1), maxpool (1,2,2), 2 SE blocks ->48 (o2), maxpool (2,2,2), 2 blocks
    ->64, 2 blocks 64->64 with conv2 dilated (1,2,2), DenseASPP (1,3,3)..(1,18,18) with the new
    features first (192 ch), up x(2,2,2) with ``literal1(o2)``, up x(1,2,2) with ``literal2(o1)``
    (the 32-ch ``feature_map``), 1x1 ``out_conv``.

    Widths default to the original's (the parameter counts above): ``features`` (o1, o2, o3/o4) =
    (32, 48, 64) and ``aspp_features`` (1x1 reduction, growth) = (64, 32) for S-Net,
    ``sos_features`` / ``sos_aspp_features`` for the SOS branches (:class:`SOSBranch`). Smaller
    widths give a lighter network of the same layout (for CPU runs; not importable). ``axis_name``
    synchronises every BatchNorm (S-Net's when ``norm`` is 'batch', the heatmap head's, the SOS
    branches') over a ``pmap`` axis.
    """

    in_channels: int = 1
    num_classes: int = 10
    sol: bool = True
    sos: bool = True
    norm: Any = "batch"
    small_organs: Sequence[int] = SMALL_ORGANS
    crop_size: Sequence[int] = (8, 64, 64)
    heatmap_threshold: float | None = None
    detach_heatmap: bool = False
    features: Sequence[int] = (32, 48, 64)
    aspp_features: Sequence[int] = (64, 32)
    sos_features: Sequence[int] = (24, 32, 48, 64)
    sos_aspp_features: Sequence[int] = (64, 32)
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def _check(self, x):
        if self.sos and not self.sol:
            raise ValueError("sos: the SOS zoom-in needs the SOL heatmaps; set sol=True")
        organs = tuple(int(o) for o in self.small_organs)
        if (self.sol or self.sos) and (
            not organs
            or len(set(organs)) != len(organs)
            or any(not 0 <= o < self.num_classes for o in organs)
        ):
            raise ValueError(
                f"small_organs: expected distinct labels in [0, {self.num_classes}), got {organs}"
            )
        spatial = _check_volume("x", x, self.in_channels, "FocusNetV2")
        if self.sos:
            size = _check_crop_size(self.crop_size)
            if any(c > s for c, s in zip(size, spatial, strict=True)):
                raise ValueError(
                    f"x: FocusNetV2 with sos needs a volume at least crop_size={size}, got "
                    f"spatial shape {spatial}"
                )
        return organs

    @nn.compact
    def __call__(self, x, *, train: bool = False, heatmap_threshold=None, location=None):
        """The output dict above.

        ``heatmap_threshold`` (a float or traced scalar) overrides the field. ``location``
        ``(B, n_small, 3)`` gives the crop centres instead of the heatmap peaks (e.g. the ground
        truth's, to measure SOS without SOL's localisation errors); they are clamped the same way,
        and the threshold still reads the heatmap peaks.
        """
        organs = self._check(x)
        f1, f2, f3 = _widths(self.features, 3, "features")
        mid, growth = _widths(self.aspp_features, 2, "aspp_features")
        norm = _with_axis_name(self.norm, self.axis_name)
        kw = dict(norm=norm, dtype=self.dtype)
        o1 = InConv(f1, name="conv1x", **kw)(x, train)
        o2 = _stage(max_pool(o1, (1, 2, 2)), "conv2x", f2, 2, train, **kw)
        o3 = _stage(max_pool(o2, (2, 2, 2)), "conv4x", f3, 2, train, **kw)
        o4 = _stage(o3, "conv4xd2", f3, 2, train, dilation=(1, 2, 2), **kw)
        feat = DenseASPP((3, 6, 12, 18), mid, growth, norm=norm, dtype=self.dtype, name="aspp")(
            o4, train
        )
        lit1 = Conv(f2, 3, padding=1, dtype=self.dtype, name="literal1")(o2)
        out = UpBlock(f2, (2, 2, 2), name="up1", **kw)(feat, lit1, train)
        lit2 = Conv(f1, 3, padding=1, dtype=self.dtype, name="literal2")(o1)
        feature_map = UpBlock(f1, (1, 2, 2), name="up2", **kw)(out, lit2, train)
        logits = Conv(self.num_classes, 1, padding=0, dtype=self.dtype, name="out_conv")(
            feature_map
        )
        result = {"main_result": logits.astype(jnp.float32)}
        if not self.sol:
            return result

        fm = jax.lax.stop_gradient(feature_map) if self.detach_heatmap else feature_map
        heatmap = HeatmapHead(len(organs), axis_name=self.axis_name, dtype=self.dtype, name="SOL")(
            fm, train
        )
        result["heatmap"] = heatmap
        if not self.sos:
            return result

        size = tuple(int(s) for s in self.crop_size)
        location_peak, peak = locate_small_organs(heatmap, size)
        if location is None:
            location = location_peak
        else:
            location = jnp.asarray(location)
            if location.shape != location_peak.shape:
                raise ValueError(
                    f"location: expected crop centres {location_peak.shape} (B, n_small, 3), got "
                    f"shape {location.shape}"
                )
            start = box_starts(location.reshape(-1, 3), size, x.shape[1:4])
            location = (start + jnp.asarray(size, jnp.int32) // 2).reshape(location_peak.shape)
        image = jax.lax.stop_gradient(x[..., -1:])
        crops = jax.vmap(lambda c: crop_at(image, c, size), in_axes=1)(location)  # (n, B, *size, 1)
        small = SOSBranches(
            1,
            norm=norm,
            features=self.sos_features,
            aspp_features=self.sos_aspp_features,
            dtype=self.dtype,
            name="SOS",
        )(crops, train)
        small = jnp.moveaxis(small.astype(jnp.float32), 0, 1)  # (B, n, *size, 1)

        threshold = self.heatmap_threshold if heatmap_threshold is None else heatmap_threshold
        mask = jnp.ones(peak.shape, bool) if threshold is None else peak > threshold
        refined = paste_small_organs(result["main_result"], small, location, organs, mask)
        result.update(small_result=small, location=location, refined=refined, refined_mask=mask)
        return result


# ------------------------------------------------------------------------------------------------
# Shape autoencoder


class ConvAE(nn.Module):
    """The shape autoencoder ``ConvAE(1, 1, 512)`` on masks ``(B, 8, 64, 64, 1)``.

    ``__call__`` returns the original's tuple ``(recon (B, 8, 64, 64, 1) after a sigmoid, code
    (B, latent), None, [x1 (B, 2, 16, 16, 128), x2 (B, 4, 32, 32, 64)])``, or with
    ``return_dict=True`` ``{"recon", "code", "features": [x1, x2]}`` (the code and the decoder
    features the adversarial loss compares). Encoder: four 5^3 convs (strides 2, 2, 1, 2) + BN +
    ReLU; the (1, 8, 8, 256) map is flattened in torch's (C, D, H, W) order into ``fc1`` (so
    checkpoints import), ``fc2`` back, ReLU, then three trilinear x2 (align_corners) upsamplings
    with conv5..conv8. :meth:`encode` gives the code, :meth:`decode` the logits (no sigmoid, as the
    original's ``decode``). 31,148,801 parameters.

    The defaults are the original's. ``crop_size`` (each a multiple of 8; the bottleneck map is
    ``crop_size / 8``), ``features`` (conv1..conv4) and ``decoder_features`` (conv5..conv7) give a
    smaller autoencoder of the same layout for smaller crops (not importable from the original);
    ``axis_name`` synchronises its BatchNorms over a ``pmap`` axis.
    """

    latent_features: int = 512
    crop_size: Sequence[int] = (8, 64, 64)
    features: Sequence[int] = (64, 128, 128, 256)
    decoder_features: Sequence[int] = (128, 128, 64)
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        def conv(features, stride=1, name=None):
            return Conv(features, 5, strides=stride, padding=2, dtype=self.dtype, name=name)

        size = tuple(int(s) for s in self.crop_size)
        if len(size) != 3 or any(s < 8 or s % 8 for s in size):
            raise ValueError(
                f"crop_size: ConvAE needs (D, H, W) multiples of 8 (three stride-2 convs), got "
                f"{tuple(self.crop_size)}"
            )
        f1, f2, f3, f4 = _widths(self.features, 4, "features")
        d5, d6, d7 = _widths(self.decoder_features, 3, "decoder_features")
        self._bottleneck = (size[0] // 8, size[1] // 8, size[2] // 8, f4)
        self.conv1, self.conv2 = conv(f1, 2), conv(f2, 2)
        self.conv3, self.conv4 = conv(f3, 1), conv(f4, 2)
        self.conv5, self.conv6, self.conv7, self.conv8 = conv(d5), conv(d6), conv(d7), conv(1)
        bn = functools.partial(BatchNorm, axis_name=self.axis_name)
        self.bn1, self.bn2, self.bn3, self.bn4 = (bn() for _ in range(4))
        self.bn5, self.bn6, self.bn7 = (bn() for _ in range(3))
        self.fc1 = nn.Dense(self.latent_features, dtype=self.dtype)
        self.fc2 = nn.Dense(int(np.prod(self._bottleneck)), dtype=self.dtype)

    def _check(self, x):
        size = tuple(int(s) for s in self.crop_size)
        if tuple(x.shape[1:]) != (*size, 1) or x.ndim != 5:
            d, h, w = (s // 8 for s in size)
            raise ValueError(
                f"x: ConvAE expects masks (B, {', '.join(map(str, size))}, 1) (its fc1 reads a "
                f"{self.features[3]}x{d}x{h}x{w} map), got shape {tuple(x.shape)}"
            )

    def _block(self, conv, bn, x, train):
        return nn.relu(bn(conv(x), train=train))

    def encode(self, x, train: bool = False):
        """The latent code ``(B, latent_features)`` of masks ``(B, *crop_size, 1)``."""
        self._check(x)
        x = self._block(self.conv1, self.bn1, x, train)
        x = self._block(self.conv2, self.bn2, x, train)
        x = self._block(self.conv3, self.bn3, x, train)
        x = self._block(self.conv4, self.bn4, x, train)  # (B, 1, 8, 8, 256) at the defaults
        x = jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(x.shape[0], -1)  # torch's (C, D, H, W)
        return self.fc1(x)

    def _decode(self, code, train):
        d, h, w, c = self._bottleneck
        x = self.fc2(code).reshape(code.shape[0], c, d, h, w)
        x = nn.relu(jnp.transpose(x, (0, 2, 3, 4, 1)))
        x = upsample(x, 2, mode="linear", align_corners=True)
        x = self._block(self.conv5, self.bn5, x, train)
        x1 = self._block(self.conv6, self.bn6, x, train)
        x = upsample(x1, 2, mode="linear", align_corners=True)
        x2 = self._block(self.conv7, self.bn7, x, train)
        x = upsample(x2, 2, mode="linear", align_corners=True)
        return self.conv8(x), x1, x2

    def decode(self, code, train: bool = False):
        """Reconstruction logits ``(B, *crop_size, 1)`` (no sigmoid) from codes ``(B, latent_features)``."""
        return self._decode(code, train)[0]

    def __call__(self, x, *, train: bool = False, return_dict: bool = False):
        code = self.encode(x, train)
        logits, x1, x2 = self._decode(code, train)
        recon = nn.sigmoid(logits.astype(jnp.float32))
        if return_dict:
            return {"recon": recon, "code": code, "features": [x1, x2]}
        return recon, code, None, [x1, x2]


# ------------------------------------------------------------------------------------------------
# PyTorch import


def _norm_kind(norm):
    """The spec kind of a norm's torch keys: ``batch_norm``, or None (affine-free instance norm)."""
    if isinstance(norm, str) and norm.lower() in _BATCH_NAMES:
        return "batch_norm"
    if isinstance(norm, str) and norm.lower() in _INSTANCE_NAMES:
        return None
    raise ValueError(
        f"norm: the original's checkpoints exist for 'batch' ('bn') and 'instance' ('in'), got {norm!r}"
    )


def _se_spec(f, t, cin, cout, bn):
    spec = [(f"{f}/conv1", f"{t}.conv1", "conv"), (f"{f}/conv2", f"{t}.conv2", "conv")]
    if bn:
        spec += [(f"{f}/norm1", f"{t}.bn1", bn), (f"{f}/norm2", f"{t}.bn2", bn)]
    spec += [
        (f"{f}/se/fc1", f"{t}.se.conv.0", "linear"),
        (f"{f}/se/fc2", f"{t}.se.conv.2", "linear"),
    ]
    if cin != cout:
        spec.append((f"{f}/shortcut_conv", f"{t}.shortcut.2", "conv"))
        if bn:
            spec.append((f"{f}/shortcut_norm", f"{t}.shortcut.0", bn))
    return spec


def _inconv_spec(f, t, cin, cout, bn):
    return [(f"{f}/conv1", f"{t}.conv1", "conv")] + _se_spec(
        f"{f}/conv2", f"{t}.conv2", cout, cout, bn
    )


def _stage_spec(f, t, cin, cout, bn):
    spec = []
    for i in range(2):
        spec += _se_spec(f"{f}_{i}", f"{t}.{i}.conv", cin if i == 0 else cout, cout, bn)
    return spec


def _aspp_spec(f, t, bn, cin=64):
    spec = []
    for k in range(4):
        fb, tb = f"{f}/branch_{k}", f"{t}{k + 1}"
        spec += [
            (f"{fb}/reduce/conv", f"{tb}.conv_1", "conv"),
            (f"{fb}/conv/conv", f"{tb}.conv_2", "conv"),
        ]
        if bn:
            spec += [
                (f"{fb}/reduce/norm", f"{tb}.norm_1", bn),
                (f"{fb}/conv/norm", f"{tb}.norm_2", bn),
            ]
    return spec


def _up_spec(f, t, cin, cout, bn):
    return _se_spec(f"{f}/block", f"{t}.conv.0.conv", cin + cout, cout, bn)


def _branch_spec(f, t, bn):
    """``SOS_branch`` keys under torch prefix ``t`` (ends with a dot or is empty)."""
    p = f"{f}/" if f else ""
    spec = _inconv_spec(f"{p}share_conv1x", f"{t}share_conv1x", 1, 24, bn)
    spec += _stage_spec(f"{p}share_conv1x_2", f"{t}share_conv1x_2", 24, 32, bn)
    spec += _stage_spec(f"{p}share_conv2x", f"{t}share_conv2x", 32, 48, bn)
    spec += _stage_spec(f"{p}share_conv4x", f"{t}share_conv4x", 48, 64, bn)
    spec += _aspp_spec(f"{p}share_aspp", f"{t}share_ASPP_", bn)
    spec += _up_spec(f"{p}share_up1", f"{t}share_up1", 192, 48, bn)
    spec += _up_spec(f"{p}share_up2", f"{t}share_up2", 48, 32, bn)
    spec += [
        (f"{p}share_literal1", f"{t}share_literal1", "conv"),
        (f"{p}share_literal2", f"{t}share_literal2", "conv"),
        (f"{p}out_conv", f"{t}out_conv", "conv"),
    ]
    return spec


def _heatmap_spec(f, t):
    return [
        (f"{f}/bn1", f"{t}.bn1", "batch_norm"),
        (f"{f}/conv1", f"{t}.conv1", "conv"),
        (f"{f}/bn2", f"{t}.bn2", "batch_norm"),
        (f"{f}/conv2", f"{t}.conv2", "conv"),
        (f"{f}/conv3", f"{t}.conv3", "conv"),
    ]


_ORIGINAL_WIDTHS = {
    "features": {
        FocusNetV2: (32, 48, 64),
        SOSBranch: (24, 32, 48, 64),
        ConvAE: (64, 128, 128, 256),
    },
    "aspp_features": {FocusNetV2: (64, 32), SOSBranch: (64, 32)},
    "sos_features": {FocusNetV2: (24, 32, 48, 64)},
    "sos_aspp_features": {FocusNetV2: (64, 32)},
    "decoder_features": {ConvAE: (128, 128, 64)},
    "crop_size": {ConvAE: (8, 64, 64)},
}


def _check_original_widths(model):
    """Raise unless ``model`` has the original's widths (only those checkpoints exist)."""
    for field, by_type in _ORIGINAL_WIDTHS.items():
        want = by_type.get(type(model))
        if want is not None and tuple(int(v) for v in getattr(model, field)) != want:
            raise ValueError(
                f"model.{field}: the original's checkpoints have {field}={want}, got "
                f"{tuple(getattr(model, field))}"
            )


def _organ_path(j):
    return f"SOS_organ_{j}"


def torch_spec(model) -> list[tuple[str, str, str]]:
    """The ``(flax_path, torch_prefix, kind)`` spec of ``model``'s original ``state_dict``.

    Torch keys are yhygao/focusnet-v2's (``conv1x.conv2.se.conv.0``, ``ASPP_1.norm_1``,
    ``up1.conv.0.conv.shortcut.2``, ``SOL.conv3``, ``SOS.SOS_module.0.share_conv1x.conv1``, ConvAE's
    ``conv1``..``conv8``, ``bn1``..``bn7``, ``fc1``, ``fc2``). For :class:`FocusNetV2` with ``sos``
    the SOS branch j maps to the temporary path ``SOS_organ_{j}/...``; :func:`load_pytorch_weights`
    stacks these into the vmapped ``SOS`` axis.
    """
    _check_original_widths(model)
    if isinstance(model, ConvAE):
        spec = [(f"conv{i}", f"conv{i}", "conv") for i in range(1, 9)]
        spec += [(f"bn{i}", f"bn{i}", "batch_norm") for i in range(1, 8)]
        return spec + [("fc1", "fc1", "linear"), ("fc2", "fc2", "linear")]
    if isinstance(model, HeatmapHead):
        return [(f, t[1:], k) for f, t, k in _heatmap_spec("", "")]
    if isinstance(model, SOSBranch):
        return _branch_spec("", "", _norm_kind(model.norm))
    if not isinstance(model, FocusNetV2):
        raise ValueError(
            f"model: expected a FocusNetV2, SOSBranch, HeatmapHead or ConvAE, got {type(model).__name__}"
        )
    bn = _norm_kind(model.norm)
    spec = _inconv_spec("conv1x", "conv1x", model.in_channels, 32, bn)
    spec += _stage_spec("conv2x", "conv2x", 32, 48, bn)
    spec += _stage_spec("conv4x", "conv4x", 48, 64, bn)
    spec += _stage_spec("conv4xd2", "conv4xd2", 64, 64, bn)
    spec += _aspp_spec("aspp", "ASPP_", bn)
    spec += _up_spec("up1", "up1", 192, 48, bn)
    spec += _up_spec("up2", "up2", 48, 32, bn)
    spec += [
        ("literal1", "literal1", "conv"),
        ("literal2", "literal2", "conv"),
        ("out_conv", "out_conv", "conv"),
    ]
    if model.sol:
        spec += _heatmap_spec("SOL", "SOL")
    if model.sos:
        for j in range(len(tuple(model.small_organs))):
            spec += _branch_spec(_organ_path(j), f"SOS.SOS_module.{j}.", bn)
    return spec


@functools.lru_cache(maxsize=16)
def _template(model):
    """``jax.eval_shape`` of ``model.init`` (shapes only; cached, a trace of the full net takes seconds)."""
    return jax.eval_shape(model.init, jax.random.key(0), _example_input(model))


def _example_input(model):
    if isinstance(model, ConvAE):
        shape = (1, 8, 64, 64, 1)
    elif isinstance(model, HeatmapHead):
        shape = (1, 2, 4, 4, 32)
    elif isinstance(model, SOSBranch):
        shape = (1, 2, 8, 8, 1)  # 8 in-plane: an instance norm needs > 1 voxel at the bottleneck
    elif model.sos:
        shape = (1, *_check_crop_size(model.crop_size), model.in_channels)
    else:
        shape = (1, 2, 8, 8, model.in_channels)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _infer_model(sd: Mapping, name="path_or_state_dict"):
    """The medjax module whose original produced ``sd`` (keys already without ``module.``)."""

    def shape(key):
        if key not in sd:
            raise ValueError(
                f"{name}: missing key {key} (needed to infer the network); got {sorted(sd)[:5]} ..."
            )
        return tuple(np.shape(sd[key]))

    if "conv1x.conv1.weight" in sd:
        norm = "batch" if "conv1x.conv2.bn1.running_mean" in sd else "instance"
        sol = any(k.startswith("SOL.") for k in sd)
        branches = {k.split(".")[2] for k in sd if k.startswith("SOS.SOS_module.")}
        n = shape("SOL.conv3.weight")[0] if sol else len(SMALL_ORGANS)
        if branches and len(branches) != n:
            raise ValueError(
                f"{name}: {len(branches)} SOS branches but {n} heatmap channels (SOL.conv3)"
            )
        num_classes = shape("out_conv.weight")[0]
        organs = SMALL_ORGANS if n == len(SMALL_ORGANS) else tuple(range(1, n + 1))
        return FocusNetV2(
            in_channels=shape("conv1x.conv1.weight")[1],
            num_classes=num_classes,
            sol=sol,
            sos=bool(branches),
            norm=norm,
            small_organs=organs,
        )
    if "share_conv1x.conv1.weight" in sd:
        norm = "batch" if "share_conv1x.conv2.bn1.running_mean" in sd else "instance"
        return SOSBranch(num_classes=shape("out_conv.weight")[0], norm=norm)
    if "fc1.weight" in sd and "conv8.weight" in sd:
        return ConvAE(latent_features=shape("fc1.weight")[0])
    raise ValueError(
        f"{name}: not a FocusNetV2 checkpoint: expected 'conv1x.conv1.weight' (s_net / focus_net), "
        f"'share_conv1x.conv1.weight' (SOS_branch) or 'fc1.weight' + 'conv8.weight' (ConvAE); got "
        f"keys {sorted(sd)[:5]} ..."
    )


def _same_kind(a, b):
    return type(a) is type(b) and (
        not isinstance(a, FocusNetV2) or (a.sol, a.sos) == (b.sol, b.sos)
    )


def load_pytorch_weights(path_or_state_dict, model=None):
    """Flax variables ``{"params", "batch_stats"}`` from an original FocusNetV2 ``state_dict``.

    Takes a ``.pth`` path, an ``.npz`` or a mapping of a ``focus_net`` / ``s_net``, an
    ``SOS_branch`` or a ``ConvAE`` state_dict (keys as in yhygao/focusnet-v2, DataParallel's
    ``module.`` prefix removed), detects which from the keys, and checks every key and shape against
    ``model`` (default: the module :func:`focusnet_from_state_dict` infers). The three SOS branches
    ``SOS.SOS_module.{0,1,2}`` stack along the vmapped organ axis of ``params/SOS``. Raises
    ``ValueError`` naming the first missing, unexpected or mis-shaped key.
    """
    sd = torch_import.read_state_dict(path_or_state_dict)
    inferred = _infer_model(sd)
    if model is None:
        model = inferred
    elif not _same_kind(model, inferred):
        raise ValueError(
            f"model: the checkpoint is a {type(inferred).__name__}"
            + (
                f" (sol={inferred.sol}, sos={inferred.sos})"
                if isinstance(inferred, FocusNetV2)
                else ""
            )
            + f", not a {type(model).__name__} like the model given"
        )
    name = "FocusNetV2" if isinstance(model, FocusNetV2) else f"FocusNetV2 {type(model).__name__}"
    spec = torch_spec(model)
    for flax_path, prefix, _ in spec:  # every layer has a weight (convert treats each as optional)
        if f"{prefix}.weight" not in sd:
            raise ValueError(f"{name} checkpoint: missing key {prefix}.weight (for {flax_path})")
    variables = torch_import.convert(sd, spec, None, name=name)
    if isinstance(model, FocusNetV2) and model.sos:
        variables = {k: dict(v) for k, v in variables.items()}
        for tree in variables.values():
            organs = [tree.pop(_organ_path(j)) for j in range(len(tuple(model.small_organs)))]
            tree["SOS"] = jax.tree.map(lambda *a: np.stack(a), *organs)
    return torch_import.match_variables(_template(model), variables, name=name)


def focusnet_from_state_dict(path_or_state_dict, **overrides):
    """``(module, variables)`` for an original checkpoint, the module's settings read from the keys.

    ``s_net`` keys give ``FocusNetV2(sol=False, sos=False)``, ``focus_net(SOSNet=False)`` keys
    ``sol=True, sos=False``, ``focus_net(SOSNet=True)`` keys ``sol=True, sos=True``; ``in_channels``,
    ``num_classes`` and ``norm`` ('batch' / 'instance') come from the shapes and keys. ``overrides``
    set the rest (``crop_size``, ``heatmap_threshold``, ``small_organs`` ...). ``SOS_branch`` and
    ``ConvAE`` checkpoints give :class:`SOSBranch` / :class:`ConvAE`.
    """
    sd = torch_import.read_state_dict(path_or_state_dict)
    model = _infer_model(sd)
    if overrides:
        model = model.clone(**overrides)
    return model, load_pytorch_weights(sd, model)
