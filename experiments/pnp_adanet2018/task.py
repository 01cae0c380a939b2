"""PnP-AdaNet (Dou et al., IJCAI 2018): the medjax Experiment.

What is the paper's own lives here: the 2.5D cardiac slices and their preprocessing, the source
segmenter's loss, the plug-and-play split (a DAM of groups 1..d in front of the frozen groups
d+1..10), the WGAN critics on multi-level features and the stages that train them. The steps are
the engine's (``supervised_step``, ``adversarial_step``), the evaluation, statistics, tables,
figures and NIfTI prediction ``medjax.evaluation``'s.

Stages (one ``medjax train``; each resumes bit-identically, the growing critic count included):

1. ``source``: the segmenter ``seg`` on labelled source (MR) slices: class-weighted cross-entropy
   (``w_c = 1 - N_c / N`` per batch, probabilities clipped at 0.005) + Dice (``sum p^2 + sum y``,
   background included) + ``1e-4 * sum(w^2) / 2``; Adam 1e-3, x0.95 every 1500 steps.
2. ``warmup``: the critics (feature critic + 0.3 x mask critic) against the DAM, which starts as a
   copy of ``seg``'s groups 1..d and stays frozen.
3. ``adapt``: WGAN with MR real and CT fake: ``n_critic(s) = n_critic + s // n_critic_every``
   critic updates (kernels clipped to +-0.03 after each), then one DAM update on ``-D(CT)``;
   RMSProp 3e-4 (TF1's), x0.98 every 100 DAM updates for the DAM and the critics alike. In the DAM
   update the DAM's batch norms run in training mode (batch statistics, running statistics
   updated) and the frozen back and source segmenter in inference mode.
4. ``supervised`` (optional): the upper bound, a second segmenter ``sup`` trained like ``seg`` on
   labelled target slices. It is the only stage that reads target labels; 0 steps skips it.

Data (``config.data``): ``synthetic`` (:mod:`medjax.data.synthetic_cardiac`, unpaired MR and CT
subjects) or ``mmwhs`` (an MM-WHS 2017 folder, :func:`medjax.data.datasets.mmwhs_records`). Every
volume is brought to one layout (:data:`CANONICAL`: axis 0 posterior -> anterior, so coronal slices
are ``volume[k]``; axis 1 superior -> inferior; axis 2 patient right -> left), resampled
(MM-WHS: 1 mm), its top 2 % of intensities clipped and z-scored (each volume by its own
statistics, within its domain), cut to the coronal ROI, and fed as 2.5D inputs (slices k-1, k, k+1
as channels, edges repeated). Evaluation and ``predict`` run the same preprocessing and segment
every slice of a volume.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import medjax.train
from medjax import figures as F
from medjax.data import datasets, pipeline, synthetic_cardiac, transforms
from medjax.data.io import Image, load_image, load_label, orient_back, reorient, unresample
from medjax.evaluation.report import gain_cell, markdown_table, mean_std
from medjax.evaluation.segmentation import Prepared, evaluate_segmentation, predict_files
from medjax.evaluation.stats import paired_bootstrap
from medjax.losses import (
    cross_entropy,
    soft_dice_loss,
    wgan_critic_loss,
    wgan_generator_loss,
)
from medjax.models.pnp_adanet import (
    PnPAdaNet,
    PnPAdaNetBack,
    PnPAdaNetCritic,
    PnPAdaNetFront,
    PnPAdaNetMaskCritic,
    clip_critic_weights,
    critic_inputs,
)
from medjax.nn.blocks import fast_init, rbg_key
from medjax.train.optim import lr_scale, make_optimizer, step_decay
from medjax.train.state import TrainState
from medjax.train.steps import adversarial_step, supervised_step
from medjax.train.transfer import check_workdir_experiment, copy_subtrees, load_workdir_state

EXPERIMENT = "pnp_adanet2018"
DATASETS = ("synthetic", "mmwhs")
CLASSES = datasets.PNP_ADANET_CLASSES  # background, AA, LA, LV, Myo
STRUCTURES = CLASSES[1:]
#: the canonical axis codes: coronal slices along axis 0 (posterior -> anterior), rows superior ->
#: inferior, columns patient right -> left (radiological display), as the synthetic phantoms.
CANONICAL = ("A", "I", "L")
#: the settings evaluated: the source segmenter, the DAM + frozen back, the target-trained one.
SETTINGS = ("no_adaptation", "adapted", "supervised")
SETTING_LABELS = {
    "no_adaptation": "no adaptation",
    "adapted": "PnP-AdaNet",
    "supervised": "supervised on target",
}

# ------------------------------------------------------------------------------------------ data


def normalise(volume, clip_percent):
    """The one intensity preprocessing: clip the top ``clip_percent`` % of a volume, then z-score.

    ``volume``: ``(*S)``; returns float32 ``(*S)``. Each volume is normalised by its own statistics
    (its domain's intensities), in training, evaluation and ``predict`` alike.
    """
    v = np.asarray(volume, np.float32)[..., None]
    v = transforms.percentile_clip(v, 0.0, 100.0 - float(clip_percent))
    return transforms.zscore(v)[..., 0].astype(np.float32)


def slices_25d(volume):
    """2.5D inputs of every coronal slice: ``(D, H, W) -> (D, H, W, 3)`` (slices k-1, k, k+1).

    The first and last slices repeat themselves as their missing neighbour.
    """
    v = np.asarray(volume)
    d = v.shape[0]
    idx = np.clip(np.arange(d)[:, None] + np.arange(-1, 2)[None, :], 0, d - 1)
    return np.moveaxis(v[idx], 1, -1)


def phantom_affine(spacing):
    """The voxel -> RAS affine of a synthetic phantom in :data:`CANONICAL` layout (``spacing`` (3,) mm)."""
    s0, s1, s2 = (float(s) for s in spacing)
    a = np.zeros((4, 4))
    a[0, 2] = -s2  # axis 2: towards the patient's left (-x)
    a[1, 0] = s0  # axis 0: towards anterior (+y)
    a[2, 1] = -s1  # axis 1: towards inferior (-z)
    a[3, 3] = 1.0
    return a


def canonical(image: Image) -> Image:
    """``image`` (3D, one channel) with its voxel axes permuted/flipped to :data:`CANONICAL`."""
    if len(image.spatial_shape) != 3 or image.num_channels != 1:
        raise ValueError(
            f"{image.path}: expected a 3D single-channel volume, got array shape {image.array.shape}"
        )
    return reorient(image, CANONICAL)


def resample(image: Image, spacing) -> Image:
    """``image`` resampled to ``spacing`` (mm) unless it already has it (linear; nearest for labels)."""
    from medjax.data.io import resample_image

    if np.allclose(image.spacing, np.broadcast_to(spacing, (3,)), rtol=1e-5, atol=1e-6):
        return image
    return resample_image(image, spacing)


def map_labels(raw):
    """MM-WHS raw label values -> the 4 PnP-AdaNet classes; every other value is background."""
    out = np.zeros(np.shape(raw), np.int32)
    for value, cls in datasets.PNP_ADANET_LABEL_MAP.items():
        out[np.asarray(raw) == value] = cls
    return out


def roi_box(shape_hw, roi, centre, name):
    """``(row0, col0)`` of a ``roi`` (h, w) box centred on ``centre`` inside a slice of ``shape_hw``.

    Raises ``ValueError`` naming ``name`` (a file) when the slice is smaller than the ROI.
    """
    h, w = (int(s) for s in shape_hw)
    rh, rw = (int(s) for s in roi)
    if h < rh or w < rw:
        raise ValueError(
            f"{name}: the coronal slices are {h} x {w} voxels after resampling, smaller than the "
            f"{rh} x {rw} ROI (config.mmwhs.roi)"
        )
    r0 = int(np.clip(round(centre[0] - rh / 2), 0, h - rh))
    c0 = int(np.clip(round(centre[1] - rw / 2), 0, w - rw))
    return r0, c0


def _bbox(mask):
    """Per-axis (first, last + 1) of a non-empty boolean mask."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return out


class Volumes:
    """The data of one run: source (MR) and target (CT) training volumes, and test cases.

    Subclasses define ``spacing`` (the voxel size training sees), ``source_train``,
    ``target_train``, ``source_test``, ``target_test`` (lists of items) and
    ``volume(item, labelled) -> (image (D, H, W) normalised, label (D, H, W) or None)`` on the
    network's grid. ``labelled=False`` never reads a label.
    """

    spacing: tuple
    source_train: list
    target_train: list
    source_test: list
    target_test: list

    def volume(self, item, labelled):
        raise NotImplementedError

    def case_id(self, item):
        raise NotImplementedError

    @functools.cached_property
    def _cache(self):
        return {}

    def cached(self, item, labelled):
        """:meth:`volume`, computed once per item. A label is read only when ``labelled`` or when
        the item is not an unlabelled target training volume (whose label is never read)."""
        read = bool(labelled) or not any(item == t for t in self.target_train)
        key = (self.case_id(item), read)
        if key not in self._cache:
            self._cache[key] = self.volume(item, read)
        image, label = self._cache[key]
        return image, (label if labelled else None)

    def slice_index(self, items, labelled):
        """``[(item index, slice)]`` of every coronal slice of ``items`` (volumes are read here)."""
        out = []
        for i, item in enumerate(items):
            image, _ = self.cached(item, labelled)
            out += [(i, k) for k in range(image.shape[0])]
        return out

    def cases(self, domain):
        """The test cases of ``domain`` ("source"/"target") for the evaluator (labels read)."""
        items = self.source_test if domain == "source" else self.target_test
        for item in items:
            image, label = self.cached(item, True)
            yield {
                "id": self.case_id(item),
                "image": image[..., None],
                "label": label,
                "spacing": self.spacing,
            }


class SyntheticVolumes(Volumes):
    """:func:`medjax.data.synthetic_cardiac.cardiac_dataset` subjects (unpaired MR and CT)."""

    def __init__(self, config):
        s = config.synthetic
        self.shape = check_shape(s.shape, "config.synthetic.shape")
        self.spacing = tuple(float(v) for v in np.asarray(synthetic_cardiac.FOV_MM) / self.shape)
        self.clip = float(config.clip_percent)
        base = int(s.seed)
        counts = (int(s.num_source_train), int(s.num_target_train), int(s.num_test))
        for name, n in zip(
            ("num_source_train", "num_target_train", "num_test"), counts, strict=True
        ):
            if n < 1:
                raise ValueError(f"config.synthetic.{name}: expected >= 1 subjects, got {n}")
        # (modality, dataset seed, index): cardiac_dataset's unpaired seeding, disjoint sets.
        self.source_train = [("mr", base, i) for i in range(counts[0])]
        self.target_train = [("ct", base, i) for i in range(counts[1])]
        self.source_test = [("mr", base + 1, i) for i in range(counts[2])]
        self.target_test = [("ct", base + 1, i) for i in range(counts[2])]

    def case_id(self, item):
        modality, seed, i = item
        return f"{modality}_{seed}_{i}"

    def phantom(self, item):
        """The raw phantom dict of an item (``image`` before normalisation, ``label``)."""
        modality, seed, i = item
        s = (seed, 1 + synthetic_cardiac.CARDIAC_MODALITIES.index(modality), i)
        return synthetic_cardiac.cardiac_phantom(s, self.shape, modality=modality)

    def volume(self, item, labelled):
        p = self.phantom(item)
        return normalise(p["image"], self.clip), (p["label"] if labelled else None)


class MMWHSVolumes(Volumes):
    """An MM-WHS 2017 folder: ``mr_train_*`` (labelled source) and ``ct_train_*`` (target).

    Each modality's ``*_train_*`` volumes are split into training and test volumes
    (``config.mmwhs.test_fraction``, seeded by ``config.seed``). Source training and all test
    volumes are cut to the ROI around their label's bounding box (its in-plane centre, its
    coronal slices); target training volumes, whose labels are never read, to
    ``config.mmwhs.target_roi`` (the slices' centre or a given box) and all their slices.
    """

    def __init__(self, config):
        root = config.data_dir
        if not root:
            raise ValueError("config.data_dir: expected an MM-WHS folder for data='mmwhs', got ''")
        m = config.mmwhs
        self.roi = tuple(int(v) for v in m.roi)
        check_shape((8,) + self.roi, "config.mmwhs.roi")
        self.spacing = (float(m.spacing),) * 3
        self.clip = float(config.clip_percent)
        self.target_roi = m.target_roi
        records = datasets.mmwhs_records(root, label_map=datasets.PNP_ADANET_LABEL_MAP)
        train = [r for r in records if r["meta"]["split"] == "train"]
        mr = [r for r in train if r["meta"]["modality"] == "mr"]
        ct = [r for r in train if r["meta"]["modality"] == "ct"]
        if not mr:
            raise ValueError(
                f"config.data_dir: no source (MR) volumes mr_train_*_image.nii.gz under {root}"
            )
        unlabelled = [r["id"] for r in mr if r["label"] is None]
        if unlabelled:
            raise ValueError(
                f"config.data_dir: the source (MR) volumes {', '.join(unlabelled[:3])} under "
                f"{root} have no *_label.nii.gz; the source segmenter needs labels"
            )
        if not ct:
            raise ValueError(
                f"config.data_dir: the target (CT) folder is empty: no ct_train_*_image.nii.gz "
                f"under {root}"
            )
        frac = float(m.test_fraction)
        for name, recs in (("MR", mr), ("CT", ct)):
            if len(recs) < 2:
                raise ValueError(
                    f"config.data_dir: expected at least 2 {name} volumes (training and test), "
                    f"got {len(recs)} under {root}"
                )
        self.source_train, self.source_test = _split_two(mr, frac, int(config.seed))
        self.target_train, self.target_test = _split_two(ct, frac, int(config.seed))

    def case_id(self, item):
        return item["id"]

    def _load(self, path, is_label):
        loader = load_label if is_label else load_image
        return resample(canonical(loader(path)), self.spacing)

    def volume(self, item, labelled):
        image = self._load(item["image"][0], False)
        vol = normalise(image.array[..., 0], self.clip)
        training_target = any(item == t for t in self.target_train)
        if labelled and item["label"] is None:
            raise ValueError(
                f"{item['id']}: expected a *_label.nii.gz to evaluate against, got none"
            )
        if training_target and not labelled:
            # The target's training ROI never comes from its label.
            if self.target_roi == "centre":
                centre = (vol.shape[1] / 2, vol.shape[2] / 2)
                r0, c0 = roi_box(vol.shape[1:], self.roi, centre, item["image"][0])
            else:
                r0, c0 = (int(v) for v in self.target_roi)
                roi_box(vol.shape[1:], self.roi, (0, 0), item["image"][0])
            rh, rw = self.roi
            return vol[:, r0 : r0 + rh, c0 : c0 + rw], None
        if item["label"] is None:
            raise ValueError(f"{item['id']}: expected a label to find the heart ROI, got none")
        label = map_labels(self._load(item["label"], True).array)
        if label.shape != vol.shape:
            raise ValueError(
                f"{item['label']}: expected the image's shape {vol.shape} after resampling, "
                f"got {label.shape}"
            )
        if not label.any():
            raise ValueError(f"{item['label']}: no AA, LA, LV or Myo voxel: no heart ROI")
        (z0, z1), (a0, a1), (b0, b1) = _bbox(label > 0)
        r0, c0 = roi_box(vol.shape[1:], self.roi, ((a0 + a1) / 2, (b0 + b1) / 2), item["image"][0])
        rh, rw = self.roi
        crop = (slice(z0, z1), slice(r0, r0 + rh), slice(c0, c0 + rw))
        return vol[crop], (label[crop] if labelled else None)


def _split_two(records, test_fraction, seed):
    n = len(records)
    n_test = int(np.clip(round(test_fraction * n), 1, n - 1))
    train, test = datasets.split(records, (1 - n_test / n, n_test / n), seed=seed)
    return train, test


def check_shape(shape, name):
    """``shape`` (D, H, W) as ints with H, W multiples of 8 (the network's size), else ValueError."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or shape[0] < 1 or shape[1] % 8 or shape[2] % 8 or min(shape[1:]) < 8:
        raise ValueError(
            f"{name}: expected (slices, rows, columns) with rows and columns positive multiples "
            f"of 8, got {shape}"
        )
    return shape


def make_volumes(config):
    """The data of ``config.data``."""
    if config.data not in DATASETS:
        raise ValueError(f"config.data: expected one of {DATASETS}, got {config.data!r}")
    if config.data == "synthetic":
        return SyntheticVolumes(config)
    return MMWHSVolumes(config)


# ----------------------------------------------------------------------------------------- model


def _kernels_l2(params):
    """``sum(w^2) / 2`` over the convolution kernels of a segmenter's params."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return 0.5 * sum(jnp.sum(jnp.square(x)) for p, x in leaves if p[-1].key == "kernel")


def tf_rmsprop(schedule):
    """TF1's ``RMSPropOptimizer`` defaults (decay 0.9, epsilon 1e-10 inside the square root, the
    mean square initialised to ones) with ``schedule``, then medjax's host-settable ``lr_scale``."""
    opt = optax.rmsprop(schedule, decay=0.9, eps=1e-10, eps_in_sqrt=True, initial_scale=1.0)
    return optax.chain(opt, lr_scale())


def joint_update_schedule(base, *, every, factor, n_critic, n_critic_every, warmup, steps):
    """The critics' learning rate as a function of their own update count.

    The original decays both optimisers x``factor`` every ``every`` joint (DAM) updates. The critic
    counts its own updates: ``warmup`` in the warm-up, then ``n_critic + j // n_critic_every``
    before joint update j. This inverts that count exactly (a table of ``steps + 1`` entries).
    """
    j = np.arange(int(steps) + 1)
    starts = int(warmup) + np.concatenate([[0], np.cumsum(n_critic + j[:-1] // n_critic_every)])
    starts = starts.astype(np.int32)

    def schedule(count):
        table = jnp.asarray(starts)  # a constant of the step that uses it
        done = jnp.maximum(jnp.searchsorted(table, count, side="right") - 1, 0)
        return base * jnp.asarray(factor, jnp.float32) ** (done // every)

    return schedule


class Experiment(medjax.train.Experiment):
    """PnP-AdaNet: the source segmenter, the DAM and the critics, trained in four stages."""

    def __init__(self, config, *, axis_name=None):
        super().__init__(config)
        self.axis_name = axis_name
        m, c = config.model, config.critic
        self.depth = int(m.depth)
        if isinstance(m.depth, bool) or not 1 <= self.depth <= 9:
            raise ValueError(f"config.model.depth: expected an int in 1..9, got {m.depth!r}")
        self.num_classes = int(m.num_classes)
        if self.num_classes != len(CLASSES):
            raise ValueError(
                f"config.model.num_classes: expected {len(CLASSES)} (background, AA, LA, LV, Myo), "
                f"got {self.num_classes}"
            )
        self.mask_weight = float(c.mask_weight)
        if self.mask_weight < 0:
            raise ValueError(f"config.critic.mask_weight: expected >= 0, got {self.mask_weight}")
        f = int(m.features)
        common = dict(num_classes=self.num_classes, features=f, axis_name=axis_name)
        self.seg = PnPAdaNet(**common, dropout=float(m.dropout))
        self.front = PnPAdaNetFront(self.depth, **common, dropout=float(m.dam_dropout))
        self.back = PnPAdaNetBack(self.depth, **common, dropout=float(m.dropout))
        # critic_inputs' channel count: 3 n4 + n6 + n7 + n9 + K + 1 (reduced widths repeat channels
        # up to the pixel shuffle's 64; f >= 8 needs no repetition)
        n = [-(-w * f // 64) for w in (8, 16, 32, 32)]
        self.critic_channels = 3 * n[0] + n[1] + n[2] + n[3] + self.num_classes + 1
        self.critic = PnPAdaNetCritic(
            features=int(c.features),
            in_channels=self.critic_channels,
            dropout=float(c.dropout),
            axis_name=axis_name,
        )
        self.mask_critic = PnPAdaNetMaskCritic(
            num_classes=self.num_classes,
            features=int(c.features),
            dropout=float(c.dropout),
            axis_name=axis_name,
        )
        s = config.stages
        self.steps = {k: int(s[k].num_steps) for k in ("source", "warmup", "adapt", "supervised")}
        if any(v < 0 for v in self.steps.values()):
            raise ValueError(f"config.stages: expected num_steps >= 0, got {self.steps}")
        self.source_workdir = str(config.source_workdir or "")
        if self.source_workdir and self.steps["source"]:
            raise ValueError(
                "config.source_workdir: the source segmenter comes from "
                f"{self.source_workdir}, so stages.source.num_steps must be 0, got "
                f"{self.steps['source']}"
            )
        if self.source_workdir:
            check_workdir_experiment(self.source_workdir, EXPERIMENT)
        if (
            not self.source_workdir
            and not self.steps["source"]
            and (self.steps["warmup"] or self.steps["adapt"])
        ):
            raise ValueError(
                "config.stages.source.num_steps: 0 leaves nothing to adapt; train the source "
                "segmenter or set config.source_workdir to a trained pnp_adanet2018 work directory"
            )
        a = config.adapt
        self.n_critic, self.n_critic_every = int(a.n_critic), int(a.n_critic_every)
        if self.n_critic < 1 or self.n_critic_every < 1:
            raise ValueError(
                f"config.adapt.n_critic / n_critic_every: expected >= 1, got {self.n_critic} / "
                f"{self.n_critic_every}"
            )
        self.clip = float(a.clip)
        self.spatial = self._input_size()

    def _input_size(self):
        cfg = self.config
        if cfg.data == "synthetic":
            return check_shape(cfg.synthetic.shape, "config.synthetic.shape")[1:]
        if cfg.data == "mmwhs":
            return check_shape((8,) + tuple(cfg.mmwhs.roi), "config.mmwhs.roi")[1:]
        raise ValueError(f"config.data: expected one of {DATASETS}, got {cfg.data!r}")

    @functools.cached_property
    def data(self):
        """The volumes (built on first use: ``predict`` reads no training folder)."""
        return make_volumes(self.config)

    # ---------------------------------------------------------------- state

    def init_state(self, rng):
        """``{"seg", "dam", "critic", "sup"}`` TrainStates; initialisation and step keys differ."""
        key = jax.random.wrap_key_data(jnp.asarray(rng))
        init = {n: jax.random.fold_in(key, i) for i, n in enumerate(("seg", "dam", "cr", "sup"))}
        step = {
            n: jax.random.key_data(jax.random.fold_in(key, 100 + i))
            for i, n in enumerate(("seg", "dam", "critic", "sup"))
        }
        h, w = self.spatial
        x = jnp.zeros((2, h, w, 3), jnp.float32)
        seg_tx = make_optimizer(self.config.optimizer)

        def segmenter(k, name):
            v = fast_init(self.seg, k, x)
            params = v.pop("params")
            return TrainState.create(
                apply_fn=self.seg.apply, params=params, tx=seg_tx, rng=step[name], model_state=v
            )

        a = self.config.adapt
        v = fast_init(self.front, init["dam"], x)
        dam_params = v.pop("params")
        dam_tx = tf_rmsprop(
            step_decay(float(a.learning_rate), int(a.decay_every), float(a.decay_factor))
        )
        dam = TrainState.create(
            apply_fn=self.front.apply, params=dam_params, tx=dam_tx, rng=step["dam"], model_state=v
        )
        xc = jnp.zeros((2, h, w, self.critic_channels), jnp.float32)
        k1, k2 = jax.random.split(init["cr"])
        critic_params = {"feature": fast_init(self.critic, k1, xc)["params"]}
        if self.mask_weight > 0:
            xm = jnp.zeros((2, h, w, self.num_classes), jnp.float32)
            critic_params["mask"] = fast_init(self.mask_critic, k2, xm)["params"]
        critic_tx = tf_rmsprop(
            joint_update_schedule(
                float(a.learning_rate),
                every=int(a.decay_every),
                factor=float(a.decay_factor),
                n_critic=self.n_critic,
                n_critic_every=self.n_critic_every,
                warmup=self.steps["warmup"] * int(a.warmup_n_critic),
                steps=self.steps["adapt"],
            )
        )
        critic = TrainState.create(
            apply_fn=self.critic.apply, params=critic_params, tx=critic_tx, rng=step["critic"]
        )
        return {
            "seg": segmenter(init["seg"], "seg"),
            "dam": dam,
            "critic": critic,
            "sup": segmenter(init["sup"], "sup"),
        }

    # ---------------------------------------------------------------- losses

    def _segmenter_loss(self, params, model_state, batch, rng, rest):
        del rest
        logits, new_state = self.seg.apply(
            {"params": params, **model_state},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rbg_key(rng)},
        )
        lc = self.config.loss
        ce = cross_entropy(
            logits,
            batch["label"],
            class_weights="batch_inverse_frequency",
            prob_floor=float(lc.prob_floor),
            axis_name=self.axis_name,
        )
        dice = soft_dice_loss(
            logits,
            batch["label"],
            squared=True,
            include_background=True,
            axis_name=self.axis_name,
        )
        l2 = float(lc.l2) * _kernels_l2(params)
        loss = ce + float(lc.dice_weight) * dice + l2
        return loss, ({"ce": ce, "dice": dice, "l2": l2}, dict(new_state))

    def _dam_forward(self, params, model_state, x, rng):
        """The DAM on target slices with training-mode batch norms (batch statistics; the running
        statistics are updated): ``(group d output, its features, new model state)``."""
        (h, feats), new_state = self.front.apply(
            {"params": params, **model_state},
            x,
            train=True,
            mutable=["batch_stats"],
            return_features=True,
            rngs={"dropout": rbg_key(rng)},
        )
        return h, feats, dict(new_state)

    def _critic_view(self, feats):
        """What the critics see of a batch: the multi-level input (32 channels at the paper's
        width) and the logits (the mask critic's input)."""
        logits = feats["logits"]
        return {"x": critic_inputs(feats, logits, repeat_to_fill=True), "logits": logits}

    def _critic_features(self, dam, batch, rng, rest):
        """Once per adversarial step (the DAM is frozen in the critic updates): the critics'
        inputs of the source slices through the frozen segmenter and of the target slices through
        the DAM, both in front of the same frozen back, stacked ``(2, B, ...)`` (real, fake).

        The segmenter's groups 1..d and the back run in inference mode, the DAM in training
        mode. The back sees both batches at once (inference batch norms act per sample).
        """
        seg = rest["seg"].variables()
        h_mr, f_mr = self.front.apply(seg, batch["mr"], train=False, return_features=True)
        h_ct, f_ct, _ = self._dam_forward(dam.params, dam.model_state, batch["ct"], rng)
        n = h_mr.shape[0]
        _, f_back = self.back.apply(
            seg, jnp.concatenate([h_mr, h_ct]), train=False, return_features=True
        )
        real = self._critic_view({**f_mr, **{k: v[:n] for k, v in f_back.items()}})
        fake = self._critic_view({**f_ct, **{k: v[n:] for k, v in f_back.items()}})
        return jax.tree.map(lambda a, b: jnp.stack([a, b]), real, fake)

    def _scores(self, critic_params, view, rng):
        """Feature-critic and mask-critic scores ``(B, 1)`` of one view (mask: None without it)."""
        k1, k2 = (rbg_key(k) for k in jax.random.split(rng))
        d = self.critic.apply(
            {"params": critic_params["feature"]}, view["x"], train=True, rngs={"dropout": k1}
        )
        dm = None
        if "mask" in critic_params:
            dm = self.mask_critic.apply(
                {"params": critic_params["mask"]},
                view["logits"],
                train=True,
                rngs={"dropout": k2},
            )
        return d, dm

    def _critic_loss(self, params, model_state, dam, views, rng, rest):
        """WGAN critic loss on the stacked (real, fake) views; the critics' batch statistics are
        each view's own (a vmap over the two, as two separate calls would give)."""
        keys = jax.random.split(rng, 2)
        d, dm = jax.vmap(self._scores, in_axes=(None, 0, 0))(params, views, keys)
        loss = wgan_critic_loss(d[0], d[1])
        metrics = {"wasserstein": jnp.mean(d[0]) - jnp.mean(d[1])}
        if dm is not None:
            loss = loss + self.mask_weight * wgan_critic_loss(dm[0], dm[1])
            metrics["wasserstein_mask"] = jnp.mean(dm[0]) - jnp.mean(dm[1])
        return loss, (metrics, model_state)

    def _dam_loss(self, params, model_state, critic, batch, rng, rest):
        k_dam, k_critic = jax.random.split(rng)
        h, f_front, new_state = self._dam_forward(params, model_state, batch["ct"], k_dam)
        _, f_back = self.back.apply(rest["seg"].variables(), h, train=False, return_features=True)
        d, dm = self._scores(critic.params, self._critic_view({**f_front, **f_back}), k_critic)
        loss = wgan_generator_loss(d)
        if dm is not None:
            loss = loss + self.mask_weight * wgan_generator_loss(dm)
        return loss, ({"d_fake": jnp.mean(d)}, new_state)

    # ---------------------------------------------------------------- stages

    @functools.cached_property
    def steps_fns(self):
        """The four stages' step functions (built once; ``axis_name`` for ``jax.pmap``)."""
        ax = self.axis_name
        clip = functools.partial(clip_critic_weights, limit=self.clip)
        n0, every = self.n_critic, self.n_critic_every
        return {
            "source": supervised_step(self._segmenter_loss, key="seg", axis_name=ax),
            "warmup": adversarial_step(
                self._dam_loss,
                self._critic_loss,
                n_critic=int(self.config.adapt.warmup_n_critic),
                clip=clip,
                update_generator=False,
                critic_features=self._critic_features,
                gen="dam",
                critic="critic",
                axis_name=ax,
            ),
            "adapt": adversarial_step(
                self._dam_loss,
                self._critic_loss,
                n_critic=lambda s: n0 + s // every,
                clip=clip,
                critic_features=self._critic_features,
                gen="dam",
                critic="critic",
                axis_name=ax,
            ),
            "supervised": supervised_step(self._segmenter_loss, key="sup", axis_name=ax),
        }

    def _enter_adaptation(self, state):
        """The DAM starts as the trained segmenter's groups 1..d (and their BN statistics)."""
        if self.source_workdir:
            tree = load_workdir_state(self.source_workdir, experiment=EXPERIMENT)
            if int(np.asarray(tree["seg"]["step"])) == 0:
                raise ValueError(
                    f"config.source_workdir: {self.source_workdir} holds an untrained source "
                    "segmenter (its source stage has 0 steps)"
                )
            state = copy_subtrees(
                state,
                tree,
                {"seg/params": "seg/params", "seg/model_state": "seg/model_state"},
                src_name=self.source_workdir,
            )
        mapping = {}
        for k in range(1, self.depth + 1):
            g = f"group_{k}"
            mapping[f"dam/params/{g}"] = f"seg/params/{g}"
            mapping[f"dam/model_state/batch_stats/{g}"] = f"seg/model_state/batch_stats/{g}"
        return copy_subtrees(state, state, mapping)

    def stages(self):
        """The stages with steps: source, warmup, adapt, supervised (see the module docstring)."""
        out = []
        entered = False
        for name in ("source", "warmup", "adapt", "supervised"):
            n = self.steps[name]
            if not n:
                continue
            enter = None
            if name in ("warmup", "adapt") and not entered:
                enter, entered = self._enter_adaptation, True
            iterator = {
                "source": None,
                "warmup": self._adversarial_iterator,
                "adapt": self._adversarial_iterator,
                "supervised": self._supervised_iterator,
            }[name]
            out.append(medjax.train.Stage(name, n, self.steps_fns[name], iterator, enter))
        return out

    # ---------------------------------------------------------------- iterators

    def _iterator(self, source, transform, batch_size, salt):
        return pipeline.make_iterator(
            source,
            batch_size=int(batch_size),
            seed=int(self.config.seed) * 10 + salt,
            transform=transform,
            shuffle=True,
            prefetch_threads=1,
        )

    def _labelled_slices(self, items, salt):
        data = self.data
        index = data.slice_index(items, True)

        def record(i):
            v, k = index[i]
            image, label = data.cached(items[v], True)
            return {"image": slices_25d(image[max(k - 1, 0) : k + 2])[min(k, 1)], "label": label[k]}

        return self._iterator(
            pipeline.FunctionSource(len(index), record), None, self.config.batch_size, salt
        )

    def train_iterator(self):
        """Labelled source (MR) 2.5D slices: ``{"image": (B, H, W, 3), "label": (B, H, W)}``."""
        return self._labelled_slices(self.data.source_train, 0)

    def _supervised_iterator(self):
        # the only place target labels are read in training (the upper bound's stage)
        return self._labelled_slices(self.data.target_train, 3)

    def _adversarial_iterator(self):
        """Unlabelled pairs: an epoch over target slices, each with a random source slice."""
        data = self.data
        ct = data.slice_index(data.target_train, False)
        mr = data.slice_index(data.source_train, False)

        def one(items, index, i):
            v, k = index[i]
            image, _ = data.cached(items[v], False)
            return slices_25d(image[max(k - 1, 0) : k + 2])[min(k, 1)]

        def transform(record, rng):
            i = int(record["index"])
            j = int(rng.integers(len(mr)))
            return {
                "ct": one(data.target_train, ct, i),
                "mr": one(data.source_train, mr, j),
            }

        source = pipeline.FunctionSource(len(ct), lambda i: {"index": np.int64(i)})
        return self._iterator(source, transform, self.config.adapt.batch_size, 1)

    # ---------------------------------------------------------------- inference

    @functools.cached_property
    def _forward(self):
        """Jitted ``(kind, variables, x) -> (logits, pooled conv9_2 features)`` for a slice batch."""

        def seg(variables, x):
            logits, feats = self.seg.apply(variables, x, train=False, return_features=True)
            return logits, jnp.mean(feats["conv9_2"], axis=(1, 2))

        def adapted(variables, x):
            dam, segv = variables
            h = self.front.apply(dam, x, train=False)
            logits, feats = self.back.apply(segv, h, train=False, return_features=True)
            return logits, jnp.mean(feats["conv9_2"], axis=(1, 2))

        return {"seg": jax.jit(seg), "adapted": jax.jit(adapted)}

    def _variables(self, state, setting):
        if setting == "adapted":
            return "adapted", (state["dam"].variables(), state["seg"].variables())
        return "seg", state["sup" if setting == "supervised" else "seg"].variables()

    def volume_logits(self, state, setting, volume, with_features=False):
        """Slice-by-slice logits of a normalised volume ``(D, H, W)``: ``(D, H, W, K)`` (and the
        pooled ``conv9_2`` features ``(D, 32f)`` with ``with_features``).

        Slices go through in batches of ``eval.slice_batch`` (the last one padded, so a volume
        compiles once per in-plane size).
        """
        kind, variables = self._variables(state, setting)
        x = slices_25d(volume)
        n, b = x.shape[0], int(self.config.eval.slice_batch)
        logits, feats = [], []
        for i in range(0, n, b):
            chunk = x[i : i + b]
            pad = b - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)], 0)
            lo, fe = self._forward[kind](variables, jnp.asarray(chunk, jnp.float32))
            logits.append(np.asarray(lo)[: b - pad])
            feats.append(np.asarray(fe)[: b - pad])
        out = np.concatenate(logits, 0)
        return (out, np.concatenate(feats, 0)) if with_features else out

    def predictor(self, state, setting):
        """``predict((1, D, H, W, 1)) -> (1, D, H, W, K)`` for the shared evaluator."""

        def predict(volume):
            return self.volume_logits(state, setting, np.asarray(volume)[0, ..., 0])[None]

        return predict

    def trained_settings(self, state):
        """The settings this state can evaluate (the DAM and ``sup`` only once trained)."""
        out = ["no_adaptation"] if int(state["seg"].step) else []
        if int(state["dam"].step):
            out.append("adapted")
        if int(state["sup"].step):
            out.append("supervised")
        return out

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, state, workdir):
        """Dice / HD95 / ASSD per structure on the target and source test volumes (3D, slice by
        slice), for every trained setting; paired gains; figures. See the README for the keys."""
        t0 = time.perf_counter()
        workdir = pathlib.Path(workdir)
        settings = self.trained_settings(state)
        results = {"data": self.config.data, "depth": self.depth, "settings": settings}
        per_case, shown = {}, {}
        for domain in ("target", "source"):
            cases = list(self.data.cases(domain))
            results[f"num_{domain}_cases"] = len(cases)
            for setting in settings:
                keep = {}

                def on_case(i, case, pred, probs, keep=keep):
                    if i < 3:
                        keep[i] = pred

                r = evaluate_segmentation(
                    cases,
                    self.predictor(state, setting),
                    num_classes=self.num_classes,
                    class_names=CLASSES,
                    on_case=on_case,
                )
                results.update(_setting_results(r, domain, setting))
                per_case[f"{domain}_dice_{setting}"] = [c["mean_dice"] for c in r["per_case"]]
                for s in STRUCTURES:
                    per_case[f"{domain}_dice_{setting}_{s}"] = [
                        c[f"dice_{s}"] for c in r["per_case"]
                    ]
                shown[(domain, setting)] = keep
            if domain == "target":
                target_cases = cases
        for setting in SETTINGS:  # keys the issue names, None when a setting was not trained
            for domain in ("target", "source"):
                results.setdefault(f"{domain}_dice_{setting}", None)
        for domain in ("target", "source"):
            base = per_case.get(f"{domain}_dice_no_adaptation")
            for b in ("adapted", "supervised"):
                other = per_case.get(f"{domain}_dice_{b}")
                gain = paired_bootstrap(base, other) if base and other else None
                results[f"{domain}_gain_{b}"] = gain
        results["per_case"] = per_case
        results.update(self._wasserstein_summary(workdir))
        try:
            figs = self._figures(state, workdir, target_cases, shown, results)
            results["figures"] = [p.name for p in figs]
        except Exception as e:  # figures must never lose the metrics
            print(f"{EXPERIMENT}: figures failed: {type(e).__name__}: {e}")
            results["figures"] = []
        results["eval_wall_s"] = time.perf_counter() - t0
        return results

    @staticmethod
    def _wasserstein_curve(workdir):
        path = pathlib.Path(workdir) / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if "critic/wasserstein" in r]

    def _wasserstein_summary(self, workdir):
        rows = [r for r in self._wasserstein_curve(workdir) if r.get("stage") == "adapt"]
        if not rows:
            return {}
        return {
            "wasserstein_adapt_first": rows[0]["critic/wasserstein"],
            "wasserstein_adapt_last": rows[-1]["critic/wasserstein"],
        }

    # ---------------------------------------------------------------- report

    def report(self, results):
        """Markdown: per-structure Dice and ASSD on the target and the source, and the gains."""
        step = results.get("checkpoint_step")  # set by `medjax eval`, not by evaluate() itself
        lines = [
            f"PnP-AdaNet, d = {results.get('depth')}, {results.get('data')} data, "
            f"{results.get('num_target_cases', 0)} target / {results.get('num_source_cases', 0)} "
            "source test volumes"
            + ("" if step is None else f", checkpoint step {step}")
            + "; Dice (ASSD in mm below), mean ± std over volumes",
            "",
        ]
        head = ["domain", "setting", *STRUCTURES, "mean Dice", "mean ASSD (mm)"]
        rows, assd_rows = [], []
        for domain in ("target", "source"):
            for setting in SETTINGS:
                if results.get(f"{domain}_dice_{setting}") is None:
                    continue
                cells = [domain, SETTING_LABELS[setting]]
                assd = [domain, SETTING_LABELS[setting]]
                for s in STRUCTURES:
                    key = f"{domain}_dice_{setting}_{s}"
                    cells.append(mean_std(results.get(key), results.get(f"{key}_std")))
                    key = f"{domain}_assd_{setting}_{s}"
                    missing = results.get(f"{key}_missing", 0)
                    assd.append(
                        mean_std(results.get(key), results.get(f"{key}_std"), 2)
                        + (f" ({missing} missed)" if missing else "")
                    )
                key = f"{domain}_dice_{setting}"
                cells.append(mean_std(results.get(key), results.get(f"{key}_std")))
                key = f"{domain}_assd_{setting}"
                cells.append(mean_std(results.get(key), results.get(f"{key}_std"), 2))
                rows.append(cells)
                assd_rows.append(assd)
        lines.append(markdown_table(head, rows))
        lines += [
            "",
            "ASSD (mm) per structure; 'missed': volumes where it was not predicted at all",
        ]
        lines.append(markdown_table(["domain", "setting", *STRUCTURES], assd_rows))
        for domain in ("target", "source"):
            for b in ("adapted", "supervised"):
                g = results.get(f"{domain}_gain_{b}")
                if g:
                    lines.append(
                        f"\n{domain} mean Dice, {SETTING_LABELS[b]} - no adaptation, paired over "
                        f"volumes: {gain_cell(g)}"
                    )
        if "wasserstein_adapt_first" in results:
            lines.append(
                f"\ncritic's Wasserstein estimate in the adversarial stage: "
                f"{results['wasserstein_adapt_first']:.4g} (first log window) -> "
                f"{results['wasserstein_adapt_last']:.4g} (last)"
            )
        return "\n".join(lines)

    # ---------------------------------------------------------------- comparison

    def compare_table(self, rows):
        """Target Dice per structure: no adaptation and supervised (from the row that trained them),
        each adapted row with its paired gain over no adaptation, and its source Dice."""
        head = ["setting", *STRUCTURES, "mean", "gain over no adaptation [95% CI] (volumes)"]
        head += ["source mean (DAM on MR)", "ASSD (mm)", "train (s)"]
        body = []

        def cells(r, setting):
            out = []
            for s in STRUCTURES:
                key = f"target_dice_{setting}_{s}"
                out.append(mean_std(r.get(key), r.get(f"{key}_std")))
            key = f"target_dice_{setting}"
            out.append(mean_std(r.get(key), r.get(f"{key}_std")))
            return out

        first = next(
            (r for r in rows.values() if r.get("target_dice_no_adaptation") is not None), None
        )
        if first is not None:
            body.append(
                ["no adaptation", *cells(first, "no_adaptation"), "-"]
                + [
                    mean_std(first.get("source_dice_no_adaptation")),
                    mean_std(first.get("target_assd_no_adaptation"), None, 2),
                    "-",
                ]
            )
        for r in rows.values():
            if r.get("target_dice_adapted") is None:
                continue
            tw = r.get("train_wall_s")
            body.append(
                [
                    r.get("label", r.get("row")),
                    *cells(r, "adapted"),
                    gain_cell(r.get("target_gain_adapted")),
                ]
                + [
                    mean_std(r.get("source_dice_adapted")),
                    mean_std(r.get("target_assd_adapted"), None, 2),
                    f"{tw:.0f}" if isinstance(tw, int | float) else "-",
                ]
            )
        sup = next((r for r in rows.values() if r.get("target_dice_supervised") is not None), None)
        if sup is not None:
            body.append(
                [
                    "supervised on target (upper bound)",
                    *cells(sup, "supervised"),
                    gain_cell(sup.get("target_gain_supervised")),
                ]
                + [
                    mean_std(sup.get("source_dice_supervised")),
                    mean_std(sup.get("target_assd_supervised"), None, 2),
                    "-",
                ]
            )
        return markdown_table(head, body)

    def compare_figures(self, rows, workdir):
        """compare_dice.png: target Dice per structure for each setting of the comparison."""
        series = {}
        first = next(
            (r for r in rows.values() if r.get("target_dice_no_adaptation") is not None), None
        )
        if first is not None:
            series["no adaptation"] = _structure_series(first, "target", "no_adaptation")
        for r in rows.values():
            if r.get("target_dice_adapted") is not None:
                series[r.get("label", r.get("row"))] = _structure_series(r, "target", "adapted")
        sup = next((r for r in rows.values() if r.get("target_dice_supervised") is not None), None)
        if sup is not None:
            series["supervised on target"] = _structure_series(sup, "target", "supervised")
        path = pathlib.Path(workdir) / "figures" / "compare_dice.png"
        return [
            F.bar_chart(
                path,
                [*STRUCTURES, "mean"],
                series,
                ylabel="target (CT) Dice",
                ylim=(0, 1),
                title="MR -> CT: target Dice per structure",
            )
        ]

    # ---------------------------------------------------------------- figures

    def _figures(self, state, workdir, target_cases, shown, results):
        fig_dir = workdir / "figures"
        written = []
        settings = [s for s in SETTINGS if ("target", s) in shown]
        rows = []
        for i, case in enumerate(target_cases[:3]):
            k = F.choose_slice(case["label"], axis=0)
            img = display_slice(case["image"][k, ..., 0])
            row = [F.Panel(img, title=f"{case['id']} slice {k}")]
            shown_labels = {"truth": case["label"]}
            shown_labels.update({SETTING_LABELS[s]: shown[("target", s)][i] for s in settings})
            row += [
                F.Panel(img, title=name, labels=display_slice(lab[k]), num_classes=5)
                for name, lab in shown_labels.items()
            ]
            rows.append(row)
        if rows:
            written.append(
                F.panel_grid(
                    fig_dir / "target_slices.png",
                    rows,
                    panel_size=(2.3, 2.5),
                    title="target (CT) test slices: AA, LA, LV, Myo",
                )
            )
        curve = self._wasserstein_curve(workdir)
        if curve:
            ys = {
                "feature critic": (
                    [r["step"] for r in curve],
                    [r["critic/wasserstein"] for r in curve],
                )
            }
            if "critic/wasserstein_mask" in curve[0]:
                ys["mask critic"] = (
                    [r["step"] for r in curve],
                    [r["critic/wasserstein_mask"] for r in curve],
                )
            written.append(
                F.curves(
                    fig_dir / "wasserstein.png",
                    None,
                    ys,
                    ylabel="E D(MR) - E D(CT)",
                    title="critic's Wasserstein estimate (warm-up, then adaptation)",
                )
            )
        if "adapted" in settings:
            written.append(self._pca_figure(state, fig_dir / "features_pca.png"))
        series = {SETTING_LABELS[s]: _structure_series(results, "target", s) for s in settings}
        if series:
            written.append(
                F.bar_chart(
                    fig_dir / "target_dice.png",
                    [*STRUCTURES, "mean"],
                    series,
                    ylabel="target (CT) Dice",
                    ylim=(0, 1),
                    title="target test volumes",
                )
            )
        return written

    def _pca_figure(self, state, path):
        """PCA of pooled conv9_2 features: source slices, target before and after adaptation."""
        groups = {}
        for domain, setting, name in (
            ("source", "no_adaptation", "source (MR)"),
            ("target", "no_adaptation", "target (CT), no adaptation"),
            ("target", "adapted", "target (CT), PnP-AdaNet"),
        ):
            feats = []
            for case in list(self.data.cases(domain))[:4]:
                _, f = self.volume_logits(state, setting, case["image"][..., 0], with_features=True)
                fg = case["label"].reshape(case["label"].shape[0], -1).any(1)  # slices with heart
                feats.append(f[fg])
            groups[name] = np.concatenate(feats, 0)
        allf = np.concatenate(list(groups.values()), 0)
        mean = allf.mean(0)
        _, _, vt = np.linalg.svd(allf - mean, full_matrices=False)
        return F.scatter(
            path,
            {name: (f - mean) @ vt[:2].T for name, f in groups.items()},
            xlabel="PC 1",
            ylabel="PC 2",
            title="pooled conv9_2 features of heart slices (PCA)",
        )

    # ---------------------------------------------------------------- prediction

    def preprocess_image(self, image: Image) -> Prepared:
        """The evaluation's preprocessing for one input volume, and its inverse for label maps.

        Canonical layout, resampling to the training spacing, the intensity normalisation, then
        the coronal ROI: ``config.predict_roi`` (row0, col0) with the ROI size, or the whole slice
        padded to a multiple of 8 (with the volume's minimum).
        """
        spacing = self._train_spacing()
        canon = canonical(image)
        res = resample(canon, spacing)
        vol = normalise(res.array[..., 0], self.config.clip_percent)
        d, h, w = vol.shape
        box = self.config.predict_roi
        if box is not None:
            rh, rw = self.spatial
            r0, c0 = (int(v) for v in box)
            if r0 < 0 or c0 < 0 or r0 + rh > h or c0 + rw > w:
                raise ValueError(
                    f"config.predict_roi: the {rh} x {rw} box at {(r0, c0)} does not fit the "
                    f"{h} x {w} coronal slices of {image.path}"
                )
            net = vol[:, r0 : r0 + rh, c0 : c0 + rw]
            pad = None
        else:
            ph, pw = (-h) % 8, (-w) % 8
            pad = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
            net = np.pad(vol, pad, constant_values=float(vol.min()))
            r0, c0 = pad[1][0], pad[2][0]

        def restore(labels, order=0):
            labels = np.asarray(labels)
            if pad is None:
                full = np.zeros((d, h, w) + labels.shape[3:], labels.dtype)
                full[:, r0 : r0 + net.shape[1], c0 : c0 + net.shape[2]] = labels
            else:
                full = labels[:, r0 : r0 + h, c0 : c0 + w]
            full = unresample(full, canon.spatial_shape, canon.spacing, res.spacing)
            return orient_back(full, image.affine, CANONICAL)

        return Prepared(image=net[..., None], restore=restore)

    def _train_spacing(self):
        if self.config.data == "synthetic":
            shape = check_shape(self.config.synthetic.shape, "config.synthetic.shape")
            return tuple(float(v) for v in np.asarray(synthetic_cardiac.FOV_MM) / shape)
        return (float(self.config.mmwhs.spacing),) * 3

    def predict(self, state, inputs, out_dir):
        """Segment target volumes (NIfTI) slice by slice with the adapted network (the source
        segmenter when no adaptation was trained): ``<name>_seg.nii.gz`` with each input's affine."""
        setting = "adapted" if int(state["dam"].step) else "no_adaptation"
        return predict_files(
            inputs,
            out_dir,
            predict=self.predictor(state, setting),
            preprocess=self.preprocess_image,
            num_classes=self.num_classes,
            metadata={"setting": setting, "classes": list(CLASSES)},
        )


def display_slice(slice2d):
    """A coronal slice (rows superior -> inferior) for ``figures.show_image`` (superior on top)."""
    return np.asarray(slice2d)[::-1].T


def _setting_results(r, domain, setting):
    """The evaluator's means as ``<domain>_dice_<setting>[_<structure>]`` (and HD95, ASSD)."""
    out = {
        f"{domain}_dice_{setting}": r["mean_dice"],
        f"{domain}_dice_{setting}_std": r["mean_dice_std"],
        f"{domain}_assd_{setting}": r["mean_assd"],
        f"{domain}_assd_{setting}_std": r["mean_assd_std"],
        f"{domain}_hd95_{setting}": r["mean_hd95"],
        f"{domain}_hd95_{setting}_std": r["mean_hd95_std"],
    }
    for s in STRUCTURES:
        for m in ("dice", "assd", "hd95"):
            out[f"{domain}_{m}_{setting}_{s}"] = r[f"{m}_{s}"]
            out[f"{domain}_{m}_{setting}_{s}_std"] = r[f"{m}_{s}_std"]
        vals = [c[f"assd_{s}"] for c in r["per_case"]]
        out[f"{domain}_assd_{setting}_{s}_missing"] = int(sum(v == np.inf for v in vals))
    return out


def _structure_series(r, domain, setting):
    keys = [f"{domain}_dice_{setting}_{s}" for s in STRUCTURES] + [f"{domain}_dice_{setting}"]
    return ([r.get(k, np.nan) for k in keys], [r.get(f"{k}_std", np.nan) for k in keys])
