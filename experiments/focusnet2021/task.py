"""FocusNetV2 (Gao et al., MedIA 2021): segment, localise, zoom in, constrain the shape; the Experiment.

What is specific to the paper lives here: the presence-weighted losses of each stage, the heatmap
targets, the crops around the small organs, the frozen S-Net feeding the SOS branches, the
autoencoder's adversarial terms (those of the original's ``adv_train.py``) and the small/large
organ summaries. The networks are ``medjax.models.focusnet``; the steps, the sliding window, the
evaluator, the statistics, the reports and the figures come from the library.

Data (``config.data``):

- ``synthetic``: :func:`medjax.data.synthetic_headneck.headneck_phantom` heads (the 9 PDDCA organs;
  training cases leave organs unannotated with ``synthetic.unannotated_prob``; test cases are fully
  annotated). An organ that the phantom draws with no voxel at the chosen resolution (a thin optic
  nerve between two slices) counts as unannotated in that case.
- ``pddca``: a PDDCA folder (``CASE/img.nrrd`` + ``CASE/structures/<Organ>.nrrd``), split into the
  original's 10 test cases (``pddca.test_ids``, when present) and the rest for training.

Every volume (files included, in ``predict``) goes through one preprocessing: axes to the
network's (D inferior->superior, H anterior->posterior, W patient right->left), resampling to the
training spacing, intensity ``(HU + 100) / 1000`` for files, an in-plane centre crop/pad to the
training size (air outside). Label maps go back through its inverse.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

import medjax.train
from medjax import figures as F
from medjax.data import datasets, pipeline
from medjax.data.datasets import PDDCA_STRUCTURES
from medjax.data.io import load_image, resample_image, unresample
from medjax.data.synthetic_headneck import headneck_phantom
from medjax.evaluation.report import gain_cell, markdown_table, mean_std
from medjax.evaluation.segmentation import Prepared, evaluate_segmentation, predict_files
from medjax.evaluation.stats import paired_bootstrap, summarize
from medjax.inference import sliding_window_inference
from medjax.losses import adaptive_tversky_loss, focal_loss, heatmap_mse, soft_dice_loss
from medjax.models.focusnet import (
    ConvAE,
    FocusNetV2,
    SOSBranches,
    crop_small_labels,
    locate_small_organs,
    paste_small_organs,
)
from medjax.nn.blocks import fast_init, rbg_key
from medjax.nn.norm import BatchNorm
from medjax.ops import crop_at, gaussian_heatmap, paste_at
from medjax.ops.crop import box_starts
from medjax.train.optim import adam, multistep, sgd
from medjax.train.state import TrainState
from medjax.train.steps import adversarial_step, supervised_step

NUM_CLASSES = 10
NAMES = PDDCA_STRUCTURES
SMALL = (2, 4, 5)  # chiasm, optic nerve L, optic nerve R
LARGE = (1, 3, 6, 7, 8, 9)
AIR = (-1000.0 + 100.0) / 1000.0  # air after (HU + 100) / 1000: the padding value
KINDS = ("focusnet", "snet")
CENTRES = ("predicted", "truth")
#: network axes (D, H, W) as nibabel axis codes: superior, posterior, patient left
NET_AXCODES = ("S", "P", "L")


# ------------------------------------------------------------------------------------------- cases


def presence_weights(presence):
    """Per-class loss weights ``(10,)`` from the 9 organ presences: background is 1 only when every
    organ is annotated (an unannotated organ's voxels are labelled background), as the original's
    ``new_train.csv`` weights."""
    p = np.asarray(presence, np.float32)
    return np.concatenate([[float(p.min())], p]).astype(np.float32)


def small_organ_centres(label):
    """Centroids ``(3, 3)`` (voxels, float) of the small organs and whether each has voxels ``(3,)``."""
    centres, has = np.zeros((len(SMALL), 3), np.float32), np.zeros(len(SMALL), bool)
    for j, lab in enumerate(SMALL):
        idx = np.argwhere(label == lab)
        if idx.size:
            centres[j], has[j] = idx.mean(axis=0), True
    return centres, has


def make_case(case_id, image, label, presence, spacing, *, min_shape, where="case"):
    """A checked case dict: ``image (D, H, W, 1)``, ``label``, ``presence (9,)``, ``weights (10,)``,
    ``centres (3, 3)``, ``valid (3,)`` (small organ annotated), ``spacing``, ``id``.

    Raises ValueError naming the case when its presence mask disagrees with its structures (an
    organ marked unannotated with voxels, or annotated without any) or its volume is smaller than
    ``min_shape`` (the training crop or the SOS crop).
    """
    image = np.asarray(image, np.float32)
    image = image[..., None] if image.ndim == 3 else image
    label = np.asarray(label, np.int32)
    presence = np.asarray(presence, np.int32).reshape(-1)
    if presence.shape != (len(NAMES),) or not np.isin(presence, (0, 1)).all():
        raise ValueError(
            f"{where} {case_id}: expected a presence mask of {len(NAMES)} zeros and ones, got "
            f"{presence.tolist()}"
        )
    if image.shape[:-1] != label.shape or image.shape[-1] != 1:
        raise ValueError(
            f"{where} {case_id}: expected an image (D, H, W, 1) and a label (D, H, W), got "
            f"{image.shape} and {label.shape}"
        )
    if label.min() < 0 or label.max() >= NUM_CLASSES:
        raise ValueError(
            f"{where} {case_id}: expected labels in [0, {NUM_CLASSES}), got values in "
            f"[{label.min()}, {label.max()}]"
        )
    counts = np.bincount(label.ravel(), minlength=NUM_CLASSES)[1:]
    extra = [
        f"{NAMES[k]} ({counts[k]} voxels)" for k in np.flatnonzero((presence == 0) & (counts > 0))
    ]
    if extra:
        raise ValueError(
            f"{where} {case_id}: its presence mask marks {', '.join(extra)} as not annotated, but "
            "its label map has voxels of them"
        )
    empty = [NAMES[k] for k in np.flatnonzero((presence == 1) & (counts == 0))]
    if empty:
        raise ValueError(
            f"{where} {case_id}: its presence mask marks {', '.join(empty)} as annotated, but its "
            "label map has no voxel of them"
        )
    shape = label.shape
    if any(s < m for s, m in zip(shape, min_shape, strict=True)):
        raise ValueError(
            f"{where} {case_id}: its volume {shape} (D, H, W) is smaller than the crop "
            f"{tuple(min_shape)} it must hold (config.train_crop / config.crop_size)"
        )
    centres, has = small_organ_centres(label)
    valid = np.array([presence[lab - 1] == 1 for lab in SMALL]) & has
    return {
        "id": str(case_id),
        "image": image,
        "label": label,
        "presence": presence,
        "weights": presence_weights(presence),
        "centres": centres,
        "valid": valid.astype(np.float32),
        "spacing": np.asarray(spacing, np.float32),
    }


@functools.lru_cache(maxsize=512)
def _phantom(seed, shape, spacing, prob):
    s = headneck_phantom(seed, shape, spacing=spacing, unannotated_prob=prob)
    counts = np.bincount(s["label"].ravel(), minlength=NUM_CLASSES)[1:]
    presence = s["presence"] * (counts > 0)  # drawn with no voxel at this resolution: unannotated
    return s["image"], s["label"], presence, s["spacing"]


def _orientation_transforms(affine):
    """nibabel orientation transforms file axes -> network axes and back."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    start = io_orientation(affine)
    end = axcodes2ornt(NET_AXCODES)
    return ornt_transform(start, end), ornt_transform(end, start)


def centre_crop_or_pad(x, size, value):
    """``x (D, H, W, ...)`` centre-cropped or padded with ``value`` to ``(D, *size)`` in-plane;
    returns the array and the (H, W) offsets of the input inside the output (negative: cropped)."""
    out, offsets = x, []
    for axis, n in ((1, int(size[0])), (2, int(size[1]))):
        s = out.shape[axis]
        if s > n:
            lo = (s - n) // 2
            out = np.take(out, np.arange(lo, lo + n), axis=axis)
            offsets.append(-lo)
        else:
            lo = (n - s) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (lo, n - s - lo)
            out = np.pad(out, pad, constant_values=value)
            offsets.append(lo)
    return out, tuple(offsets)


def prepare_volume(image, spacing, inplane, *, is_ct=True, pad_value=AIR):
    """``Prepared`` network input ``(D, H, W, 1)`` of a loaded file (an ``Image``), and its inverse.

    Axes to the network's (``NET_AXCODES``), resampling to ``spacing`` (D, H, W) mm, ``(HU + 100)
    / 1000`` (``is_ct``), in-plane centre crop/pad to ``inplane`` (``pad_value``: air). A label
    file (``image.is_label``) gives a ``(D, H, W)`` int map (padded with 0). ``restore(labels, order=0)``
    maps a ``(D, H, W)`` map back onto the file's voxel grid (outside the crop: 0).
    """
    from nibabel.orientations import apply_orientation

    if len(image.spatial_shape) != 3 or image.num_channels != 1:
        raise ValueError(
            f"inputs: {image.path}: expected a single-channel 3D CT volume, got array shape "
            f"{image.array.shape}"
        )
    to_net, to_file = _orientation_transforms(image.affine)
    array = np.ascontiguousarray(apply_orientation(image.array, to_net))
    from nibabel.orientations import inv_ornt_aff

    oriented = image.replace(
        array=array, affine=image.affine @ inv_ornt_aff(to_net, image.spatial_shape)
    )
    resampled = resample_image(oriented, tuple(float(s) for s in spacing))
    vol = resampled.array
    if is_ct and not image.is_label:
        vol = (vol + 100.0) / 1000.0
    vol, offsets = centre_crop_or_pad(vol, inplane, 0 if image.is_label else pad_value)
    grid_shape = resampled.spatial_shape

    def restore(labels, order=0):
        lab = np.asarray(labels)
        full = np.zeros(grid_shape, lab.dtype)
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        for k, off in ((1, offsets[0]), (2, offsets[1])):
            n = grid_shape[k]
            if off >= 0:  # padded: the grid sits at [off, off + n) of the network input
                src[k], dst[k] = slice(off, off + n), slice(0, n)
            else:  # cropped: the network input sits at [-off, -off + size) of the grid
                size = lab.shape[k]
                src[k], dst[k] = slice(0, size), slice(-off, -off + size)
        full[tuple(dst)] = lab[tuple(src)]
        back = unresample(
            full, oriented.spatial_shape, oriented.spacing, resampled.spacing, order=order
        )
        return np.ascontiguousarray(apply_orientation(back, to_file))

    vol = vol.astype(np.int32 if image.is_label else np.float32)
    return Prepared(image=vol, restore=restore), resampled


class SyntheticData:
    """Synthetic head & neck phantoms: training cases (some organs unannotated) and test cases."""

    def __init__(self, config, min_shape):
        s = config.synthetic
        self.shape = tuple(int(v) for v in s.shape)
        self.spacing = tuple(float(v) for v in s.spacing)
        self.prob = float(s.unannotated_prob)
        self.train_seeds = [int(s.seed) + i for i in range(int(s.num_train))]
        self.test_seeds = [int(s.seed) + 100_000 + i for i in range(int(s.num_test))]
        self.min_shape = min_shape
        if not self.train_seeds or not self.test_seeds:
            raise ValueError(
                "config.synthetic: expected num_train >= 1 and num_test >= 1, got "
                f"{len(self.train_seeds)} and {len(self.test_seeds)}"
            )

    def _case(self, seed, prob):
        image, label, presence, spacing = _phantom(seed, self.shape, self.spacing, prob)
        return make_case(
            f"phantom{seed}", image, label, presence, spacing, min_shape=self.min_shape
        )

    @functools.cached_property
    def train(self):
        """The training cases (checked)."""
        return [self._case(s, self.prob) for s in self.train_seeds]

    def test(self):
        """The test cases (fully annotated)."""
        return [self._case(s, 0.0) for s in self.test_seeds]

    @property
    def inplane(self):
        return self.shape[1:]


class PddcaData:
    """A PDDCA folder: the original's 10 test cases (or the last ``test_fraction``) and the rest."""

    def __init__(self, config, min_shape):
        if not config.data_dir:
            raise ValueError("config.data_dir: expected the PDDCA folder for data='pddca', got ''")
        records = datasets.pddca_records(config.data_dir)
        p = config.pddca
        self.spacing = tuple(float(v) for v in p.spacing)
        self.inplane = tuple(int(v) for v in p.inplane)
        self.min_shape = min_shape
        ids = {str(i) for i in p.test_ids}
        test = [r for r in records if r["id"] in ids]
        if not test:
            n = max(1, int(round(float(p.test_fraction) * len(records))))
            test = records[-n:]
        train = [r for r in records if r not in test]
        if not train:
            raise ValueError(
                f"config.data_dir: {config.data_dir} has {len(records)} PDDCA case(s), all of "
                "them test cases; expected at least one training case"
            )
        self.train_records, self.test_records = train, test

    def _case(self, record):
        image = load_image(record["image"][0])
        prepared, resampled = prepare_volume(image, self.spacing, self.inplane)
        label, presence = datasets.load_pddca_label(record, like=image)
        if label is None:
            label = np.zeros(image.spatial_shape, np.int32)
        # The label map goes through the image's preprocessing (nearest neighbour).
        lab_img = image.replace(array=label, is_label=True)
        lab, _ = prepare_volume(lab_img, self.spacing, self.inplane)
        return make_case(
            record["id"],
            prepared.image,
            lab.image,
            presence,
            self.spacing,
            min_shape=self.min_shape,
        )

    @functools.cached_property
    def train(self):
        """The training cases (checked)."""
        return [self._case(r) for r in self.train_records]

    def test(self):
        """The test cases."""
        return [self._case(r) for r in self.test_records]


# ------------------------------------------------------------------------------------------- crops


def _crop_start(rng, size, crop, centres, valid, focus, margin):
    """Start of a ``crop`` box in a volume of ``size``: uniform, or (with probability ``focus`` and a
    small organ annotated) placed so that every small organ's centre is ``margin`` inside it."""
    starts = []
    use_focus = bool(valid.any()) and rng.random() < focus
    for k in range(3):
        hi = size[k] - crop[k]
        if not use_focus:
            starts.append(int(rng.integers(0, hi + 1)))
            continue
        c = centres[valid > 0, k]
        m = min(int(margin[k]), crop[k] // 2)
        lo_ok, hi_ok = int(np.ceil(c.max() + m - crop[k] + 1)), int(np.floor(c.min() - m))
        lo_ok, hi_ok = max(lo_ok, 0), min(hi_ok, hi)
        if lo_ok <= hi_ok:
            starts.append(int(rng.integers(lo_ok, hi_ok + 1)))
        else:
            starts.append(int(np.clip(round(c.mean() - crop[k] / 2), 0, hi)))
    return np.asarray(starts)


def _augment_matrix(rng, zoom, rotation):
    """Sampling matrix (output -> input voxel offsets) of a random zoom and rotation (degrees)."""
    scale = 1.0 + rng.uniform(-zoom, zoom, 3) if zoom else np.ones(3)
    m = np.diag(scale)
    for (a, b), deg in zip(((1, 2), (0, 2), (0, 1)), rotation, strict=True):
        if deg:
            t = np.deg2rad(rng.uniform(-deg, deg))
            r = np.eye(3)
            r[a, a], r[a, b], r[b, a], r[b, b] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
            m = r @ m
    return m


def sample_crop(case, rng, crop, *, focus, margin, zoom=0.0, rotation=(0.0, 0.0, 0.0), jitter=0):
    """One training record: a ``crop`` box of ``case`` (optionally zoomed/rotated about its centre).

    Returns ``image (*crop, 1)``, ``label (*crop)``, ``weights (10,)``, ``centres (3, 3)`` in crop
    voxels, ``valid (3,)`` and ``jitter (3, 3)`` (integer offsets for the autoencoder's crops).
    """
    size = case["label"].shape
    start = _crop_start(rng, size, crop, case["centres"], case["valid"], focus, margin)
    centres = case["centres"] - start
    if zoom or any(rotation):
        m = _augment_matrix(rng, zoom, rotation)
        mid = start + (np.asarray(crop) - 1) / 2.0
        offset = mid - m @ ((np.asarray(crop) - 1) / 2.0)
        image = ndimage.affine_transform(
            case["image"][..., 0], m, offset, output_shape=tuple(crop), order=1, mode="nearest"
        )[..., None]
        label = ndimage.affine_transform(
            case["label"], m, offset, output_shape=tuple(crop), order=0, mode="constant"
        )
        centres = (np.linalg.inv(m) @ (case["centres"] - offset).T).T
    else:
        box = tuple(slice(int(s), int(s) + c) for s, c in zip(start, crop, strict=True))
        image, label = case["image"][box], case["label"][box]
    j = int(jitter)
    shift = np.zeros((len(SMALL), 3), np.float32)
    if j:
        shift[:, 0] = rng.integers(-(j // 4), j // 4 + 1, len(SMALL))
        shift[:, 1:] = rng.integers(-j, j + 1, (len(SMALL), 2))
    return {
        "image": np.ascontiguousarray(image, np.float32),
        "label": np.ascontiguousarray(label, np.int32),
        "weights": case["weights"],
        "centres": np.asarray(centres, np.float32),
        "valid": case["valid"],
        "jitter": shift,
    }


def heatmap_targets(centres, valid, shape, sigma, z_halfwidth=None, floor=0.0):
    """SOL targets ``(B, *shape, n)``: a Gaussian (``sigma`` voxels per axis) at each organ's rounded
    centre, zero beyond ``z_halfwidth`` slices of it and below ``floor`` (the original's cuts), and
    zero for organs not annotated (``valid`` (B, n) = 0)."""
    b, n = valid.shape
    c = jnp.round(centres.reshape(b * n, 3))
    hm = gaussian_heatmap(shape, c, jnp.asarray(sigma, jnp.float32))
    if z_halfwidth is not None:
        z = jnp.arange(shape[0], dtype=jnp.float32)
        near = jnp.abs(z[None, :] - c[:, :1]) <= float(z_halfwidth)
        hm = hm * near[:, :, None, None]
    if floor:
        hm = jnp.where(hm < floor, 0.0, hm)
    hm = hm.reshape(b, n, *shape) * valid[:, :, None, None, None]
    return jnp.moveaxis(hm, 1, -1)


def _over_devices(loss, total, axis_name, floor=False):
    """A batch ratio ``loss = num / den(total)`` rescaled so that its ``pmean`` over ``axis_name`` is
    the ratio of the sums over every device's batch (what one device computes on the whole batch).

    ``den(t)`` is ``t`` (1 when ``t`` is 0), or ``max(t, 1)`` with ``floor``. Without ``axis_name``
    (one device, or a mesh, where the batch is global) ``loss`` is returned as it is. Under ``pmap``
    each device's weights (organ presences, valid crops) differ, and the mean of per-device ratios is
    not the ratio over the batch.
    """
    if axis_name is None:
        return loss

    def den(t):
        return jnp.maximum(t, 1.0) if floor else jnp.where(t > 0, t, 1.0)

    every = jax.lax.psum(total, axis_name)
    return loss * den(total) * jax.lax.psum(1, axis_name) / den(every)


def _weighted_mean(values, weights, axis_name=None):
    """``sum(w v) / sum(w)`` over a leading axis (0 when every weight is 0), over every device's
    batch under ``pmap`` (``axis_name``; see :func:`_over_devices`)."""
    total = jnp.sum(weights)
    mean = jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0)
    return _over_devices(mean, total, axis_name)


def _per_crop_mse(a, b):
    """Mean squared difference per crop: ``(N, ...) -> (N,)``."""
    return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)


def binary_sos_loss(logits, truth, valid, dice_weight, axis_name=None):
    """The original's SOS segmentation loss: binary focal (alpha 0.5, gamma 2) + ``dice_weight`` x
    binary adaptive Tversky, per crop, over the annotated organs only.

    ``logits``, ``truth``: ``(B, n, *crop, 1)``; ``valid``: ``(B, n)``. The 1-channel logit s is
    the 2-class logit pair (0, s), so the softmax losses are the sigmoid ones. ``axis_name``
    (``pmap``): both terms are the ratios over every device's batch.
    """
    crop = logits.shape[2:5]
    s = logits.reshape(-1, *crop, 1)
    two = jnp.concatenate([jnp.zeros_like(s), s], axis=-1)
    y = truth.reshape(-1, *crop).astype(jnp.int32)
    w = valid.reshape(-1)
    voxel_mask = jnp.broadcast_to(w[:, None, None, None], y.shape)
    focal = focal_loss(two, y, gamma=2.0, alpha=(0.5, 0.5), mask=voxel_mask)
    focal = _over_devices(focal, jnp.sum(voxel_mask), axis_name, floor=True)
    presence = jnp.stack([w, w], axis=-1)
    tversky = adaptive_tversky_loss(two, y, presence=presence, include_background=False)
    tversky = _over_devices(tversky, jnp.sum(w), axis_name)
    return focal + dice_weight * tversky, {"focal": focal, "tversky": tversky}


# ------------------------------------------------------------------------------------------- model


def _warmup_multistep(lr, warmup, boundaries, gamma):
    """The original's schedule: ``lr e^(10 (t/W - 1))`` for ``t < W``, then x``gamma`` at ``boundaries``."""
    decay = multistep(lr, boundaries, gamma) if boundaries else optax.constant_schedule(lr)
    if warmup <= 0:
        return decay

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = lr * jnp.exp(10.0 * (t / warmup - 1.0))
        return jnp.where(t < warmup, warm, decay(step))

    return schedule


def _boundaries(num_steps, fractions):
    return sorted({max(1, int(round(f * num_steps))) for f in fractions if num_steps > 1})


def _norm(name, axis_name):
    if axis_name is not None and isinstance(name, str) and name.lower() in ("batch", "bn"):
        return functools.partial(BatchNorm, axis_name=axis_name)
    return name


def _tuple(v, n, name):
    t = tuple(int(x) for x in v)
    if len(t) != n:
        raise ValueError(f"{name}: expected {n} values, got {tuple(v)}")
    return t


class Experiment(medjax.train.Experiment):
    """FocusNetV2 (or S-Net alone) on synthetic head & neck phantoms or a PDDCA folder."""

    def __init__(self, config, *, axis_name=None):
        super().__init__(config)
        c = config
        self.kind = c.model.kind
        if self.kind not in KINDS:
            raise ValueError(f"config.model.kind: expected one of {KINDS}, got {self.kind!r}")
        self.centre = c.sos.centre
        if self.centre not in CENTRES:
            raise ValueError(f"config.sos.centre: expected one of {CENTRES}, got {self.centre!r}")
        if c.data not in ("synthetic", "pddca"):
            raise ValueError(f"config.data: expected 'synthetic' or 'pddca', got {c.data!r}")
        self.crop = _tuple(c.crop_size, 3, "config.crop_size")
        self.train_crop = _tuple(c.train_crop, 3, "config.train_crop")
        if any(t < s for t, s in zip(self.train_crop, self.crop, strict=True)):
            raise ValueError(
                f"config.train_crop: expected a box at least the SOS crop {self.crop}, got "
                f"{self.train_crop}"
            )
        self.window, self.stride = int(c.eval.window), int(c.eval.stride)
        if not 0 < self.stride <= self.window or self.window < self.crop[0]:
            raise ValueError(
                f"config.eval: expected 0 < stride <= window and window >= the SOS crop depth "
                f"{self.crop[0]}, got window {self.window}, stride {self.stride}"
            )
        self.shape_enabled = bool(c.shape.enabled) and self.kind == "focusnet"
        self.axis_name = axis_name
        m = c.model
        self.sol = self.kind == "focusnet"
        common = dict(
            num_classes=NUM_CLASSES,
            norm=m.norm,
            features=tuple(m.features),
            aspp_features=tuple(m.aspp_features),
            sos_features=tuple(m.sos_features),
            sos_aspp_features=tuple(m.sos_aspp_features),
            crop_size=self.crop,
            small_organs=SMALL,
        )
        self.backbone = FocusNetV2(sol=self.sol, sos=False, axis_name=axis_name, **common)
        self.full = FocusNetV2(sol=self.sol, sos=self.sol, **common)  # inference (no axis)
        self.sos = SOSBranches(
            1,
            norm=_norm(m.norm, axis_name),
            features=tuple(m.sos_features),
            aspp_features=tuple(m.sos_aspp_features),
        )
        a = c.ae
        self.ae = ConvAE(
            latent_features=int(a.latent),
            crop_size=self.crop,
            features=tuple(a.features),
            decoder_features=tuple(a.decoder_features),
            axis_name=axis_name,
        )
        self._check_stages()

    # ---------------------------------------------------------------- data

    @functools.cached_property
    def data(self):
        """The data (built on first use: ``predict`` needs no training folder)."""
        cls = SyntheticData if self.config.data == "synthetic" else PddcaData
        return cls(self.config, self.train_crop)

    @property
    def spacing(self):
        """The network's voxel size (D, H, W) in mm."""
        if self.config.data == "synthetic":
            return tuple(float(v) for v in self.config.synthetic.spacing)
        return tuple(float(v) for v in self.config.pddca.spacing)

    def _iterator(self, *, focus, jitter, seed_offset):
        cases = self.data.train
        aug = self.config.augment
        margin = tuple(c // 2 for c in self.crop)

        def transform(record, rng):
            case = cases[int(record["index"])]
            return sample_crop(
                case,
                rng,
                self.train_crop,
                focus=focus,
                margin=margin,
                zoom=float(aug.zoom),
                rotation=tuple(float(r) for r in aug.rotation),
                jitter=jitter,
            )

        # Each record is a random crop of one case: a folder with fewer training cases than a batch
        # (a small PDDCA subset) lists every case as often as one epoch needs to fill a batch.
        batch = int(self.config.batch_size)
        n = len(cases)
        repeats = max(1, -(-batch // n))
        source = pipeline.FunctionSource(n * repeats, lambda i: {"index": np.int64(i % n)})
        return pipeline.make_iterator(
            source,
            batch_size=batch,
            seed=int(self.config.seed) + seed_offset,
            transform=transform,
            shuffle=True,
            drop_remainder=True,
            prefetch_threads=1,
        )

    def train_iterator(self):
        """Stage-1 batches: random ``train_crop`` boxes (``focus_prob`` of them around the small organs)."""
        return self._iterator(focus=float(self.config.focus_prob), jitter=0, seed_offset=0)

    def sos_iterator(self, seed_offset):
        """Stage-2/3 batches: boxes holding the small organs (``sos_focus_prob``), with jitter."""
        return self._iterator(
            focus=float(self.config.sos_focus_prob),
            jitter=int(self.config.ae.jitter),
            seed_offset=seed_offset,
        )

    # ---------------------------------------------------------------- state

    def _snet_tx(self):
        o, n = self.config.optim, int(self.config.stages.snet.num_steps)
        bounds = _boundaries(n, tuple(o.decay_at))
        snet = sgd(
            _warmup_multistep(
                float(o.snet_lr), int(o.snet_warmup_steps), bounds, float(o.snet_decay)
            ),
            momentum=float(o.snet_momentum),
            weight_decay=float(o.snet_weight_decay),
        )
        if not self.sol:
            return snet
        sol = adam(
            multistep(float(o.sol_lr), bounds, float(o.sol_decay)) if bounds else float(o.sol_lr)
        )

        def labels(params):
            return {
                k: jax.tree.map(lambda _, k=k: "sol" if k == "SOL" else "snet", v)
                for k, v in params.items()
            }

        return optax.multi_transform({"snet": snet, "sol": sol}, labels)

    def _ae_tx(self):
        o = self.config.optim
        n = int(self.config.stages.ae.num_steps)
        lr = float(o.ae_pretrain_lr)
        schedule = multistep(lr, [n], float(o.ae_lr) / lr) if n > 0 else float(o.ae_lr)
        return adam(schedule, weight_decay=float(o.ae_weight_decay))

    def init_state(self, rng):
        """``{"snet"}`` (S-Net + SOL, SGD and Adam in one ``multi_transform``), ``"sos"`` (the SOS
        branches, Adam) and ``"ae"`` (the shape autoencoder, Adam): every network of every stage.

        ``rng`` initialises the parameters; each network's step key is folded out of it apart.
        """
        key = jax.random.wrap_key_data(jnp.asarray(rng))
        k_snet, k_sos, k_ae = jax.random.split(key, 3)

        def step_key(i):
            return jax.random.key_data(jax.random.fold_in(key, 1000 + i))

        x = jnp.zeros((1, *self.train_crop, 1), jnp.float32)
        v = dict(fast_init(self.backbone, k_snet, x))
        params = v.pop("params")
        state = {
            "snet": TrainState.create(
                apply_fn=self.backbone.apply,
                params=params,
                tx=self._snet_tx(),
                rng=step_key(0),
                model_state=v,
            )
        }
        if self.kind == "snet":
            return state
        o = self.config.optim
        crops = jnp.zeros((len(SMALL), 1, *self.crop, 1), jnp.float32)
        v = dict(jax.jit(lambda k, c: self.sos.init(k, c, False))(rbg_key(k_sos), crops))
        params = v.pop("params")
        state["sos"] = TrainState.create(
            apply_fn=self.sos.apply,
            params=params,
            tx=adam(float(o.sos_lr), weight_decay=float(o.sos_weight_decay)),
            rng=step_key(1),
            model_state=v,
        )
        if self.shape_enabled:
            v = dict(fast_init(self.ae, k_ae, jnp.zeros((1, *self.crop, 1), jnp.float32)))
            params = v.pop("params")
            state["ae"] = TrainState.create(
                apply_fn=self.ae.apply,
                params=params,
                tx=self._ae_tx(),
                rng=step_key(2),
                model_state=v,
            )
        return state

    # ---------------------------------------------------------------- losses

    def snet_loss(self, params, model_state, batch, rng, rest):
        """Stage 1: focal + ``dice_weight`` adaptive Tversky (presence-weighted) [+ heatmap MSE]."""
        del rng, rest
        lc = self.config.loss
        out, updates = self.backbone.apply(
            {"params": params, **model_state}, batch["image"], train=True, mutable=["batch_stats"]
        )
        logits, w = out["main_result"], batch["weights"]
        focal = focal_loss(
            logits,
            batch["label"],
            gamma=float(lc.focal_gamma),
            alpha=tuple(float(a) for a in lc.focal_alpha),
            presence=w,
        )
        tversky = adaptive_tversky_loss(logits, batch["label"], presence=w)
        tversky = _over_devices(tversky, jnp.sum(w), self.axis_name)  # presence-weighted mean
        loss = focal + float(lc.dice_weight) * tversky
        metrics = {"focal": focal, "tversky": tversky}
        if self.sol:
            hc = self.config.heatmap
            target = heatmap_targets(
                batch["centres"],
                batch["valid"],
                self.train_crop,
                tuple(float(s) for s in hc.sigma),
                None if int(hc.z_halfwidth) < 0 else int(hc.z_halfwidth),
                float(hc.floor or 0.0),
            )
            valid = batch["valid"][:, None, None, None, :]
            hm = heatmap_mse(
                out["heatmap"] * valid,
                target,
                balanced=bool(lc.get("heatmap_balanced", False)),
                others=bool(lc.get("heatmap_others", False)),
            )
            loss = loss + float(lc.heatmap_weight) * hm
            peak = jnp.max(out["heatmap"], axis=(1, 2, 3))
            peak = _weighted_mean(peak, batch["valid"], self.axis_name)
            metrics.update(heatmap_mse=hm, heatmap_peak=peak)
        return loss, (metrics, {**model_state, **updates})

    def ae_pretrain_loss(self, params, model_state, batch, rng, rest):
        """Stage 2: the autoencoder reconstructs ground-truth small-organ crops (MSE, annotated organs)."""
        del rng, rest
        loc = jnp.round(batch["centres"] + batch["jitter"]).astype(jnp.int32)
        truth = crop_small_labels(batch["label"], loc, SMALL, self.crop).reshape(-1, *self.crop, 1)
        out, updates = self.ae.apply(
            {"params": params, **model_state},
            truth,
            train=True,
            return_dict=True,
            mutable=["batch_stats"],
        )
        w = batch["valid"].reshape(-1)
        mse = _weighted_mean(_per_crop_mse(out["recon"], truth), w, self.axis_name)
        hard = (out["recon"] > 0.5).astype(jnp.float32)
        inter = jnp.sum((hard * truth).reshape(truth.shape[0], -1), -1)
        total = jnp.sum((hard + truth).reshape(truth.shape[0], -1), -1)
        dice = _weighted_mean(2 * inter / jnp.maximum(total, 1.0), w, self.axis_name)
        metrics = {"recon_mse": mse, "recon_dice": dice}
        loss = mse
        dice_weight = float(self.config.ae.get("dice_weight", 0.0))
        if dice_weight:
            wv = w[:, None, None, None, None]  # unannotated organs' crops drop out of the sums
            soft = soft_dice_loss(
                out["recon"] * wv, truth * wv, activation="none", axis_name=self.axis_name
            )
            loss = loss + dice_weight * soft
            metrics["recon_soft_dice_loss"] = soft
        return loss, (metrics, {**model_state, **updates})

    def sos_inputs(self, state, batch):
        """The SOS crops of a batch: centres from the frozen S-Net's heatmaps (or the truth's),
        image crops ``(n, B, *crop, 1)``, truth crops ``(B, n, *crop, 1)``; gradients stopped."""
        image = batch["image"]
        spatial = image.shape[1:4]
        if self.centre == "truth":
            c = batch["centres"].reshape(-1, 3)
            start = box_starts(c, self.crop, spatial)
            loc = (start + jnp.asarray(self.crop, jnp.int32) // 2).reshape(batch["centres"].shape)
        else:
            snet = state["snet"]
            out = self.backbone.apply(snet.variables(), image, train=False)
            loc, _ = locate_small_organs(out["heatmap"], self.crop)
        crops = jax.vmap(lambda c: crop_at(image, c, self.crop), in_axes=1)(loc)
        truth = crop_small_labels(batch["label"], loc, SMALL, self.crop)
        truth_centre = jnp.round(batch["centres"]).astype(jnp.int32)
        hit = jnp.all(jnp.abs(truth_centre - loc) <= jnp.asarray(self.crop) // 2, axis=-1)
        return jax.lax.stop_gradient(
            {
                "crops": crops,
                "truth": truth,
                "valid": batch["valid"],
                "hit": _weighted_mean(hit.astype(jnp.float32), batch["valid"], self.axis_name),
            }
        )

    def _sos_forward(self, params, model_state, inputs, train=True):
        logits, updates = self.sos.apply(
            {"params": params, **model_state}, inputs["crops"], train, mutable=["batch_stats"]
        )
        return jnp.moveaxis(logits.astype(jnp.float32), 0, 1), updates  # (B, n, *crop, 1)

    def _ae_outputs(self, ae_state_or_vars, masks):
        variables = (
            ae_state_or_vars.variables()
            if isinstance(ae_state_or_vars, TrainState)
            else ae_state_or_vars
        )
        out, updates = self.ae.apply(
            variables, masks, train=True, return_dict=True, mutable=["batch_stats"]
        )
        return out, updates

    def _shape_distances(self, a, b, w):
        """Weighted MSEs between two autoencoder outputs: codes, x1, x2."""
        ax = self.axis_name
        return (
            _weighted_mean(_per_crop_mse(a["code"], b["code"]), w, ax),
            _weighted_mean(_per_crop_mse(a["features"][0], b["features"][0]), w, ax),
            _weighted_mean(_per_crop_mse(a["features"][1], b["features"][1]), w, ax),
        )

    def sos_seg_loss(self, params, model_state, batch, rng, rest):
        """Stage 3 without the shape constraint: the SOS segmentation loss alone."""
        del rng, rest
        logits, updates = self._sos_forward(params, model_state, batch)
        loss, m = binary_sos_loss(
            logits,
            batch["truth"],
            batch["valid"],
            float(self.config.loss.sos_dice_weight),
            self.axis_name,
        )
        return loss, ({**m, "crop_hit": batch["hit"]}, {**model_state, **updates})

    def sos_gen_loss(self, params, model_state, critic, batch, rng, rest):
        """Stage 3, SOS (generator): segmentation + 5 MSE(codes) + MSE(x1) + MSE(x2) + MSE(masks)."""
        del rng, rest
        s = self.config.shape
        logits, updates = self._sos_forward(params, model_state, batch)
        seg, m = binary_sos_loss(
            logits,
            batch["truth"],
            batch["valid"],
            float(self.config.loss.sos_dice_weight),
            self.axis_name,
        )
        pred = jax.nn.sigmoid(logits).reshape(-1, *self.crop, 1)
        truth = batch["truth"].reshape(-1, *self.crop, 1)
        w = batch["valid"].reshape(-1)
        out_p, _ = self._ae_outputs(critic, pred)
        out_t, _ = self._ae_outputs(critic, truth)
        code, x1, x2 = self._shape_distances(out_p, out_t, w)
        mask = _weighted_mean(_per_crop_mse(pred, truth), w, self.axis_name)
        shape = float(s.code_weight) * code + float(s.feature_weight) * (x1 + x2)
        shape = shape + float(s.mask_weight) * mask
        m.update(seg=seg, shape=shape, code_mse=code, crop_hit=batch["hit"])
        return seg + shape, (m, {**model_state, **updates})

    def ae_critic_loss(self, params, model_state, gen, batch, rng, rest):
        """Stage 3, autoencoder (critic): reconstruct truth and prediction, push their codes apart.

        The prediction (``batch["pred"]``, the SOS sigmoid before this step's update, no gradient)
        is computed once by the stage's step, outside the critic loop.
        """
        del gen, rng, rest
        s = self.config.shape
        pred = batch["pred"].reshape(-1, *self.crop, 1)
        truth = batch["truth"].reshape(-1, *self.crop, 1)
        w = batch["valid"].reshape(-1)
        out_p, upd = self._ae_outputs({"params": params, **model_state}, pred)
        out_t, upd = self._ae_outputs({"params": params, **model_state, **upd}, truth)
        recon = _weighted_mean(_per_crop_mse(out_p["recon"], pred), w, self.axis_name)
        recon = recon + _weighted_mean(_per_crop_mse(out_t["recon"], truth), w, self.axis_name)
        code, x1, x2 = self._shape_distances(out_p, out_t, w)
        distance = code + float(s.critic_feature_weight) * (x1 + x2)
        loss = float(s.critic_recon_weight) * recon - float(s.critic_distance_weight) * distance
        return loss, ({"recon_mse": recon, "code_mse": code}, {**model_state, **upd})

    # ---------------------------------------------------------------- stages

    def _check_stages(self):
        st = self.config.stages
        sos = self.kind == "focusnet"
        want = {"snet": True, "ae": self.shape_enabled, "sos_warmup": sos, "sos": sos}
        what = {"snet": "S-Net", "ae": "shape autoencoder", "sos_warmup": "SOS branches"}
        what["sos"] = what["sos_warmup"]
        for name, used in want.items():
            n = int(st[name].num_steps) if name in st else 0
            if n < 0:
                raise ValueError(f"config.stages.{name}.num_steps: expected >= 0, got {n}")
            if not used and n:
                raise ValueError(
                    f"config.stages.{name}.num_steps: expected 0 (this configuration has no "
                    f"{what[name]} to train), got {n}"
                )

    def stage_steps(self, axis_name=None):
        """``{stage name: step(state, batch)}`` of this configuration (``axis_name`` for ``pmap``)."""
        ex = self if axis_name == self.axis_name else Experiment(self.config, axis_name=axis_name)
        steps = {"snet": supervised_step(ex.snet_loss, key="snet", axis_name=axis_name)}
        if ex.kind == "snet":
            return steps
        if ex.shape_enabled:
            steps["ae"] = supervised_step(ex.ae_pretrain_loss, key="ae", axis_name=axis_name)
            inner = adversarial_step(
                ex.sos_gen_loss,
                ex.ae_critic_loss,
                n_critic=1,
                gen="sos",
                critic="ae",
                axis_name=axis_name,
            )
        seg_only = supervised_step(ex.sos_seg_loss, key="sos", axis_name=axis_name)
        if not ex.shape_enabled:
            inner = seg_only

        def sos_step(state, batch):
            inputs = ex.sos_inputs(state, batch)
            if ex.shape_enabled:  # the critic's input: the SOS prediction before this update
                sos = state["sos"]
                logits, _ = ex._sos_forward(sos.params, sos.model_state, inputs)
                inputs["pred"] = jax.lax.stop_gradient(jax.nn.sigmoid(logits))
            return inner(state, inputs)

        def sos_warmup_step(state, batch):  # the segmentation loss alone, before the shape terms
            return seg_only(state, ex.sos_inputs(state, batch))

        steps["sos_warmup"] = sos_warmup_step
        steps["sos"] = sos_step
        return steps

    def stages(self):
        """(1) S-Net + SOL, (2) shape-AE pre-training, (3) SOS warm-up (its segmentation loss alone; ours,
        quick only), (4) SOS (adversarial), as configured.

        The training cases are loaded and checked here, before anything compiles.
        """
        _ = self.data.train
        steps = self.stage_steps(self.axis_name)
        st = self.config.stages
        out = [medjax.train.Stage("snet_sol", int(st.snet.num_steps), steps["snet"])]
        if "ae" in steps:
            out.append(
                medjax.train.Stage(
                    "shape_ae",
                    int(st.ae.num_steps),
                    steps["ae"],
                    iterator=lambda: self.sos_iterator(1),
                )
            )
        warmup = int(st.sos_warmup.num_steps) if "sos_warmup" in st else 0
        if "sos" in steps and warmup:
            out.append(
                medjax.train.Stage(
                    "sos_warmup", warmup, steps["sos_warmup"], iterator=lambda: self.sos_iterator(3)
                )
            )
        if "sos" in steps:
            name = "sos_adversarial" if self.shape_enabled else "sos"
            out.append(
                medjax.train.Stage(
                    name, int(st.sos.num_steps), steps["sos"], iterator=lambda: self.sos_iterator(2)
                )
            )
        return out

    # ---------------------------------------------------------------- inference

    def variables(self, state):
        """Inference variables of ``self.full``: S-Net + SOL with the SOS branches under ``SOS``."""
        snet = state["snet"]
        if self.kind == "snet":
            return snet.variables()
        sos = state["sos"]
        stats = dict(snet.model_state.get("batch_stats", {}))
        stats["SOS"] = sos.model_state["batch_stats"]
        return {"params": {**snet.params, "SOS": sos.params}, "batch_stats": stats}

    def _predict_windows(self, windows, variables, threshold):
        """Sliding-window predictor: windows ``(N, d, H, W, 1 + n)`` (image, truth-centre markers) ->
        ``(N, d, H, W, 2K + 2n)``: S-Net and FocusNetV2 probabilities, heatmaps, pasted boxes."""
        x = windows[..., :1]
        if self.kind == "snet":
            out = self.full.apply(variables, x, train=False)
            p = jax.nn.softmax(out["main_result"], axis=-1)
            return p
        n = len(SMALL)
        if self.centre == "truth":
            marks = windows[..., 1:]
            b, *spatial, _ = marks.shape
            flat = jnp.moveaxis(marks, -1, 1).reshape(b, n, -1)
            loc = jnp.stack(jnp.unravel_index(jnp.argmax(flat, -1), tuple(spatial)), -1)
            out = self.full.apply(variables, x, train=False, location=loc.astype(jnp.int32))
            mask = jnp.max(flat, -1) > 0.5
        else:
            out = self.full.apply(variables, x, train=False)
            mask = jnp.max(out["heatmap"], axis=(1, 2, 3)) > threshold
        main = out["main_result"]
        refined = paste_small_organs(main, out["small_result"], out["location"], SMALL, mask)
        ones = jnp.ones((x.shape[0], *self.crop, 1), jnp.float32)
        boxes = [
            paste_at(
                jnp.zeros_like(x), ones * mask[:, j, None, None, None, None], out["location"][:, j]
            )
            for j in range(n)
        ]
        return jnp.concatenate(
            [
                jax.nn.softmax(main, axis=-1),
                jax.nn.softmax(refined, axis=-1),
                out["heatmap"],
                *boxes,
            ],
            axis=-1,
        )

    def infer(self, state, image, centres=None, valid=None):
        """Sliding-window inference of one volume ``(D, H, W, 1)``: host arrays ``snet`` and
        ``focusnet`` probabilities ``(D, H, W, 10)``, ``heatmap (D, H, W, 3)``, ``boxes`` (fraction of
        windows that pasted each organ's crop there), per-organ ``peak`` and ``refined``."""
        image = np.asarray(image, np.float32)
        n = len(SMALL)
        x = image
        if self.kind == "focusnet":
            marks = np.zeros(image.shape[:-1] + (n,), np.float32)
            if self.centre == "truth" and centres is not None:
                for j in range(n):
                    if valid is None or valid[j]:
                        z, h, w = (int(round(float(v))) for v in centres[j])
                        marks[z, h, w, j] = 1.0
            x = np.concatenate([image, marks], axis=-1)
        roi = (self.window, image.shape[1], image.shape[2])
        overlap = 1.0 - (self.stride + 0.5) / self.window  # int(window * (1 - overlap)) == stride
        threshold = jnp.float32(self.config.eval.heatmap_threshold)
        out = sliding_window_inference(
            jnp.asarray(x[None]),
            roi,
            self._predict_windows,
            overlap=max(overlap, 0.0),
            mode="constant",
            pad_value=AIR,
            args=(self.variables(state), threshold),
        )
        out = np.asarray(out)[0]
        k = NUM_CLASSES
        res = {"snet": out[..., :k]}
        if self.kind == "snet":
            return res
        res["focusnet"] = out[..., k : 2 * k]
        res["heatmap"] = out[..., 2 * k : 2 * k + n]
        res["boxes"] = out[..., 2 * k + n :]
        res["peak"] = res["heatmap"].reshape(-1, n).max(axis=0)
        res["refined"] = res["boxes"].reshape(-1, n).max(axis=0) > 0
        flat = res["heatmap"].reshape(-1, n).argmax(axis=0)
        res["peak_at"] = np.stack(np.unravel_index(flat, res["heatmap"].shape[:3]), -1)
        return res

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, state, workdir):
        """Per-organ Dice / HD95 of S-Net alone and of FocusNetV2 on the test cases; writes figures."""
        t0 = time.perf_counter()
        workdir = pathlib.Path(workdir)
        cases = self.data.test()
        outs, times = [], []
        for case in cases:
            ti = time.perf_counter()
            outs.append(self.infer(state, case["image"], case["centres"], case["valid"]))
            times.append(time.perf_counter() - ti)
        models = ("snet",) if self.kind == "snet" else ("snet", "focusnet")
        eval_cases = [
            {
                "id": c["id"],
                "image": c["image"],
                "label": c["label"],
                "spacing": c["spacing"],
                "classes": [k + 1 for k in np.flatnonzero(c["presence"])],
            }
            for c in cases
        ]
        results = {
            "kind": self.kind,
            "data": self.config.data,
            "sos_centre": self.centre if self.kind == "focusnet" else None,
            "num_test_cases": len(cases),
        }
        per_case = {}
        for name in models:
            it = iter(outs)
            res = evaluate_segmentation(
                eval_cases,
                lambda img, name=name, it=it: next(it)[name][None],
                num_classes=NUM_CLASSES,
                class_names=NAMES,
                surface=bool(self.config.eval.surface),
            )
            per_case[name] = res["per_case"]
            for key, value in res.items():
                if key not in ("per_case", "num_cases", "inference_s_per_case"):
                    results[f"{name}_{key}"] = value
            lists = {"small": [], "large": []}
            for row in res["per_case"]:
                for group, organs in (("small", SMALL), ("large", LARGE)):
                    vals = [row.get(f"dice_{NAMES[o - 1]}", math.nan) for o in organs]
                    vals = [v for v in vals if math.isfinite(v)]
                    lists[group].append(float(np.mean(vals)) if vals else math.nan)
            summary = summarize({f"small_organ_dice_{name}": lists["small"]})
            summary.update(summarize({f"large_organ_dice_{name}": lists["large"]}))
            results.update(summary)
            per_case[f"small_{name}"], per_case[f"large_{name}"] = lists["small"], lists["large"]
        if self.kind == "focusnet":
            results.update(self._sol_summary(cases, outs))
            for group in ("small", "large"):
                g = paired_bootstrap(per_case[f"{group}_snet"], per_case[f"{group}_focusnet"])
                results[f"{group}_organ_dice_gain"] = g
            for o in SMALL:
                key = f"dice_{NAMES[o - 1]}"
                results[f"gain_{key}"] = paired_bootstrap(
                    [r.get(key, math.nan) for r in per_case["snet"]],
                    [r.get(key, math.nan) for r in per_case["focusnet"]],
                )
        results["inference_s_per_case"] = float(np.mean(times[1:] if len(times) > 1 else times))
        if bool(self.config.eval.figures) and cases:
            try:
                results["figures"] = self._figures(workdir / "figures", cases[0], outs[0], results)
            except Exception as e:  # figures must never lose the metrics
                print(f"focusnet2021: figures failed: {type(e).__name__}: {e}")
        results["eval_wall_s"] = time.perf_counter() - t0
        results["per_case"] = per_case
        return results

    def _sol_summary(self, cases, outs):
        """Localisation error (mm) of SOL's peaks, heatmap peaks and which organs were refined."""
        out, lists, skipped = {}, {}, []
        for case, res in zip(cases, outs, strict=True):
            for j, lab in enumerate(SMALL):
                name = NAMES[lab - 1]
                lists.setdefault(f"heatmap_peak_{name}", []).append(float(res["peak"][j]))
                lists.setdefault(f"refined_{name}", []).append(float(res["refined"][j]))
                if not res["refined"][j]:
                    skipped.append(
                        f"{case['id']} {name}: heatmap peak {res['peak'][j]:.2f} <= "
                        f"{float(self.config.eval.heatmap_threshold):g}, not refined (S-Net kept)"
                    )
                err = math.nan
                if case["valid"][j]:
                    d = (res["peak_at"][j] - case["centres"][j]) * case["spacing"]
                    err = float(np.sqrt(np.sum(d**2)))
                lists.setdefault(f"localisation_mm_{name}", []).append(err)
        out.update(summarize(lists))
        out["not_refined"] = skipped
        return out

    def report(self, results):
        """Markdown: per-organ Dice and HD95 of S-Net and FocusNetV2, the four means, the gain."""
        models = ("snet",) if results.get("kind") == "snet" else ("snet", "focusnet")
        labels = {"snet": "S-Net", "focusnet": "FocusNetV2"}
        head = ["organ"] + [f"{labels[m]} Dice" for m in models]
        head += [f"{labels[m]} HD95 (mm)" for m in models]
        rows = []
        for o in (*SMALL, *LARGE):
            name = NAMES[o - 1]
            cells = [name + (" (small)" if o in SMALL else "")]
            for metric in ("dice", "hd95"):
                for m in models:
                    k = f"{m}_{metric}_{name}"
                    cells.append(mean_std(results.get(k), results.get(f"{k}_std")))
            rows.append(cells)
        n = results.get("num_test_cases", 0)
        lines = [
            f"{results.get('kind')} model on {n} test case(s) ({results.get('data')} data), "
            f"checkpoint step {results.get('checkpoint_step', '?')}; mean ± std over cases",
            "",
            markdown_table(head, rows),
            "",
        ]
        means = [["mean of the small organs"], ["mean of the large organs"]]
        for m in models:
            means[0].append(
                mean_std(
                    results.get(f"small_organ_dice_{m}"), results.get(f"small_organ_dice_{m}_std")
                )
            )
            means[1].append(
                mean_std(
                    results.get(f"large_organ_dice_{m}"), results.get(f"large_organ_dice_{m}_std")
                )
            )
        lines.append(markdown_table(["Dice", *(labels[m] for m in models)], means))
        if "focusnet" in models:
            lines.append("")
            for group in ("small", "large"):
                g = results.get(f"{group}_organ_dice_gain")
                lines.append(
                    f"{group}-organ Dice, FocusNetV2 - S-Net, paired over cases: {gain_cell(g)}"
                    if g
                    else f"{group}-organ Dice gain: fewer than 2 cases, no interval"
                )
            loc = [
                f"{NAMES[o - 1]} {mean_std(results.get(f'localisation_mm_{NAMES[o - 1]}'))} mm"
                for o in SMALL
            ]
            lines.append(
                f"SOL localisation error (heatmap peak to the truth's centroid): {', '.join(loc)}"
            )
            skipped = results.get("not_refined") or []
            lines.append(
                f"refinement skipped (no heatmap peak above the threshold): {len(skipped)} organ(s)"
                + (": " + "; ".join(skipped) if skipped else "")
            )
        return "\n".join(lines)

    # ---------------------------------------------------------------- comparison

    def compare_table(self, rows):
        """One line per row: its model's small/large/per-small-organ Dice, HD95, gain, localisation."""
        head = ["Variant", "small-organ Dice", "large-organ Dice"]
        head += [NAMES[o - 1] for o in SMALL]
        head += ["small-organ HD95 (mm)", "gain over its S-Net [95% CI] (cases)", "SOL error (mm)"]
        head += ["Train (s)"]
        body = []
        for r in rows.values():
            m = "focusnet" if r.get("kind") == "focusnet" else "snet"
            cells = [r.get("label", r.get("row"))]
            for key in (f"small_organ_dice_{m}", f"large_organ_dice_{m}"):
                cells.append(mean_std(r.get(key), r.get(f"{key}_std")))
            for o in SMALL:
                key = f"{m}_dice_{NAMES[o - 1]}"
                cells.append(mean_std(r.get(key), r.get(f"{key}_std")))
            hd = [r.get(f"{m}_hd95_{NAMES[o - 1]}") for o in SMALL]
            hd = [v for v in hd if isinstance(v, int | float) and math.isfinite(v)]
            cells.append(f"{np.mean(hd):.1f}" if hd else "-")
            cells.append(gain_cell(r.get("small_organ_dice_gain")) if m == "focusnet" else "-")
            loc = [r.get(f"localisation_mm_{NAMES[o - 1]}") for o in SMALL]
            loc = [v for v in loc if isinstance(v, int | float) and math.isfinite(v)]
            cells.append(
                f"{np.mean(loc):.1f}"
                if loc and m == "focusnet" and r.get("sos_centre") == "predicted"
                else "-"
            )
            tw = r.get("train_wall_s")
            cells.append(f"{tw:.0f}" if isinstance(tw, int | float) else "-")
            body.append(cells)
        return markdown_table(head, body)

    def compare_figures(self, rows, workdir):
        """compare_dice.png: each row's Dice per small organ and the small/large means."""
        cats = [NAMES[o - 1] for o in SMALL] + ["small mean", "large mean"]
        series = {}
        for r in rows.values():
            m = "focusnet" if r.get("kind") == "focusnet" else "snet"
            keys = [f"{m}_dice_{NAMES[o - 1]}" for o in SMALL]
            keys += [f"small_organ_dice_{m}", f"large_organ_dice_{m}"]
            series[r.get("label", r.get("row"))] = (
                [r.get(k, np.nan) for k in keys],
                [r.get(f"{k}_std", np.nan) for k in keys],
            )
        path = pathlib.Path(workdir) / "figures" / "compare_dice.png"
        return [F.bar_chart(path, cats, series, ylabel="Dice", ylim=(0, 1))]

    # ---------------------------------------------------------------- figures

    def _figures(self, fig_dir, case, out, results):
        written = [
            self._contour_figure(fig_dir / "contours_case0.png", case, out),
            self._dice_bars(fig_dir / "dice_per_organ.png", results),
        ]
        if self.kind == "focusnet":
            written.append(self._heatmap_figure(fig_dir / "heatmaps_case0.png", case, out))
            written.append(self._crop_figure(fig_dir / "crops_case0.png", case, out))
        return sorted(p.name for p in written)

    # Axial slices are drawn with rows (anterior -> posterior) running downwards: every 2D array
    # goes through F.rows_down and every voxel (h, w) through F.rows_down_point.

    @staticmethod
    def _panel(image2d, title=None, **kw):
        """A panel of one axial slice (the CT window of the phantoms), maps over it as ``kw``."""
        kw = {
            k: F.rows_down(v) if k in ("labels", "heat", "contours") else v for k, v in kw.items()
        }
        return F.Panel(F.rows_down(image2d), title=title, vmin=-0.1, vmax=0.4, **kw)

    def _contour_figure(self, path, case, out):
        label, img = case["label"], case["image"][..., 0]
        preds = {"truth": label, "S-Net": out["snet"].argmax(-1)}
        if "focusnet" in out:
            preds["FocusNetV2"] = out["focusnet"].argmax(-1)
        groups = (("optic chiasm / nerves", SMALL), ("brainstem", (1,)), ("parotids", (6, 7)))
        groups += (("mandible / submandibular", (3, 8, 9)),)
        slices = [F.choose_slice(np.isin(label, organs), axis=0) for _, organs in groups]
        rows = [
            [
                self._panel(
                    img[z], f"{name}: {title} (z={z})", contours=lab[z], num_classes=NUM_CLASSES
                )
                for (title, _), z in zip(groups, slices, strict=True)
            ]
            for name, lab in preds.items()
        ]
        return F.panel_grid(
            path,
            rows,
            panel_size=(2.6, 2.7),
            title=f"{case['id']}: organ contours (colours by label)",
        )

    def _dice_bars(self, path, results):
        models = ("snet",) if self.kind == "snet" else ("snet", "focusnet")
        labels = {"snet": "S-Net", "focusnet": "FocusNetV2"}
        cats = [NAMES[o - 1] for o in (*SMALL, *LARGE)]
        series = {
            labels[m]: (
                [results.get(f"{m}_dice_{c}", np.nan) for c in cats],
                [results.get(f"{m}_dice_{c}_std", np.nan) for c in cats],
            )
            for m in models
        }
        return F.bar_chart(
            path,
            cats,
            series,
            ylabel="Dice (test cases)",
            ylim=(0, 1),
            title="per-organ Dice (small organs first)",
        )

    def _heatmap_figure(self, path, case, out):
        img = case["image"][..., 0]
        thr = float(self.config.eval.heatmap_threshold)
        rows = img.shape[1]
        panels = []
        for j, lab in enumerate(SMALL):
            z, h, w = (int(v) for v in out["peak_at"][j])
            marks = [
                (*F.rows_down_point(h, w, rows), "x", dict(color="cyan", ms=8, mew=2, label="peak"))
            ]
            if case["valid"][j]:
                _, ch, cw = case["centres"][j]
                marks.append(
                    (
                        *F.rows_down_point(ch, cw, rows),
                        "+",
                        dict(color="lime", ms=9, mew=2, label="truth centroid"),
                    )
                )
            state = "refined" if out["refined"][j] else f"not refined (peak <= {thr:g})"
            panels.append(
                self._panel(
                    img[z],
                    f"{NAMES[lab - 1]}: peak {out['peak'][j]:.2f} at z={z}\n{state}",
                    heat=out["heatmap"][z, :, :, j],
                    heat_kw=dict(cmap="hot", alpha=0.5, vmin=0, vmax=1),
                    markers=marks,
                    legend=j == 0,
                )
            )
        return F.panel_grid(
            path,
            [panels],
            panel_size=(3.0, 3.2),
            title=f"{case['id']}: SOL heatmaps (blended over windows) and their peaks",
        )

    def _crop_figure(self, path, case, out):
        img, label = case["image"][..., 0], case["label"]
        snet, focus = out["snet"].argmax(-1), out["focusnet"].argmax(-1)
        d, h, w = self.crop
        rows = []
        for j, lab in enumerate(SMALL):
            c = out["peak_at"][j]
            start = [
                int(np.clip(c[k] - s // 2, 0, img.shape[k] - s)) for k, s in enumerate((d, h, w))
            ]
            box = tuple(slice(a, a + s) for a, s in zip(start, (d, h, w), strict=True))
            z = F.choose_slice(label[box] == lab, axis=0)
            sl = (z, slice(None), slice(None))
            crop_img = img[box][sl]
            name = NAMES[lab - 1]
            row = []
            for title, pred, colour in (
                ("truth", label, "lime"),
                ("S-Net", snet, "red"),
                ("FocusNetV2", focus, "deepskyblue"),
            ):
                extra = {}
                if title == "FocusNetV2":  # its organ probability shaded under the contour
                    extra = dict(
                        heat=out["focusnet"][box][sl][..., lab],
                        heat_kw=dict(cmap="Blues", alpha=0.35, vmin=0, vmax=1),
                    )
                row.append(
                    self._panel(
                        crop_img,
                        f"{name}: {title}",
                        contours=(pred[box][sl] == lab).astype(np.int32),
                        num_classes=2,
                        contour_colors=colour,
                        **extra,
                    )
                )
            rows.append(row)
        return F.panel_grid(
            path,
            rows,
            panel_size=(2.8, 2.8),
            title=f"{case['id']}: the zoomed {d}x{h}x{w} crops at SOL's peaks (FocusNetV2: its "
            "organ probability shaded)",
        )

    # ---------------------------------------------------------------- prediction

    @property
    def inplane(self):
        """In-plane size of the network input (the training data's)."""
        if self.config.data == "synthetic":
            return tuple(int(v) for v in self.config.synthetic.shape[1:])
        return tuple(int(v) for v in self.config.pddca.inplane)

    def predict(self, state, inputs, out_dir):
        """Segment CT files (HU): ``<name>_seg.nii.gz`` (``.nrrd`` for NRRD inputs) with the input's
        geometry, and ``predict.json`` saying per file which small organs were refined."""
        out_dir = pathlib.Path(out_dir)
        info = []

        def preprocess(image):
            prepared, _ = prepare_volume(image, self.spacing, self.inplane)
            if prepared.image.shape[0] < self.crop[0]:
                raise ValueError(
                    f"inputs: {image.path} has {prepared.image.shape[0]} slice(s) at "
                    f"{self.spacing[0]:g} mm after resampling, fewer than the SOS crop's "
                    f"{self.crop[0]}"
                )
            return prepared

        def predict(x):
            res = self.infer(state, x[0])
            entry = {}
            if self.kind == "focusnet":
                for j, lab in enumerate(SMALL):
                    entry[NAMES[lab - 1]] = {
                        "heatmap_peak": float(res["peak"][j]),
                        "refined": bool(res["refined"][j]),
                    }
            info.append(entry)
            return res["focusnet" if self.kind == "focusnet" else "snet"][None]

        written = predict_files(
            inputs,
            out_dir,
            predict=predict,
            preprocess=preprocess,
            num_classes=NUM_CLASSES,
            metadata=lambda: {"small_organs": dict(zip(map(str, inputs), info, strict=True))},
        )
        thr = float(self.config.eval.heatmap_threshold)
        for src, entry in zip(inputs, info, strict=True):
            for organ, e in entry.items():
                if not e["refined"]:
                    print(
                        f"{pathlib.Path(src).name}: {organ}: heatmap peak {e['heatmap_peak']:.2f} "
                        f"<= {thr:g}, no refinement (S-Net's label kept)"
                    )
        return written
