"""Huang et al. 2020, co-training weight-averaged models on partially labelled datasets: the Experiment.

Several datasets each label a few organs (LiTS the liver, KiTS the kidneys, ...); every other organ
is "background" in them although it is in the image. One multi-organ network is learned from all
of them, in the six points of the paper (``method="cotraining"``):

1. Stage ``single_organ``: one model per partially labelled dataset, trained on its own labels only
   (a network whose logits are masked to background + the dataset's organs). Their hard
   pseudo-labels fill in the organs a sample's dataset does not annotate; ground truth always wins
   (a voxel the dataset labels keeps its label; where it says background, the argmax of the other
   datasets' models, over the organs this dataset does not annotate, takes its place).
2. Stage ``cotraining``: two networks of one architecture and different initialisations, trained
   together on the merged hard labels with focal + soft Dice (weights ``config.loss``).
3. Each keeps an EMA of its own parameters as optax state (``medjax.train.ema.ema_params`` at the
   end of its optimiser chain; decay ``config.ema.decay``, the Mean Teacher warm-up by default).
4. Cross supervision: network A also learns from B's EMA soft predictions and B from A's,
   ``-sum softmax(EMA_other(x)) log softmax(net(x))`` (``medjax.losses.soft_cross_entropy``),
   averaged over each sample's **region mask**. The mask is a function ``region(label,
   class_mask, pseudo) -> (B, *S) bool`` (the ``region=`` argument of :class:`Experiment`, or
   ``config.soft.region``): :func:`uncertain_region` (default) takes the voxels whose label is
   uncertain in the sample's dataset, ``~annotated[label]``, i.e. what a partially labelled
   dataset calls background; :func:`dilated_pseudo_region` narrows that to the uncertain voxels
   within ``config.soft.dilation`` voxels of an organ the pseudo-labels put there (the other
   account of the paper).
5. The soft-loss weight ramps up, ``config.soft.weight * (2 / (1 + e^(-10 p)) - 1)`` by default,
   ``p`` = co-training step / (``ramp_fraction`` x its steps).
6. Inference uses an EMA model: of the two, the one with the higher mean Dice on the validation
   subjects (partially labelled like the training data, scored on the organs their dataset
   annotates).

Both networks, both teachers (in their optimiser states) and the frozen single-organ models live in
one train state; the co-training step is one jitted function (``medjax.train.cotraining_step``),
data-parallel over the mesh, and takes ``pmap`` with ``axis_name``.

**Normalisation and the teachers.** Only parameters are averaged. The default network uses
instance norm (nnU-Net's choice), which keeps no statistics, so an EMA of the parameters is a whole
model. With ``config.model.norm="batch"`` a teacher runs in evaluation mode with the running
statistics of the network it averages (``config.ema.teacher_norm="running"``): the EMA model used at
inference is then exactly the function that taught during training. The option ``"batch"``
normalises the teacher's forward pass with the current batch's statistics through its own weights
(synchronised over devices, nothing stored); inference then still uses the averaged network's
running statistics.

**Losses on the whole batch.** The soft Dice is pooled over the batch and the soft loss averaged
over the batch's region voxels; under ``pmap`` (``axis_name``) the loss gathers the predictions of
every device (:meth:`Experiment.whole_batch`), so one device, the mesh and ``pmap`` train alike.

Baselines (``method``): ``separate`` (stage 1 only; the single-organ models merged by the rule of
point 1), ``naive`` (one network on the partial labels, missing organs = background),
``self_training`` (one network on the merged labels taught by its OWN EMA teacher; inference with
that EMA), co-training without EMA (``ema.decay=0``: each network taught by the other's live
weights) and ``full_labels`` (one network on the same subjects with every organ labelled).

Data: 2.5D axial slices (``2 * config.context + 1`` adjacent slices as channels, the centre
slice's label) of volumes ``(Z, H, W)``: the synthetic abdomen
(:mod:`medjax.data.synthetic_abdomen`, disjoint single-organ datasets and a fully labelled test
set) or Decathlon/KiTS folders unified by label name
(:func:`medjax.data.datasets.partial_label_records`; NIfTI ``(x, y, z)`` arrays become ``(z, x,
y)``, resampled in-plane to ``config.msd.size``; CT as ``(clip(HU) + 100) / 1000``, the phantom's
scale). On folder data the test cases are held out per dataset and scored on their own organs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import medjax.train
from medjax import figures as F
from medjax.data import datasets, pipeline
from medjax.data import synthetic_abdomen as abdomen
from medjax.data.io import DataFileError
from medjax.evaluation.report import gain_cell, markdown_table, mean_std
from medjax.evaluation.segmentation import Prepared, evaluate_segmentation, predict_files
from medjax.evaluation.stats import paired_bootstrap
from medjax.losses import focal_loss, soft_cross_entropy, soft_dice_loss
from medjax.models.small_unet import SmallUNet
from medjax.nn.blocks import fast_init
from medjax.nn.norm import BatchNorm
from medjax.train.ema import get_ema_params
from medjax.train.optim import make_optimizer
from medjax.train.state import TrainState
from medjax.train.steps import cotraining_step, ramp_weight, supervised_step

from .config import METHODS, WITH_SINGLE_ORGAN, steps_for

NORMS = ("batch", "instance", "group", "none")
RAMPS = ("sigmoid", "exp", "linear", "none")
_MASKED = -1e4  # logit of a class a single-organ model cannot predict


# ------------------------------------------------------------------------------------ region masks


def uncertain_region(label, class_mask, pseudo):
    """The default region: voxels whose label is uncertain in the sample's dataset, ``(B, *S)`` bool.

    ``~annotated[label]``: ``label`` ``(B, *S)`` int, ``class_mask`` ``(B, C)`` bool (which classes
    the sample's dataset annotates; background only when it annotates every organ). For a
    partially labelled dataset these are the voxels it calls background; ``pseudo`` is unused.
    """
    del pseudo
    b = label.shape[0]
    flat = jnp.take_along_axis(class_mask, label.reshape(b, -1), axis=1)
    return ~flat.reshape(label.shape)


def dilated_pseudo_region(label, class_mask, pseudo, *, dilation=3):
    """The other reading: uncertain voxels near an organ the pseudo-labels put there, ``(B, *S)`` bool.

    The voxels of :func:`uncertain_region` within ``dilation`` voxels (a cube) of a voxel whose
    pseudo-label (``pseudo`` ``(B, *S)``, from the single-organ models) is an organ.
    """
    uncertain = uncertain_region(label, class_mask, None)
    missing = ((pseudo > 0) & uncertain).astype(jnp.float32)[..., None]
    n = label.ndim - 1
    window = (2 * int(dilation) + 1,) * n
    near = nn.max_pool(missing, window, strides=(1,) * n, padding="SAME")[..., 0] > 0
    return near & uncertain


REGIONS = {"uncertain": uncertain_region, "dilated_pseudo": dilated_pseudo_region}


def checked_region(region, label, class_mask, pseudo, *, where, datasets=()):
    """``region(label, class_mask, pseudo)`` as a bool mask, or ValueError when it has another shape."""
    mask = region(label, class_mask, pseudo)
    shape = tuple(getattr(mask, "shape", ()))
    if shape != tuple(label.shape):
        names = f" (batch of datasets {', '.join(datasets)})" if datasets else ""
        raise ValueError(
            f"region mask {where}: expected one value per voxel of the batch's labels, shape "
            f"{tuple(label.shape)}{names}, got shape {shape}"
        )
    return jnp.asarray(mask, bool)


# -------------------------------------------------------------------------------------------- data


def ct_scale(hu, hu_range=(-1000.0, 2000.0)):
    """CT intensities as ``(clip(HU, *hu_range) + 100) / 1000`` (the synthetic phantom's scale)."""
    lo, hi = (float(v) for v in hu_range)
    return ((np.clip(np.asarray(hu, np.float32), lo, hi) + 100.0) / 1000.0).astype(np.float32)


def slice_stacks(volume, context, index=None):
    """2.5D inputs of ``volume`` ``(Z, H, W)``: ``(Z, H, W, 2c+1)`` (or ``(H, W, 2c+1)`` at ``index``).

    Channel j of slice z is slice ``z + j - c``, the edge slices repeated beyond the volume.
    """
    z = volume.shape[0]
    centre = np.arange(z) if index is None else np.asarray([int(index)])
    idx = np.clip(centre[:, None] + np.arange(-context, context + 1)[None], 0, z - 1)
    out = np.moveaxis(np.asarray(volume)[idx], 1, -1).astype(np.float32)
    return out if index is None else out[0]


def resample_plane(x, shape, order):
    """``x`` ``(Z, H, W[, K])`` resampled in-plane to ``(Z, *shape[, K])`` (pixel areas aligned)."""
    from scipy import ndimage

    x = np.asarray(x)
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[1:3]) == shape:
        return x
    factors = (1.0, shape[0] / x.shape[1], shape[1] / x.shape[2]) + (1.0,) * (x.ndim - 3)
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True)
    assert out.shape[1:3] == shape, (out.shape, shape)
    return out


def _subject(id_, dataset, source, image, label, annotated, spacing, *, full=None, path=None):
    """One volume: image/label ``(Z, H, W)`` (label in the unified classes), its dataset and geometry."""
    label = np.asarray(label, np.int32)
    return {
        "id": str(id_),
        "dataset": dataset,
        "source": int(source),
        "image": image,
        "label": label,
        "full": full,
        "annotated": np.asarray(annotated, bool),
        "spacing": np.asarray(spacing, np.float32),
        "foreground": np.flatnonzero(np.asarray(label).reshape(label.shape[0], -1).max(1) > 0),
        "path": path,
    }


def _annotated(ids, num_classes):
    a = np.zeros(num_classes, bool)
    a[list(ids)] = True
    a[0] = bool(a[1:].all())
    return a


@functools.lru_cache(maxsize=4)
def _synthetic_volumes(seed, n, shape, organs):
    return abdomen.partial_label_datasets(seed, n, shape, organs)


@functools.lru_cache(maxsize=4)
def _synthetic_testset(seed, n, shape):
    return abdomen.full_label_testset(seed, n, shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the networks need to know of the data, read without loading any volume.

    ``classes`` (background first: the unified class names), ``datasets`` (one name per partially
    labelled dataset), ``annotated`` ``(datasets, classes)`` bool (which classes each labels;
    background only for a dataset that labels every organ), the in-plane size ``plane`` and the
    CT clipping ``hu_range``; ``records`` are the folder records of ``data="msd"``.
    """

    classes: tuple
    datasets: tuple
    annotated: np.ndarray
    plane: tuple
    hu_range: tuple
    records: tuple = ()


def _synthetic_specs(config):
    """``config.synthetic.datasets`` as partial_label_datasets' ``organs`` and their class ids."""
    specs, ids = [], []
    for entry in config.synthetic.datasets:
        names = tuple(n.strip() for n in str(entry).split("+"))
        bad = [n for n in names if n not in abdomen.ABDOMEN_ORGANS]
        if bad:
            raise ValueError(
                f"config.synthetic.datasets: expected organ names (or 'a+b') from "
                f"{abdomen.ABDOMEN_ORGANS}, got {entry!r}"
            )
        specs.append(names[0] if len(names) == 1 else names)
        ids.append(sorted({abdomen.ABDOMEN_CLASSES.index(n) for n in names}))
    if not specs:
        raise ValueError("config.synthetic.datasets: expected at least one dataset, got none")
    return tuple(specs), ids


def data_layout(config, factor=1):
    """The :class:`Layout` of ``config.data``; the in-plane size must be a multiple of ``factor``."""
    if config.data == "synthetic":
        _, ids = _synthetic_specs(config)
        used = sorted({c for i in ids for c in i})
        classes = ("background", *(abdomen.ABDOMEN_CLASSES[c] for c in used))
        names = tuple("+".join(abdomen.ABDOMEN_CLASSES[c] for c in i) for i in ids)
        annotated = np.stack(
            [_annotated([used.index(c) + 1 for c in i], len(classes)) for i in ids]
        )
        plane, where, records = (
            tuple(int(v) for v in config.synthetic.shape[1:]),
            "synthetic.shape",
            (),
        )
        hu_range = (-1000.0, 2000.0)
    elif config.data == "msd":
        dirs = [str(d) for d in config.data_dirs if str(d).strip()]
        if not dirs:
            raise ValueError(
                "config.data_dirs: expected one or more dataset folders (DIR1,DIR2,...) for "
                "data='msd', got none"
            )
        rename = None
        if config.msd.rename:
            try:
                rename = json.loads(config.msd.rename)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"config.msd.rename: expected JSON, got {config.msd.rename!r}: {e}"
                ) from None
        records, classes = datasets.partial_label_records(dirs, rename=rename)
        names = tuple(dict.fromkeys(r["meta"]["dataset"] for r in records))
        first = {r["meta"]["dataset"]: r for r in reversed(records)}
        annotated = np.stack([np.asarray(first[n]["meta"]["annotated"], bool) for n in names])
        plane, where = (int(config.msd.size),) * 2, "msd.size"
        hu_range = tuple(float(v) for v in config.msd.hu_range)
        classes, records = tuple(classes), tuple(records)
    else:
        raise ValueError(f"config.data: expected 'synthetic' or 'msd', got {config.data!r}")
    if any(v % factor for v in plane):
        raise ValueError(
            f"config.{where}: expected in-plane sizes divisible by {factor} "
            f"(config.model.levels={config.model.levels}), got {plane}"
        )
    return Layout(classes, names, annotated, plane, hu_range, records)


class SyntheticData:
    """The synthetic abdomen split into partially labelled single-organ datasets (disjoint subjects).

    Each of ``config.synthetic.datasets`` gets ``num_train`` training and ``num_val`` validation
    subjects labelled with its organ(s) only; ``num_test`` fully labelled subjects are the test set.
    With ``full_labels`` the training subjects also carry all their organs (``"full"``).
    """

    def __init__(self, config, layout, *, full_labels=False):
        s = config.synthetic
        shape = tuple(int(v) for v in s.shape)
        n_train, n_val = int(s.num_train), int(s.num_val)
        if n_train < 1 or n_val < 1:
            raise ValueError(
                f"config.synthetic.num_train / num_val: expected >= 1 each, got {n_train}, {n_val}"
            )
        specs, _ = _synthetic_specs(config)
        raw = _synthetic_volumes(int(s.seed), n_train + n_val, shape, specs)
        assert tuple(raw) == layout.datasets, (tuple(raw), layout.datasets)
        # phantom class id -> unified id (identity when every organ has a dataset)
        lut = np.zeros(len(abdomen.ABDOMEN_CLASSES), np.int32)
        for c, name in enumerate(layout.classes):
            lut[abdomen.ABDOMEN_CLASSES.index(name)] = c
        self.train, self.val = [], []
        for k, (name, entries) in enumerate(raw.items()):
            subjects = []
            for i, e in enumerate(entries):
                full = None
                if full_labels and i < n_train:
                    full = lut[abdomen.abdomen_phantom(e["seed"], shape)["label"]]
                image = ct_scale(e["image"] * 1000.0 - 100.0)
                subjects.append(
                    _subject(
                        f"{name}_{i:03d}",
                        name,
                        k,
                        image,
                        lut[e["label"]],
                        layout.annotated[k],
                        e["spacing"],
                        full=full,
                    )  # fmt: skip
                )
            self.train.append(subjects[:n_train])
            self.val += subjects[n_train:]
        everything = np.ones(len(layout.classes), bool)
        self.test = [
            _subject(
                f"test_{i:03d}",
                "test",
                -1,
                ct_scale(e["image"] * 1000.0 - 100.0),
                lut[e["label"]],
                everything,
                e["spacing"],
            )  # fmt: skip
            for i, e in enumerate(_synthetic_testset(int(s.seed), int(s.num_test), shape))
        ]


def _split_counts(n, fractions, where):
    """(train, val, test) case counts of one dataset, each >= 1."""
    if n < 3:
        raise ValueError(
            f"{where}: expected at least 3 labelled cases (one each for training, validation and "
            f"test), got {n}"
        )
    fr = np.asarray(fractions, np.float64) / np.sum(fractions)
    n_val = max(1, int(round(fr[1] * n)))
    n_test = max(1, int(round(fr[2] * n)))
    return n - n_val - n_test, n_val, n_test


class FolderData:
    """Decathlon-style (``dataset.json``) and KiTS19 folders, labels unified by name.

    Every labelled case is preprocessed once (kept in memory, or memory-mapped ``.npy`` files in
    ``config.msd.cache_dir``): its label values are checked against its ``dataset.json`` (an error
    names the dataset, the file and the value). Cases are split per dataset into training,
    validation and test (``config.msd.split``, at least one each).
    """

    def __init__(self, config, layout):
        self.plane, self.hu_range = layout.plane, layout.hu_range
        self.cache = pathlib.Path(config.msd.cache_dir) if config.msd.cache_dir else None
        dirs = [str(d) for d in config.data_dirs if str(d).strip()]
        self.train, self.val, self.test = [], [], []
        for k, name in enumerate(layout.datasets):
            recs = [r for r in layout.records if r["meta"]["dataset"] == name]
            where = f"{pathlib.Path(dirs[k])}: dataset {name}"
            counts = _split_counts(len(recs), config.msd.split, where)
            parts = datasets.split(recs, [n / len(recs) for n in counts], seed=int(config.seed))
            loaded = [[self._load(r, k) for r in part] for part in parts]
            self.train.append(loaded[0])
            self.val += loaded[1]
            self.test += loaded[2]

    def _load(self, record, source):
        meta = record["meta"]
        name = meta["dataset"]
        try:
            loaded = datasets.load_record(record)
        except DataFileError as e:
            text = str(e)
            raise DataFileError(
                text if f"dataset {name}" in text else f"dataset {name}: {text}"
            ) from None
        if loaded.image.shape[-1] != 1:
            raise DataFileError(
                f"{loaded.paths[0]}: dataset {name}: expected one CT channel, got "
                f"{loaded.image.shape[-1]}"
            )
        image, label = self._cached(record, loaded)
        sx, sy, sz = (float(v) for v in loaded.spacing)
        shape = loaded.image.shape[:3]
        spacing = (sz, sx * shape[0] / self.plane[0], sy * shape[1] / self.plane[1])
        return _subject(
            f"{name}/{record['id']}",
            name,
            source,
            image,
            label,
            meta["annotated"],
            spacing,
            path=loaded.label_path,
        )

    def _cached(self, record, loaded):
        """(image, label) ``(Z, *plane)`` of a loaded record, from/to the cache folder when set."""
        stem = None
        if self.cache is not None:
            stem = self.cache / record["meta"]["dataset"] / record["id"]
            stamp = {
                "size": list(self.plane),
                "hu": list(self.hu_range),
                "label": loaded.label_path,
            }
            stamp_path = stem.with_name(stem.name + ".json")
            if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
                return (
                    np.load(str(stem) + "_image.npy", mmap_mode="r"),
                    np.load(str(stem) + "_label.npy", mmap_mode="r"),
                )
        image = resample_plane(np.moveaxis(loaded.image[..., 0], 2, 0), self.plane, order=1)
        image = ct_scale(image, self.hu_range)
        label = resample_plane(np.moveaxis(loaded.label, 2, 0), self.plane, order=0)
        label = label.astype(np.int32)
        if stem is not None:
            stem.parent.mkdir(parents=True, exist_ok=True)
            np.save(str(stem) + "_image.npy", image)
            np.save(str(stem) + "_label.npy", label)
            stamp_path.write_text(json.dumps(stamp))
        return image, label


def make_data(config, layout):
    """The volumes of ``config.data`` (synthetic | msd) with the given :class:`Layout`."""
    if config.data == "msd":
        if config.method == "full_labels":
            raise ValueError(
                "config.method: 'full_labels' needs every organ labelled in every training case, "
                "which partially labelled folders do not have (use data=synthetic)"
            )
        return FolderData(config, layout)
    return SyntheticData(config, layout, full_labels=config.method == "full_labels")


def sample_slice(subject, rng, *, context, foreground_fraction, full=False):
    """One 2.5D training sample: ``image`` ``(H, W, 2c+1)``, ``label`` ``(H, W)`` (the full label
    with ``full``); the slice goes through an annotated organ with ``foreground_fraction``."""
    image, fg = subject["image"], subject["foreground"]
    if fg.size and rng.random() < foreground_fraction:
        z = int(rng.choice(fg))
    else:
        z = int(rng.integers(image.shape[0]))
    label = subject["full"] if full else subject["label"]
    return {"image": slice_stacks(image, context, z), "label": np.asarray(label[z], np.int32)}


# ------------------------------------------------------------------------------ networks and losses


def build_net(config, num_classes, axis_name=None):
    """The segmentation network: a :class:`medjax.models.small_unet.SmallUNet` with ``config.model``.

    With BatchNorm, ``axis_name`` synchronises its statistics under ``pmap``.
    """
    m = config.model
    if m.norm not in NORMS:
        raise ValueError(f"config.model.norm: expected one of {NORMS}, got {m.norm!r}")
    norm = {"batch": functools.partial(BatchNorm, axis_name=axis_name), "none": None}.get(
        m.norm, m.norm
    )
    return SmallUNet(int(m.features), out_channels=num_classes, levels=int(m.levels), norm=norm)


def run_net(net, variables, x, *, train):
    """``(logits, model_state)``: in training BatchNorm uses and updates batch statistics."""
    state = {k: v for k, v in variables.items() if k != "params"}
    if train and "batch_stats" in variables:
        logits, upd = net.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, {**state, "batch_stats": upd["batch_stats"]}
    return net.apply(variables, x, train=train), state


def merge_scores(scores, eligible=None):
    """Probabilities ``(..., C)`` of merged single-organ predictions.

    ``scores[..., c]`` (c >= 1) is organ c's probability from the model(s) annotating it;
    ``eligible`` ``(B, C)`` optionally zeroes the organs a sample may not receive. Organ channels
    keep their score and the background gets ``1 - max_c score_c``, so the argmax is the most
    probable organ where one exceeds 1/2 and background elsewhere.
    """
    s = scores[..., 1:]
    if eligible is not None:
        e = eligible[:, 1:].astype(s.dtype)
        s = s * e.reshape((e.shape[0],) + (1,) * (s.ndim - 2) + (e.shape[1],))
    m = jnp.max(s, axis=-1, keepdims=True)
    return jnp.concatenate([1.0 - m, s], axis=-1)


# ---------------------------------------------------------------------------------- the experiment


class Experiment(medjax.train.Experiment):
    """Co-training on partially labelled datasets and its baselines (``config.method``).

    ``region`` (a callable ``(label, class_mask, pseudo) -> (B, *S) bool``) replaces the soft
    loss's region mask of ``config.soft.region``; ``axis_name`` builds the steps (and BatchNorm)
    for ``jax.pmap``.
    """

    eval_metric = "val_dice"
    eval_mode = "max"

    def __init__(self, config, *, region=None, axis_name=None):
        super().__init__(config)
        self.method = config.method
        if self.method not in METHODS:
            raise ValueError(f"config.method: expected one of {METHODS}, got {self.method!r}")
        expected = steps_for(config)
        if int(config.num_steps) != expected:
            raise ValueError(
                f"config.num_steps: method {self.method!r} runs {expected} steps (its stages' "
                f"num_steps), got {int(config.num_steps)}; pass --config.num_steps={expected}"
            )
        if config.soft.ramp not in RAMPS:
            raise ValueError(f"config.soft.ramp: expected one of {RAMPS}, got {config.soft.ramp!r}")
        if config.ema.teacher_norm not in ("running", "batch"):
            raise ValueError(
                f"config.ema.teacher_norm: expected 'running' or 'batch', got "
                f"{config.ema.teacher_norm!r}"
            )
        if region is None:
            if config.soft.region not in REGIONS:
                raise ValueError(
                    f"config.soft.region: expected one of {tuple(REGIONS)}, got {config.soft.region!r}"
                )
            region = REGIONS[config.soft.region]
            if config.soft.region == "dilated_pseudo":
                region = functools.partial(region, dilation=int(config.soft.dilation))
            self.region_name = f"config.soft.region={config.soft.region!r}"
        else:
            self.region_name = f"region={getattr(region, '__name__', type(region).__name__)}"
        self.region = region
        self.axis_name = axis_name
        self.context = int(config.context)
        factor = 2 ** (int(config.model.levels) - 1)
        self.layout = data_layout(config, factor)
        self.num_classes = len(self.layout.classes)
        self.net = build_net(config, self.num_classes, axis_name)
        # per single-organ model: the classes it may predict and the organs it is scored on
        organs = self.layout.annotated.copy()
        organs[:, 0] = False
        self.organs = organs
        self.allowed = organs | np.eye(1, self.num_classes, 0, dtype=bool)
        self.organ_keys = [f"m{k}" for k in range(len(self.layout.datasets))]
        self._forward = jax.jit(self._forward_impl, static_argnums=0)

    @functools.cached_property
    def data(self):
        """The volumes (loaded or drawn on first use)."""
        return make_data(self.config, self.layout)

    # ---------------------------------------------------------------- state

    def _optimizer(self, stage, ema):
        cfg = self.config.optimizer.to_dict()
        schedule = dict(cfg.get("schedule") or {})
        if schedule.get("name") == "warmup_cosine" and not schedule.get("total_steps"):
            schedule["total_steps"] = int(self.config.stages[stage].num_steps)
            cfg["schedule"] = schedule
        if ema:
            cfg["ema_decay"] = float(self.config.ema.decay)
            cfg["ema_warmup_steps"] = self.config.ema.warmup
        return make_optimizer(cfg)

    def prepare(self):
        """Before training: load (and check) every volume, so that data errors come first."""
        _ = self.data

    def init_state(self, rng):
        """Every network of the method: ``organ`` (the single-organ models), ``net`` or ``a``/``b``.

        Network i is initialised from ``fold_in(rng, i)`` (so ``a`` and ``b`` differ) and draws its
        step keys from ``fold_in(rng, 1000 + i)``.
        """
        key = jax.random.wrap_key_data(jnp.asarray(rng))
        x = jnp.zeros((1, *self.layout.plane, 2 * self.context + 1), jnp.float32)

        def variables(i):
            v = dict(fast_init(self.net, jax.random.fold_in(key, i), x))
            return v.pop("params"), v

        def step_key(i):
            return jax.random.key_data(jax.random.fold_in(key, 1000 + i))

        state = {}
        if self.method in WITH_SINGLE_ORGAN:
            params, stats = {}, {}
            for i, k in enumerate(self.organ_keys):
                params[k], ms = variables(10 + i)
                if "batch_stats" in ms:
                    stats[k] = ms["batch_stats"]
            state["organ"] = TrainState.create(
                apply_fn=self.net.apply,
                params=params,
                tx=self._optimizer("single_organ", ema=False),
                rng=step_key(10),
                model_state={"batch_stats": stats} if stats else {},
            )
        names = {"cotraining": ("a", "b"), "separate": ()}.get(self.method, ("net",))
        ema = self.method in ("self_training", "cotraining")
        for i, name in enumerate(names):
            params, ms = variables(i)
            state[name] = TrainState.create(
                apply_fn=self.net.apply,
                params=params,
                tx=self._optimizer("main", ema=ema),
                rng=step_key(i),
                model_state=ms,
            )
        return state

    def _organ_variables(self, params, model_state, k):
        v = {"params": params[k]}
        if model_state.get("batch_stats"):
            v["batch_stats"] = model_state["batch_stats"][k]
        return v

    # ---------------------------------------------------------------- losses

    def whole_batch(self, *arrays):
        """The arrays of the whole batch: under ``pmap`` gathered from every device.

        Every loss is computed on the global batch (the batch-pooled Dice and the masked means do
        not split over devices). Each device then holds the same loss, whose gradient through the
        gather sums over the devices' copies, so the step's mean over devices is the gradient of
        the global loss, as on one device or the mesh.
        """
        if self.axis_name is None:
            return arrays
        return tuple(jax.lax.all_gather(a, self.axis_name, tiled=True) for a in arrays)

    def hard_loss(self, logits, target, class_weights=None):
        """Weighted focal + soft Dice over the organs, pooled over the batch: ``(loss, terms)``."""
        c = self.config.loss
        logits, target = self.whole_batch(logits, target)
        focal = focal_loss(logits, target, gamma=float(c.focal_gamma))
        dice = soft_dice_loss(
            logits,
            target,
            reduction="batch",
            smooth=float(c.dice_smooth),
            include_background=False,
            class_weights=class_weights,
        )
        loss = float(c.focal_weight) * focal + float(c.dice_weight) * dice
        return loss, {"focal": focal, "dice_loss": dice}

    def organ_scores(self, params, model_state, x):
        """``(B, *S, C)``: each organ's probability from the frozen single-organ model(s) annotating it."""
        total = 0.0
        for k, key in enumerate(self.organ_keys):
            v = self._organ_variables(params, model_state, key)
            logits = jnp.where(self.allowed[k], self.net.apply(v, x, train=False), _MASKED)
            total = total + jax.nn.softmax(logits, axis=-1) * self.organs[k]
        return total / np.maximum(self.organs.sum(0), 1)

    def merged_labels(self, organ_state, x, label, class_mask):
        """Ground truth filled in with the single-organ models' hard pseudo-labels: ``(target, pseudo)``.

        ``pseudo`` is the merged argmax over the organs the sample's dataset does not annotate;
        ``target`` keeps every voxel its dataset labels as an organ.
        """
        scores = self.organ_scores(organ_state.params, organ_state.model_state, x)
        pseudo = jnp.argmax(merge_scores(scores, ~class_mask), axis=-1).astype(jnp.int32)
        return jnp.where(label > 0, label, pseudo), pseudo

    def _organ_loss(self, params, model_state, batch, rng, rest):
        """Stage 1: each single-organ model on its own dataset's slices (``batch[...][:, k]``)."""
        del rng, rest
        total, metrics, stats = 0.0, {}, {}
        for k, key in enumerate(self.organ_keys):
            v = self._organ_variables(params, model_state, key)
            logits, ms = run_net(self.net, v, batch["image"][:, k], train=True)
            logits = jnp.where(self.allowed[k], logits, _MASKED)
            loss, _ = self.hard_loss(logits, batch["label"][:, k], self.organs[k])
            metrics[f"loss_{self.layout.datasets[k]}"] = loss
            total = total + loss
            if "batch_stats" in ms:
                stats[key] = ms["batch_stats"]
        new_state = {**model_state, "batch_stats": stats} if stats else model_state
        return total, (metrics, new_state)

    def _plain_loss(self, params, model_state, batch, rng, rest):
        """naive / full_labels: focal + Dice on the batch's labels as they are."""
        del rng, rest
        logits, ms = run_net(
            self.net, {"params": params, **model_state}, batch["image"], train=True
        )
        loss, terms = self.hard_loss(logits, batch["label"])
        return loss, (terms, ms)

    def teacher_logits(self, teacher, x):
        """The teacher's logits (``config.ema.teacher_norm``: its running or the batch's statistics)."""
        v = teacher.variables()
        if self.config.ema.teacher_norm == "batch" and "batch_stats" in v:
            return self.net.apply(v, x, train=True, mutable=["batch_stats"])[0]
        return self.net.apply(v, x, train=False)

    def _co_loss(self, params, model_state, teacher, batch, rng, weight, rest):
        """Merged hard labels (points 1-2) + ``weight`` x the teacher's soft loss on the region (4-5)."""
        del rng
        x, label, class_mask = batch["image"], batch["label"], batch["class_mask"]
        target, pseudo = self.merged_labels(rest["organ"], x, label, class_mask)
        logits, ms = run_net(self.net, {"params": params, **model_state}, x, train=True)
        hard, terms = self.hard_loss(logits, target)
        t_logits = jax.lax.stop_gradient(self.teacher_logits(teacher, x))
        region = checked_region(
            self.region, label, class_mask, pseudo, where=self.region_name,
            datasets=self.layout.datasets,
        )  # fmt: skip
        logits, t_logits, region, label, pseudo = self.whole_batch(
            logits, t_logits, region, label, pseudo
        )
        soft = soft_cross_entropy(logits, t_logits, teacher_logits=True, mask=region)
        differ = jnp.argmax(logits, -1) != jnp.argmax(t_logits, -1)
        metrics = {
            **terms,
            "hard": hard,
            "soft": soft,
            "disagreement": jnp.mean(differ.astype(jnp.float32)),
            "region_fraction": jnp.mean(region.astype(jnp.float32)),
            "pseudo_fraction": jnp.mean(((label == 0) & (pseudo > 0)).astype(jnp.float32)),
        }
        return hard + weight * soft, (metrics, ms)

    def _weight(self):
        s = self.config.soft
        w = float(s.weight)
        if s.ramp == "none":
            return w
        ramp = max(1, int(round(float(s.ramp_fraction) * int(self.config.stages.main.num_steps))))
        return functools.partial(ramp_weight, max_weight=w, ramp_steps=ramp, kind=s.ramp)

    @functools.cached_property
    def steps(self):
        """``{stage name: step function}`` of the method."""
        ax = self.axis_name
        out = {}
        if self.method in WITH_SINGLE_ORGAN:
            out["single_organ"] = supervised_step(self._organ_loss, key="organ", axis_name=ax)
        if self.method in ("naive", "full_labels"):
            out[self.method] = supervised_step(self._plain_loss, key="net", axis_name=ax)
        elif self.method in ("self_training", "cotraining"):
            models = ("net",) if self.method == "self_training" else ("a", "b")
            out[self.method] = cotraining_step(
                self._co_loss, weight=self._weight(), models=models, axis_name=ax
            )
        return out

    def stages(self):
        """``single_organ`` (the methods that need pseudo-labels, and ``separate``), then the method."""
        out = []
        for name, step in self.steps.items():
            if name == "single_organ":
                out.append(
                    medjax.train.Stage(
                        name,
                        int(self.config.stages.single_organ.num_steps),
                        step,
                        iterator=self.single_organ_iterator,
                        validate=self.method == "separate",
                    )
                )
            else:
                out.append(medjax.train.Stage(name, int(self.config.stages.main.num_steps), step))
        return out

    # ---------------------------------------------------------------- input

    def _sample(self, subject, rng):
        return sample_slice(
            subject,
            rng,
            context=self.context,
            foreground_fraction=float(self.config.foreground_fraction),
            full=self.method == "full_labels",
        )

    def single_organ_iterator(self):
        """Stage-1 batches: per item one slice of a random subject of every dataset, stacked on axis 1."""
        train = self.data.train

        def transform(record, rng):
            del record
            parts = [self._sample(s[int(rng.integers(len(s)))], rng) for s in train]
            return {k: np.stack([p[k] for p in parts]) for k in ("image", "label")}

        return pipeline.make_iterator(
            pipeline.FunctionSource(1_000_000, lambda i: {}),
            batch_size=int(self.config.batch_size),
            seed=int(self.config.seed),
            transform=transform,
            prefetch_threads=int(self.config.prefetch_threads),
        )

    def train_iterator(self):
        """Batches mixing the partially labelled datasets, each sample with its ``class_mask``."""
        train = self.data.train
        sources = [
            pipeline.FunctionSource(
                len(s), functools.partial(lambda k, i: {"subject": i, "k": k}, k)
            )
            for k, s in enumerate(train)
        ]

        def transform(record, rng):
            return self._sample(train[int(record["k"])][int(record["subject"])], rng)

        if self.config.dataset_weights not in ("equal", "size"):
            raise ValueError(
                f"config.dataset_weights: expected 'equal' or 'size', got "
                f"{self.config.dataset_weights!r}"
            )
        weights = [1.0 if self.config.dataset_weights == "equal" else len(s) for s in train]
        masks = self.layout.annotated
        if self.method == "full_labels":
            masks = np.ones_like(masks)  # every organ labelled in every sample
        return pipeline.make_mixed_iterator(
            sources,
            batch_size=int(self.config.batch_size),
            seed=int(self.config.seed),
            weights=weights,
            class_masks=list(masks),
            transform=transform,
            prefetch_threads=int(self.config.prefetch_threads),
        )

    # ---------------------------------------------------------------- inference

    def _forward_impl(self, kind, variables, x):
        """Class probabilities ``(N, H, W, C)`` of 2.5D inputs: one network, or the merged organs."""
        if kind == "organs":
            return merge_scores(self.organ_scores(variables["params"], variables["state"], x))
        return jax.nn.softmax(self.net.apply(variables, x, train=False), axis=-1)

    def predict_volume(self, model, volume):
        """``(Z, H, W, C)`` probabilities of ``volume`` ``(Z, H, W)``, slice by slice (2.5D)."""
        kind, variables = model
        stacks = slice_stacks(volume, self.context)
        n = stacks.shape[0]
        b = max(1, min(int(self.config.eval.slice_batch), n))
        out = []
        for i in range(0, n, b):
            chunk = stacks[i : i + b]
            pad = b - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            out.append(np.asarray(self._forward(kind, variables, jnp.asarray(chunk)))[: b - pad])
        return np.concatenate(out)

    def candidates(self, state):
        """``(selectable, reported)``: ``{name: (kind, variables)}`` of the models inference may
        use (the better one on validation is used) and of the ones only reported."""
        if self.method == "separate":
            organ = state["organ"]
            return {
                "separate": ("organs", {"params": organ.params, "state": organ.model_state})
            }, {}

        def ema(st):
            return ("net", {"params": get_ema_params(st.opt_state), **st.model_state})

        def live(st):
            return ("net", st.variables())

        if self.method == "cotraining":
            return {"ema_a": ema(state["a"]), "ema_b": ema(state["b"])}, {
                "student_a": live(state["a"]),
                "student_b": live(state["b"]),
            }
        if self.method == "self_training":
            return {"ema": ema(state["net"])}, {"student": live(state["net"])}
        return {"net": live(state["net"])}, {}

    def _cases(self, subjects, scored_on_annotated):
        for s in subjects:
            organs = [c for c in range(1, self.num_classes) if s["annotated"][c]]
            yield {
                "id": s["id"],
                "image": np.asarray(s["image"])[..., None],
                "label": np.asarray(s["label"]),
                "spacing": s["spacing"],
                "classes": organs if scored_on_annotated else None,
            }

    def _evaluate(self, model, subjects, *, on_case=None, surface=False):
        return evaluate_segmentation(
            self._cases(subjects, scored_on_annotated=True),
            lambda x: self.predict_volume(model, np.asarray(x)[0, ..., 0])[None],
            num_classes=self.num_classes,
            class_names=self.class_keys,
            surface=surface,
            on_case=on_case,
        )

    @property
    def class_keys(self):
        """Class names usable in result keys (``dice_<name>``)."""
        return ["_".join(c.split()) for c in self.layout.classes]

    def select(self, state):
        """``(name, model, {name: validation mean Dice})``: the selectable model with the best
        validation Dice (point 6)."""
        selectable, _ = self.candidates(state)
        val = {
            n: float(self._evaluate(m, self.data.val)["mean_dice"]) for n, m in selectable.items()
        }
        best = max(val, key=lambda n: (np.nan_to_num(val[n], nan=-1.0), -list(val).index(n)))
        return best, selectable[best], val

    def validate(self, state):
        """Validation mean Dice of the inference candidates: ``{"val_dice": best, "val_dice_<name>"}``."""
        _, _, val = self.select(state)
        return {"val_dice": max(val.values()), **{f"val_dice_{k}": v for k, v in val.items()}}

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, state, workdir):
        """Dice per organ on the test subjects with the selected model; figures in ``workdir/figures``."""
        t0 = time.perf_counter()
        workdir = pathlib.Path(workdir)
        fig_dir = workdir / "figures"
        chosen, model, val = self.select(state)
        first = self.data.test[0]
        z = figure_slice(np.asarray(first["label"]))
        shown = {}  # the first test subject's prediction of every candidate (figures)

        def keep(name):
            return lambda i, case, pred, probs: shown.setdefault(name, pred) if i == 0 else None

        surface = bool(self.config.eval.surface)
        results = self._evaluate(model, self.data.test, on_case=keep(chosen), surface=surface)
        selectable, reported = self.candidates(state)
        others = {}
        for name, m in {**selectable, **reported}.items():
            r = results if name == chosen else self._evaluate(m, self.data.test, on_case=keep(name))
            others[name] = {"val_mean_dice": val.get(name), "test_mean_dice": r["mean_dice"]}
            others[name].update(
                {k: v for k, v in r.items() if k.startswith("dice_") and not k.endswith("_std")}
            )
        out = {
            "method": self.method,
            "data": self.config.data,
            "classes": list(self.layout.classes),
            "datasets": list(self.layout.datasets),
            "inference_model": chosen,
            "num_test_cases": results["num_cases"],
            **{k: v for k, v in results.items() if k != "num_cases"},
            "candidates": others,
            "figure_slice": {"case": first["id"], "z": int(z)},
        }
        try:
            out["figures"] = self._figures(workdir, fig_dir, first, z, shown, chosen)
        except Exception as e:  # figures must never lose the metrics
            print(f"cotraining2020: figures failed: {type(e).__name__}: {e}")
        out["eval_wall_s"] = time.perf_counter() - t0
        return out

    def _figures(self, workdir, fig_dir, subject, z, shown, chosen):
        image, truth = np.asarray(subject["image"]), np.asarray(subject["label"])
        order = [chosen] + [n for n in shown if n != chosen]
        preds = {(f"{n} (used)" if n == chosen else n): shown[n] for n in order}
        paths = [
            F.segmentation_panels(
                fig_dir / "prediction.png",
                image,
                truth,
                preds,
                axis=0,
                index=z,
                num_classes=self.num_classes,
                title=f"{self.method}: {subject['id']}, slice {z}",
            )  # fmt: skip
        ]
        fig_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            fig_dir / "slice.npz", image=image[z], truth=truth[z], prediction=shown[chosen][z]
        )
        curves = training_curves(workdir / "metrics.jsonl")
        if curves.get("weight"):
            paths.append(
                F.curves(
                    fig_dir / "soft_weight.png",
                    None,
                    {"soft-loss weight": curves["weight"]},
                    ylabel="soft-loss weight",
                    title=self.method,
                )  # fmt: skip
            )
        dis = {k: v for k, v in curves.items() if k.endswith("disagreement")}
        if dis:
            paths.append(
                F.curves(
                    fig_dir / "disagreement.png",
                    None,
                    dis,
                    ylabel="fraction of voxels: network argmax != teacher argmax",
                    title=f"{self.method}: disagreement with the teacher",
                )  # fmt: skip
            )
        return [p.name for p in paths]

    def report(self, results):
        """Markdown: mean ± std Dice per organ on the test subjects, and the candidates' scores."""
        names = [k for k in self.class_keys[1:]]
        head = ["model", "mean Dice", *names]
        rows = [
            [
                f"{results.get('inference_model')} (used)",
                mean_std(results.get("mean_dice"), results.get("mean_dice_std")),
                *(mean_std(results.get(f"dice_{n}"), results.get(f"dice_{n}_std")) for n in names),
            ]
        ]
        for name, c in results.get("candidates", {}).items():
            if name == results.get("inference_model"):
                continue
            rows.append(
                [
                    name,
                    mean_std(c.get("test_mean_dice")),
                    *(mean_std(c.get(f"dice_{n}")) for n in names),
                ]
            )
        lines = [
            f"{self.method}: Dice on {results.get('num_test_cases')} test subjects "
            f"({results.get('data')} data), checkpoint step {results.get('checkpoint_step', '?')}; "
            "mean ± std over subjects",
            "",
            markdown_table(head, rows),
        ]
        val = {n: c.get("val_mean_dice") for n, c in results.get("candidates", {}).items()}
        val = {n: v for n, v in val.items() if v is not None}
        if val:
            lines += ["", "validation mean Dice (selects the inference model): "
                      + ", ".join(f"{n} {v:.3f}" for n, v in val.items())]  # fmt: skip
        return "\n".join(lines)

    # ---------------------------------------------------------------- comparison

    def compare_table(self, rows):
        """Dice per organ of every row, then co-training's paired gain over each row."""
        names = self.class_keys[1:]
        head = ["Method", "mean Dice", *names, "Train (s)"]
        body = []
        for r in rows.values():
            tw = r.get("train_wall_s")
            body.append(
                [
                    r.get("label", r.get("row")),
                    mean_std(r.get("mean_dice"), r.get("mean_dice_std")),
                    *(mean_std(r.get(f"dice_{n}"), r.get(f"dice_{n}_std")) for n in names),
                    f"{tw:.0f}" if isinstance(tw, int | float) else "-",
                ]
            )
        out = [markdown_table(head, body)]
        ref = rows.get("cotraining")
        if ref is not None:
            gains = []
            for key, r in rows.items():
                if key == "cotraining":
                    continue
                cells = [r.get("label", key)]
                for metric in ("mean_dice", *(f"dice_{n}" for n in names)):
                    g = paired_bootstrap(*_paired(r, ref, metric),
                                         resamples=int(self.config.eval.bootstrap))  # fmt: skip
                    cells.append(gain_cell(g))
                gains.append(cells)
            out += [
                "",
                "Co-training (EMA) minus each row, paired over the same test subjects: mean "
                "[95 % bootstrap CI] (subjects improved)",
                "",
                markdown_table(["Row", "mean Dice", *names], gains),
            ]
        return "\n".join(out)

    def compare_figures(self, rows, workdir):
        """compare_dice.png (per-organ bars), compare_predictions.png (one slice per row) and the
        soft-weight / disagreement curves of the rows that have a teacher."""
        workdir = pathlib.Path(workdir)
        fig = workdir / "figures"
        names = self.class_keys[1:]
        series = {
            r.get("label", k): (
                [r.get("mean_dice", np.nan), *(r.get(f"dice_{n}", np.nan) for n in names)],
                [r.get("mean_dice_std", np.nan), *(r.get(f"dice_{n}_std", np.nan) for n in names)],
            )
            for k, r in rows.items()
        }
        paths = [F.bar_chart(fig / "compare_dice.png", ["mean", *names], series,
                             ylabel="Dice on the test subjects", ylim=(0, 1))]  # fmt: skip
        preds, slice_ = {}, None
        weights, dis = {}, {}
        for key, r in rows.items():
            row_dir = workdir / str(r.get("variant")) / key
            npz = row_dir / "figures" / "slice.npz"
            if npz.is_file():
                d = np.load(npz)
                slice_ = slice_ or (d["image"], d["truth"])
                preds[key] = d["prediction"][..., None]
            c = training_curves(row_dir / "metrics.jsonl")
            if c.get("weight"):
                weights[key] = c["weight"]
            for k, v in c.items():
                if k.endswith("disagreement"):
                    dis[f"{key}: {k}"] = v
        if slice_ is not None:
            img, truth = slice_
            paths.append(
                F.segmentation_panels(
                    fig / "compare_predictions.png",
                    img[..., None],
                    truth[..., None],
                    preds,
                    axis=-1,
                    index=0,
                    num_classes=self.num_classes,
                )  # fmt: skip
            )
        if weights:
            paths.append(
                F.curves(fig / "compare_soft_weight.png", None, weights, ylabel="soft-loss weight")
            )
        if dis:
            paths.append(F.curves(fig / "compare_disagreement.png", None, dis,
                                  ylabel="network vs teacher disagreement"))  # fmt: skip
        return paths

    # ---------------------------------------------------------------- prediction

    def preprocess_file(self, image):
        """:class:`medjax.evaluation.segmentation.Prepared` of a CT ``Image`` (HU): ``(z, x, y)``
        slices at the network's in-plane size, and the map back onto the input's grid."""
        if image.num_channels != 1 or len(image.spatial_shape) != 3:
            raise ValueError(
                f"{image.path}: expected a 3D CT volume with one channel, got array shape "
                f"{image.array.shape}"
            )
        native = image.array[..., 0]
        volume = resample_plane(np.moveaxis(native, 2, 0), self.layout.plane, order=1)
        volume = ct_scale(volume, self.layout.hu_range)

        def restore(array, order=0):
            back = resample_plane(array, native.shape[:2], order=order)
            return np.moveaxis(back, 0, 2)

        return Prepared(volume[..., None], restore)

    def predict(self, state, inputs, out_dir):
        """Multi-organ label maps ``<name>_seg.nii.gz`` (with each input's affine) of CT files (HU).

        Uses the model :meth:`select` picks on the validation subjects; ``labels.json`` in
        ``out_dir`` lists the class names by label value.
        """
        chosen, model, _ = self.select(state)
        written = predict_files(
            inputs,
            out_dir,
            predict=lambda x: self.predict_volume(model, np.asarray(x)[0, ..., 0])[None],
            preprocess=self.preprocess_file,
            num_classes=self.num_classes,
        )
        out = pathlib.Path(out_dir) / "labels.json"
        out.write_text(json.dumps({"classes": list(self.layout.classes), "model": chosen}) + "\n")
        return written


# ------------------------------------------------------------------------------------------ helpers


def figure_slice(label):
    """The slice (axis 0) showing the most organs, the one with most foreground among those."""
    flat = np.asarray(label).reshape(label.shape[0], -1)
    present = np.stack([(flat == c).any(1) for c in range(1, int(flat.max()) + 1)], 1)
    score = present.sum(1) * flat.shape[1] + (flat > 0).sum(1)
    return int(np.argmax(score))


def training_curves(path):
    """``{name: (steps, values)}`` of the logged soft-loss weight and disagreements."""
    path = pathlib.Path(path)
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k == "weight" or k.endswith("disagreement"):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(rec["step"])
                ys.append(v)
    return out


def _paired(row, ref, metric):
    """(row values, reference values) of ``metric`` over the test subjects both evaluated."""
    a = {c["id"]: c.get(metric, np.nan) for c in row.get("per_case", [])}
    b = {c["id"]: c.get(metric, np.nan) for c in ref.get("per_case", [])}
    ids = [i for i in a if i in b]
    return [a[i] for i in ids], [b[i] for i in ids]
