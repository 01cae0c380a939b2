"""MedicalZoo (MedicalZooPytorch) 3D model zoo: the medjax Experiment.

What is specific to the zoo lives here: how each network is called (:data:`NETWORKS`: input
constraints, 2D slice by slice, unpadded convolutions, tuple outputs), the iSeg-like synthetic
tissue task, the original's preprocessing and sub-volume sampling, its losses, and the comparison
table. Evaluation (per-class Dice / HD95 on full volumes by sliding-window inference), NIfTI
prediction, statistics, tables and figures come from ``medjax.evaluation``.

Data (``config.data``):

- ``synthetic``: :func:`medjax.data.synthetic.brain_phantom` subjects without tumour, T1 + T2 (as
  iSeg-2017). ``synthetic.classes="tissue"`` maps the phantom's anatomy to iSeg's four classes:
  background; CSF (CSF + ventricles); grey matter (cortex + deep grey nuclei + cerebellum, whose
  folia mix GM and WM); white matter (+ brainstem). ``"anatomy"`` keeps its 8 labels.
- ``iseg2017`` (labels {0, 10, 150, 250}), ``mrbrains18`` (``mrbrains_classes`` 4 or 9),
  ``brats`` (BraTS 2018-2021/2023) and ``decathlon`` folders, through ``medjax.data.datasets``;
  subjects split ``config.split`` (train / test) by ``medjax.data.datasets.split``.

Every volume is preprocessed as the original's ``load_medical_image``: a per-channel percentile
clip (0.1-99.8) then one normalisation per channel (:func:`preprocess`): ``full_volume_mean``
(z-score over the volume), ``mean`` (z-score over the non-zero voxels), ``max_min`` or ``brats``.
Training sub-volumes (``config.crop``) are drawn on the fly by
:func:`medjax.data.transforms.threshold_crop`, kept when their label covers at least
``min_fraction`` of the volume's labelled voxels (the original's ``th_percent``); augmentation runs
on device inside the step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import medjax.train
from medjax import figures as F
from medjax import losses as L
from medjax.data import datasets, pipeline, synthetic, transforms
from medjax.evaluation.report import markdown_table, mean_std
from medjax.evaluation.segmentation import (
    Prepared,
    evaluate_segmentation,
    make_predictor,
    predict_files,
)
from medjax.models import registry
from medjax.nn.blocks import fast_init, rbg_key
from medjax.train.optim import make_optimizer
from medjax.train.state import TrainState
from medjax.train.steps import supervised_step

DATASETS = ("synthetic", "iseg2017", "mrbrains18", "brats", "decathlon")
NORMALIZATIONS = ("full_volume_mean", "mean", "max_min", "brats", "none")
LOSSES = ("dice", "generalized_dice", "bce_dice", "weighted_ce", "dice_ce")
AUGMENTATIONS = ("none", "original")

# -------------------------------------------------------------------------------------- networks


@dataclasses.dataclass(frozen=True)
class Network:
    """How the experiment calls one registered network (the one dispatch per network)."""

    multiple: int = 1  # every spatial size of the input must be a multiple of this
    min_size: int = 1  # ... and at least this
    margin: int = 0  # voxels its unpadded convolutions lose per side (the input is padded by it)
    slices: bool = False  # a 2D network: applied to the slices along the last spatial axis
    output: str = "logits"  # logits | two_heads (DenseVoxelNet) | vae (ResNet3dVAE) | dict
    channels: tuple = ()  # the input channel counts it takes (empty: any)
    dim: bool = False  # built for one input size: ResNet3dVAE's ``dim`` = the crop
    args: str = (
        "zoo"  # constructor arguments: zoo (in_channels, num_classes) | smallunet | estienne
    )
    zoo_key: str = ""  # the original MedicalZoo registry key (checkpoint import)


#: registry name -> :class:`Network`. The zoo (every network of the original's registry but the
#: COVID classifiers) and two of medjax's own segmenters.
NETWORKS = {
    "unet3d": Network(multiple=16, min_size=32, zoo_key="UNET3D"),
    "vnet": Network(multiple=16, zoo_key="VNET"),
    "vnetlight": Network(multiple=8, zoo_key="VNET2"),
    "singlepathdensenet": Network(zoo_key="DENSENET1"),
    "dualpathdensenet": Network(zoo_key="DENSENET2"),
    "dualsingledensenet": Network(zoo_key="DENSENET3"),
    "hyperdensenet_2mod": Network(margin=9, channels=(2,), zoo_key="HYPERDENSENET"),
    "hyperdensenet": Network(margin=9, channels=(3,), zoo_key="HYPERDENSENET"),
    "skipdensenet3d": Network(multiple=16, zoo_key="SKIPDENSENET3D"),
    "densevoxelnet": Network(multiple=4, output="two_heads", zoo_key="DENSEVOXELNET"),
    "resnet3dvae": Network(multiple=16, output="vae", dim=True, zoo_key="RESNET3DVAE"),
    "resnetmed3d": Network(multiple=8, zoo_key="RESNETMED3D"),
    "highresnet3d": Network(zoo_key="HIGHRESNET"),
    "unet": Network(slices=True, min_size=16, zoo_key="UNET2D"),
    "smallunet": Network(multiple=4, args="smallunet"),
    "segmentationnet": Network(multiple=16, output="dict", args="estienne"),
}


def network_name(name):
    """The registry name of ``name`` (aliases such as ``VNET2`` resolve), or ``ValueError``."""
    try:
        key = registry.entry(str(name)).name.lower()
    except ValueError:
        key = None
    if key not in NETWORKS:
        raise ValueError(
            f"config.model.name: expected a MedicalZoo network ({', '.join(NETWORKS)}; or an "
            f"original key such as VNET2 or DENSENET1), got {name!r}"
        )
    return key


def check_crop(crop, net: Network, name):
    """``crop`` as a tuple, or ``ValueError`` naming the network's constraint and the nearest crop."""
    crop = tuple(int(s) for s in crop)
    if len(crop) != 3 or min(crop) < 1:
        raise ValueError(f"config.crop: expected 3 positive sizes, got {crop}")
    m, lo = net.multiple, net.min_size
    if any(s % m or s < lo for s in crop):
        nearest = tuple(max(lo, m, int(math.floor(s / m + 0.5)) * m) for s in crop)
        raise ValueError(
            f"config.crop: {name} needs sizes that are multiples of {m} and >= {lo}, got {crop}; "
            f"the nearest valid crop is {nearest}"
        )
    return crop


def build_network(config, in_channels, num_classes):
    """``(name, Network, flax module)`` of ``config.model`` for the data's channels and classes."""
    name = network_name(config.model.name)
    net = NETWORKS[name]
    if net.channels and in_channels not in net.channels:
        other = [k for k, n in NETWORKS.items() if n.zoo_key == net.zoo_key and k != name]
        hint = f"; use {other[0]}" if other else ""
        raise ValueError(
            f"config.model.name: {name} takes {' or '.join(map(str, net.channels))} input "
            f"channels, but the data has {in_channels}{hint}"
        )
    e = registry.entry(name)
    kwargs = dict(e.defaults)
    if net.args == "zoo":
        kwargs.update(in_channels=int(in_channels), num_classes=int(num_classes))
    elif net.args == "smallunet":
        kwargs.update(out_channels=int(num_classes))
    else:
        kwargs.update(n_modalities=int(in_channels), n_classes=int(num_classes))
    if net.dim:
        kwargs["dim"] = tuple(int(s) for s in config.crop)
    if config.model.axis_name:
        kwargs["axis_name"] = str(config.model.axis_name)
    kwargs.update(dict(config.model.kwargs))
    cls = e.load()
    try:
        return name, net, cls(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"config.model.kwargs: {cls.__name__} does not take them ({err})"
        ) from None


# ------------------------------------------------------------------------------------------ data


def preprocess(image, config):
    """The original's intensity preprocessing of one volume ``(*S, C)`` -> float32, per channel.

    Percentile clip (``config.clip_percentiles``, None to skip), then ``config.normalization``.
    """
    x = np.asarray(image, np.float32)
    if config.clip_percentiles:
        lo, hi = (float(v) for v in config.clip_percentiles)
        x = transforms.percentile_clip(x, lo, hi)
    norm = config.normalization
    if norm == "full_volume_mean":
        x = transforms.zscore(x)
    elif norm == "mean":
        x = transforms.zscore(x, nonzero=True)
    elif norm == "max_min":
        x = transforms.minmax(x)
    elif norm == "brats":
        x = transforms.brats_normalize(x)
    elif norm != "none":
        raise ValueError(f"config.normalization: expected one of {NORMALIZATIONS}, got {norm!r}")
    return np.asarray(x, np.float32)


#: the phantom's anatomy labels -> iSeg's tissue classes (background, CSF, GM, WM)
ANATOMY_TO_TISSUE = {0: 0, 1: 1, 4: 1, 2: 2, 5: 2, 6: 2, 3: 3, 7: 3}


@functools.lru_cache(maxsize=256)
def _phantom(seed, shape, modalities, classes):
    s = synthetic.brain_phantom(int(seed), tuple(shape), tumour=False, modalities=modalities)
    label = s["anatomy"]
    if classes == "tissue":
        label = transforms.remap_labels(label, ANATOMY_TO_TISSUE)
    return s["image"], label.astype(np.int32)


class Data:
    """Subjects: ``train`` and ``test`` item lists, ``volume(item) -> (image, label, id, spacing)``.

    ``image`` is preprocessed, ``label`` int32 with values in ``[0, num_classes)`` (checked).
    """

    def __init__(self, config):
        self.config = config
        self.cache = {}

    def raw(self, item):
        raise NotImplementedError

    def volume(self, item):
        """The preprocessed ``(image (*S, C), label (*S), id, spacing)`` of ``item`` (cached)."""
        key = self.key(item)
        if key in self.cache:
            return self.cache[key]
        image, label, ident, spacing = self.raw(item)
        if image.shape[-1] != self.in_channels:
            raise ValueError(
                f"{ident}: expected {self.in_channels} image channels ({', '.join(self.modalities)}), "
                f"got {image.shape[-1]}"
            )
        if label is not None:
            lo, hi = int(label.min()), int(label.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"{ident}: expected labels in [0, {self.num_classes}) for the "
                    f"{self.num_classes} classes {', '.join(self.class_names)}, got values in "
                    f"[{lo}, {hi}]"
                )
        out = (preprocess(image, self.config), label, ident, spacing)
        if len(self.cache) >= int(self.config.cache_volumes):
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = out
        return out

    def key(self, item):
        return item


class SyntheticTissue(Data):
    """The iSeg-like synthetic task (module docstring): phantom subjects by seed."""

    def __init__(self, config):
        super().__init__(config)
        s = config.synthetic
        if s.classes not in ("tissue", "anatomy"):
            raise ValueError(
                f"config.synthetic.classes: expected 'tissue' or 'anatomy', got {s.classes!r}"
            )
        self.shape = tuple(int(v) for v in s.shape)
        self.modalities = tuple(s.modalities)
        self.in_channels = len(self.modalities)
        if s.classes == "tissue":
            self.class_names = tuple(datasets.ISEG_CLASSES)
        else:
            self.class_names = tuple(synthetic.ANATOMY_LABELS[i] for i in range(8))
        self.num_classes = len(self.class_names)
        base = int(s.seed)
        self.train = [base + i for i in range(int(s.num_train))]
        self.test = [base + 100_000 + i for i in range(int(s.num_test))]
        self.volume_shapes = {None: self.shape}

    def raw(self, item):
        s = self.config.synthetic
        image, label = _phantom(int(item), self.shape, self.modalities, s.classes)
        return image, label, f"phantom-{item}", None


class FolderData(Data):
    """iSeg-2017, MRBrainS18, BraTS or Decathlon records (loaded on demand, preprocessed, cached)."""

    def __init__(self, config):
        super().__init__(config)
        kind, root = config.data, config.data_dir
        if not root:
            raise ValueError(f"config.data_dir: expected a {kind} folder for data={kind!r}, got ''")
        if kind == "iseg2017":
            records = datasets.iseg_records(root)
            self.class_names = tuple(datasets.ISEG_CLASSES)
            self.modalities = ("T1", "T2")
        elif kind == "mrbrains18":
            records = datasets.mrbrains18_records(root, classes=int(config.mrbrains_classes))
            self.class_names = tuple(records[0]["meta"]["classes"])
            self.modalities = tuple(datasets.MRBRAINS18_MODALITIES)
        elif kind == "brats":
            records = datasets.brats_records(root)
            self.class_names = ("background", "NCR", "ED", "ET")
            self.modalities = tuple(datasets.BRATS_MODALITIES)
        else:
            records = datasets.decathlon_records(root)
            labels = records[0]["meta"]["labels"]
            self.class_names = tuple(labels[k] for k in sorted(labels))
            self.modalities = tuple(records[0]["meta"]["modality"])
        records = [r for r in records if r["label"] is not None]
        self.in_channels = len(self.modalities)
        self.num_classes = len(self.class_names)
        if len(records) < 2:
            raise ValueError(
                f"config.data_dir: expected at least 2 labelled {kind} subjects in {root}, "
                f"got {len(records)}"
            )
        fr = np.asarray(config.split, np.float64)
        if fr.shape != (2,) or np.any(fr <= 0):
            raise ValueError(
                f"config.split: expected (train, test) fractions > 0, got {config.split}"
            )
        n = len(records)
        n_test = min(n - 1, max(1, int(round(fr[1] / fr.sum() * n))))  # >= 1 of each
        self.train, self.test = datasets.split(
            records, ((n - n_test) / n, n_test / n), seed=int(config.seed)
        )
        self.test = self.test[: int(config.max_test_cases)]

    def key(self, item):
        return item["id"]

    def raw(self, item):
        rec = datasets.load_record(item)
        return rec.image, rec.label, item["id"], tuple(float(v) for v in rec.spacing)


def make_data(config):
    """The data object of ``config.data``."""
    if config.data not in DATASETS:
        raise ValueError(f"config.data: expected one of {DATASETS}, got {config.data!r}")
    return SyntheticTissue(config) if config.data == "synthetic" else FolderData(config)


# ------------------------------------------------------------------------------- augmentation


def original_augmentation(key, image, label, prob=0.5):
    """The original's ``RandomChoice([noise, flip, elastic], p=0.5)``, per sample, on device.

    With probability ``prob`` a sample gets one of: Gaussian noise (std 0.01), a flip along one
    random axis, or an elastic deformation (medjax's, smoothness 4 voxels, 1 voxel std: the
    original's sigma 20 / alpha 1 moves voxels by about 1 % of a voxel). One draw per sample serves
    every channel and the label (the original draws the elastic field again for each modality
    and deforms the label with the last one's).
    """
    b, nd = image.shape[0], image.ndim - 2
    k_apply, k_choice, k_noise, k_axis, k_el = jax.random.split(key, 5)
    apply = jax.random.uniform(k_apply, (b,)) < prob
    choice = jnp.where(apply, jax.random.randint(k_choice, (b,), 0, 3), -1)
    noisy = transforms.gaussian_noise(k_noise, image, std=0.01)
    axis = jax.random.randint(k_axis, (b,), 0, nd)
    flip_img, flip_lab = image, label
    for a in range(nd):
        sel = axis == a
        flip_img = jnp.where(sel.reshape((b,) + (1,) * (nd + 1)), jnp.flip(image, a + 1), flip_img)
        flip_lab = jnp.where(sel.reshape((b,) + (1,) * nd), jnp.flip(label, a + 1), flip_lab)
    el_img, el_lab = transforms.random_elastic(k_el, image, label, sigma=4.0, magnitude=1.0)

    def pick(c, default, *options):
        out = default
        for i, o in enumerate(options):
            out = jnp.where((c == i).reshape((b,) + (1,) * (o.ndim - 1)), o, out)
        return out

    image = pick(choice, image, noisy, flip_img, el_img)
    label = pick(choice, label, label, flip_lab, el_lab)
    return image, label


# ------------------------------------------------------------------------------------ experiment


class Experiment(medjax.train.Experiment):
    """A MedicalZoo network trained on random sub-volumes; evaluated on full held-out volumes."""

    def __init__(self, config):
        super().__init__(config)
        if config.loss.name not in LOSSES:
            raise ValueError(
                f"config.loss.name: expected one of {LOSSES}, got {config.loss.name!r}"
            )
        if config.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"config.augmentation: expected one of {AUGMENTATIONS}, got {config.augmentation!r}"
            )
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"config.normalization: expected one of {NORMALIZATIONS}, got "
                f"{config.normalization!r}"
            )
        if not 0.0 <= float(config.min_fraction) <= 1.0:
            raise ValueError(f"config.min_fraction: expected [0, 1], got {config.min_fraction}")
        self.name = network_name(config.model.name)
        self.net = NETWORKS[self.name]
        self._step = supervised_step(self._loss_fn, axis_name=str(config.model.axis_name) or None)

    @functools.cached_property
    def crop(self):
        """The training crop, checked against the network and the synthetic volumes."""
        crop = check_crop(self.config.crop, self.net, self.name)
        if self.config.data == "synthetic":
            vol = tuple(int(v) for v in self.config.synthetic.shape)
            if any(c > v for c, v in zip(crop, vol, strict=True)):
                raise ValueError(
                    f"config.crop: {crop} is larger than the synthetic volumes {vol} "
                    "(config.synthetic.shape)"
                )
        return crop

    @functools.cached_property
    def info(self):
        """(channels, classes, class names, modalities) of the data (no volume is read)."""
        return self._data_info()

    in_channels = property(lambda self: self.info[0])
    num_classes = property(lambda self: self.info[1])
    class_names = property(lambda self: self.info[2])
    modalities = property(lambda self: self.info[3])

    @functools.cached_property
    def model(self):
        """The flax module, built for the data's channels and classes (``ValueError`` if it cannot)."""
        self.crop  # noqa: B018 (checked first: a bad crop names the network's constraint)
        return build_network(self.config, self.in_channels, self.num_classes)[2]

    def _data_info(self):
        """(channels, classes, class names, modalities) without reading any volume."""
        c = self.config
        if c.data == "synthetic" and c.synthetic.classes not in ("tissue", "anatomy"):
            raise ValueError(
                f"config.synthetic.classes: expected 'tissue' or 'anatomy', got "
                f"{c.synthetic.classes!r}"
            )
        if c.data == "synthetic":
            mods = tuple(c.synthetic.modalities)
            if c.synthetic.classes == "anatomy":
                names = tuple(synthetic.ANATOMY_LABELS[i] for i in range(8))
            else:
                names = tuple(datasets.ISEG_CLASSES)
            return len(mods), len(names), names, mods
        d = self.data
        return d.in_channels, d.num_classes, d.class_names, d.modalities

    @functools.cached_property
    def data(self):
        """The data (built on first use: ``predict`` needs no training folder)."""
        return make_data(self.config)

    # ------------------------------------------------------------------ the network

    def apply(self, variables, x, *, train=False, rngs=None):
        """``(outputs, new model state)``: ``outputs["logits"]`` ``(B, *S, K)`` for ``x`` ``(B, *S, C)``.

        Pads by the network's margin (reflection), applies a 2D network slice by slice, and
        unpacks the tuple outputs: DenseVoxelNet's second head is ``outputs["aux"]``,
        ResNet3dVAE's ``recon``, ``mu`` and ``logvar``.
        """
        net, b, spatial = self.net, x.shape[0], x.shape[1:-1]
        h = x
        if net.margin:
            m = net.margin
            h = jnp.pad(h, [(0, 0)] + [(m, m)] * len(spatial) + [(0, 0)], mode="reflect")
        if net.slices:  # (B, D, H, W, C) -> (B * W, D, H, C)
            h = jnp.moveaxis(h, -2, 1).reshape((-1, *spatial[:-1], h.shape[-1]))
        mutable = ["batch_stats"] if train and "batch_stats" in variables else False
        out = self.model.apply(variables, h, train=train, rngs=rngs, mutable=mutable)
        out, state = out if mutable else (out, {})
        if net.output == "two_heads":
            out = {"logits": out[0], "aux": out[1]}
        elif net.output == "vae":
            out = dict(zip(("logits", "recon", "mu", "logvar"), out, strict=True))
        elif net.output == "dict":
            out = {"logits": out["logits"]}
        else:
            out = {"logits": out}
        if net.slices:
            for k in ("logits",):
                y = out[k].reshape((b, spatial[-1], *spatial[:-1], -1))
                out[k] = jnp.moveaxis(y, 1, -2)
        return out, dict(state)

    def logits(self, variables, x, train=False):
        """Logits ``(B, *S, K)`` in evaluation (the predictor's ``apply_fn``)."""
        return self.apply(variables, x, train=train)[0]["logits"]

    def init_state(self, rng):
        """TrainState of the network (``model.pretrained``: the original's weights imported).

        ``rng`` initialises the parameters; the steps draw from a key folded out of it.
        """
        step_key = jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rng)), 1)
        )
        x = jnp.zeros((1, *self.crop, self.in_channels), jnp.float32)
        if self.net.margin:
            x = jnp.pad(x, [(0, 0)] + [(self.net.margin,) * 2] * 3 + [(0, 0)])
        if self.net.slices:
            x = x[:, :, :, 0]
        if self.config.model.pretrained:  # checked against the network's tree, not computed
            template = jax.eval_shape(self.model.init, jax.random.key(0), x)
            variables = dict(self._pretrained(template))
        else:
            variables = dict(fast_init(self.model, rng, x))
        params = variables.pop("params")
        return TrainState.create(
            apply_fn=self.model.apply,
            params=params,
            tx=make_optimizer(self.config.optimizer),
            rng=step_key,
            model_state=variables,
        )

    def _pretrained(self, template):
        """The original's checkpoint ``model.pretrained``, checked against ``template``'s tree."""
        from medjax.models.medicalzoo import load_pytorch_weights

        path = str(self.config.model.pretrained)
        if not self.net.zoo_key:
            raise ValueError(f"config.model.pretrained: {self.name} has no MedicalZoo checkpoint")
        if not pathlib.Path(path).is_file():
            raise ValueError(f"config.model.pretrained: no such file {path}")
        kw = {"in_channels": self.in_channels, "num_classes": self.num_classes}
        if self.net.dim:
            kw["dim"] = self.crop
        try:
            loaded = load_pytorch_weights(self.net.zoo_key, path, **kw)
        except ValueError as err:
            raise ValueError(f"config.model.pretrained ({path}): {err}") from None
        flat_t = dict(jax.tree_util.tree_leaves_with_path(template))
        flat_l = dict(jax.tree_util.tree_leaves_with_path(loaded))
        for p in sorted(set(flat_t) | set(flat_l), key=str):
            name = jax.tree_util.keystr(p)
            if p not in flat_l or p not in flat_t:
                where = "the checkpoint lacks" if p not in flat_l else "the network has no"
                raise ValueError(f"config.model.pretrained ({path}): {where} {name}")
            if flat_t[p].shape != flat_l[p].shape:
                raise ValueError(
                    f"config.model.pretrained ({path}): {name} has shape "
                    f"{tuple(flat_l[p].shape)} in the checkpoint, {tuple(flat_t[p].shape)} here"
                )
        return jax.tree.map(jnp.asarray, loaded)

    # ------------------------------------------------------------------ training

    def seg_loss(self, logits, labels):
        """The configured segmentation loss of logits ``(B, *S, K)`` and labels ``(B, *S)``."""
        c = self.config.loss
        act = "sigmoid" if c.sigmoid else "softmax"
        # Batch-pooled sums are pooled over the pmap axis too, so pmap equals one device.
        ax = str(self.config.model.axis_name) or None
        if c.name == "dice":  # MedicalZoo's DiceLoss (softmax unless loss.sigmoid)
            return L.soft_dice_loss(
                logits, labels, activation=act, squared=True, eps=1e-6, axis_name=ax
            )
        if c.name == "generalized_dice":
            return L.generalized_dice_loss(logits, labels, activation=act, eps=1e-6, axis_name=ax)
        if c.name == "bce_dice":
            return L.bce_dice_loss(logits, labels, activation=act, axis_name=ax)
        if c.name == "weighted_ce":
            return L.weighted_cross_entropy(logits, labels, axis_name=ax)
        ce = L.cross_entropy(logits, labels)
        return ce + L.soft_dice_loss(logits, labels, squared=True, eps=1e-6, axis_name=ax)

    def _loss_fn(self, params, model_state, batch, rng, rest):
        del rest
        k_aug, k_drop, k_vae = jax.random.split(rng, 3)
        image, label = batch["image"], batch["label"]
        if self.config.augmentation == "original":
            image, label = original_augmentation(k_aug, image, label)
        out, new_state = self.apply(
            {"params": params, **model_state},
            image,
            train=True,
            rngs={"dropout": rbg_key(k_drop), "vae": k_vae},
        )
        seg = self.seg_loss(out["logits"], label)
        metrics, loss = {"seg_loss": seg}, seg
        if "aux" in out:
            aux = self.seg_loss(out["aux"], label)
            loss = loss + float(self.config.loss.aux_weight) * aux
            metrics["aux_loss"] = aux
        if "recon" in out:
            terms = L.vae_loss_terms(image, out["recon"], out["mu"], out["logvar"])
            w = float(self.config.loss.vae_weight)
            loss = loss + w * (terms["reconstruction"] + terms["kl"])
            metrics.update(vae_reconstruction=terms["reconstruction"], vae_kl=terms["kl"])
        return loss, (metrics, {**model_state, **new_state})

    def train_step(self, state, batch):
        """One optimiser step on the configured loss; metrics: loss and its terms."""
        return self._step(state, batch)

    def sample(self, item, rng):
        """One training sub-volume of subject ``item``: ``{"image", "label"}`` (crop of ``config.crop``)."""
        image, label, ident, _ = self.data.volume(item)
        if any(c > s for c, s in zip(self.crop, label.shape, strict=True)):
            raise ValueError(
                f"config.crop: {self.crop} is larger than the volume {ident} of shape "
                f"{label.shape}; choose a crop <= it (e.g. --config.crop="
                f"{tuple(min(c, s) for c, s in zip(self.crop, label.shape, strict=True))})"
            )
        img, lab = transforms.threshold_crop(
            rng, image, label, size=self.crop, min_fraction=float(self.config.min_fraction)
        )
        return {"image": img.astype(np.float32), "label": lab.astype(np.int32)}

    def train_iterator(self):
        """Resumable iterator of random sub-volumes, ``samples_per_epoch`` per epoch."""
        items = self.data.train
        n = max(int(self.config.samples_per_epoch), len(items))
        source = pipeline.FunctionSource(n, lambda i: {"index": np.int64(i % len(items))})
        return pipeline.make_iterator(
            source,
            batch_size=int(self.config.batch_size),
            seed=int(self.config.seed),
            transform=lambda rec, rng: self.sample(items[int(rec["index"])], rng),
            shuffle=True,
            prefetch_threads=1,
        )

    # ------------------------------------------------------------------ evaluation

    @functools.cached_property
    def roi(self):
        """The sliding window: ``config.eval.roi``, or the training crop when it is None."""
        roi = self.config.eval.get("roi")
        if not roi:
            return self.crop
        roi = tuple(int(v) for v in roi)
        if self.net.dim and roi != self.crop:
            raise ValueError(
                f"config.eval.roi: {self.name} is built for its input size {self.crop} "
                f"(config.crop), got {roi}"
            )
        try:
            return check_crop(roi, self.net, self.name)
        except ValueError as err:
            raise ValueError(str(err).replace("config.crop", "config.eval.roi")) from None

    def predictor(self, state):
        """Sliding-window logits ``(1, *S, K)`` of a preprocessed volume ``(1, *S, C)``."""
        e = self.config.eval
        return make_predictor(
            self.logits,
            state.variables(),
            roi_size=self.roi,
            overlap=float(e.overlap),
            sw_batch_size=int(e.sw_batch_size),
        )

    def test_cases(self):
        """The held-out full volumes as evaluator cases (preprocessed as for training)."""
        for item in self.data.test:
            image, label, ident, spacing = self.data.volume(item)
            yield {"image": image, "label": label, "id": ident, "spacing": spacing}

    def step_profile(self, state, *, repeats=1):
        """``{"step_s", "step_compile_s", "step_memory_mib", ...}`` of the compiled training step.

        The step is compiled as the engine compiles it (``compile_step`` on the default mesh, state
        donated, a batch of ``config.batch_size`` crops), so that the CLI's persistent compilation
        cache usually serves it; it runs on a copy of ``state``. Memory is XLA's buffer plan of it
        (``compiled.memory_analysis()``: arguments + outputs + temporaries, an upper bound of the
        peak as donation aliases the state); time is the fastest of ``repeats`` runs.
        """
        from medjax.train.mesh import make_mesh, shard_batch
        from medjax.train.steps import compile_step

        b = int(self.config.batch_size)
        mesh = make_mesh()
        batch = shard_batch(
            {
                "image": np.zeros((b, *self.crop, self.in_channels), np.float32),
                "label": np.zeros((b, *self.crop), np.int32),
            },
            mesh,
        )
        state = jax.tree.map(jnp.copy, state)
        t0 = time.perf_counter()
        compiled = compile_step(self.train_step, mesh, donate=True).lower(state, batch).compile()
        out = {"step_compile_s": time.perf_counter() - t0}
        ma = compiled.memory_analysis()
        if ma is not None:
            mib = 1 / 2**20
            out["step_temp_mib"] = ma.temp_size_in_bytes * mib
            out["step_argument_mib"] = ma.argument_size_in_bytes * mib
            out["step_output_mib"] = ma.output_size_in_bytes * mib
            out["step_memory_mib"] = (
                ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            ) * mib
        times = []
        for _ in range(max(1, int(repeats))):
            t1 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t1)
        out["step_s"] = min(times)
        return out

    def evaluate(self, state, workdir):
        """Per-class Dice / HD95 / ASSD on the held-out full volumes; writes figures.

        Returns ``mean_dice`` (over the foreground classes and test volumes), ``dice_<class>``,
        ``hd95_<class>``, ..., their ``*_std`` over volumes, ``per_case``, the parameter count,
        ``inference_s_per_volume`` and the training step's time and XLA memory plan.
        """
        workdir = pathlib.Path(workdir)
        fig_dir = workdir / "figures"
        names = [n.replace(" ", "_") for n in self.class_names]
        predict = self.predictor(state)
        shown = {}

        def on_case(i, case, pred, probs):
            if i == 0:
                shown.update(image=case["image"], truth=case["label"], pred=pred)

        t0 = time.perf_counter()
        res = evaluate_segmentation(
            self.test_cases(),
            predict,
            num_classes=self.num_classes,
            class_names=names,
            surface=bool(self.config.eval.surface),
            on_case=on_case,
        )
        results = {
            "model": self.name,
            "data": self.config.data,
            "classes": list(self.class_names),
            "crop": list(self.crop),
            "roi": list(self.roi),
            "parameters": int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params))),
            **{k: v for k, v in res.items() if k != "per_case"},
            "inference_s_per_volume": res["inference_s_per_case"],
            "eval_s": time.perf_counter() - t0,
            "step": int(state.step),
        }
        if self.config.eval.get("profile_step", True):
            results.update(self.step_profile(state))
        results["per_case"] = res["per_case"]
        if shown:
            try:
                self._figures(fig_dir, shown)
                results["figures"] = sorted(p.name for p in fig_dir.glob("*.png"))
            except Exception as err:  # a figure must never lose the metrics
                print(f"medicalzoo: figures failed: {type(err).__name__}: {err}")
        return results

    def _figures(self, fig_dir, shown):
        img, truth, pred = shown["image"], shown["truth"], shown["pred"]
        for axis, view in ((2, "axial"), (0, "sagittal")):
            F.segmentation_panels(
                fig_dir / f"segmentation_{view}.png",
                img,
                truth,
                {f"{self.name} prediction": pred, "errors": np.where(pred != truth, pred, 0)},
                axis=axis,
                num_classes=self.num_classes,
                title=f"{self.name}: held-out volume 0, {view}",
            )

    def report(self, results):
        """Markdown table: per-class Dice and HD95 (mean ± std over test volumes)."""
        names = [n.replace(" ", "_") for n in self.class_names[1:]]
        rows = [
            [
                n.replace("_", " "),
                mean_std(results.get(f"dice_{n}"), results.get(f"dice_{n}_std")),
                mean_std(results.get(f"hd95_{n}"), results.get(f"hd95_{n}_std"), 2),
            ]
            for n in names
        ]
        rows.append(
            [
                "mean",
                mean_std(results.get("mean_dice"), results.get("mean_dice_std")),
                mean_std(results.get("mean_hd95"), results.get("mean_hd95_std"), 2),
            ]
        )
        n = results.get("num_cases", 0)
        head = (
            f"{results.get('model')} on {n} held-out {results.get('data')} volume"
            f"{'s' if n != 1 else ''} (sliding window {results.get('roi')}), checkpoint step "
            f"{results.get('checkpoint_step', results.get('step'))}; mean ± std over volumes; "
            f"{results.get('parameters', 0):,} parameters"
        )
        unit = "voxels" if results.get("data") == "synthetic" else "mm"
        return "\n".join([head, "", markdown_table(["class", "Dice", f"HD95 ({unit})"], rows)])

    # ------------------------------------------------------------------ comparison

    def compare_table(self, rows):
        """One row per network: parameters, per-class and mean Dice, HD95, time, memory."""
        first = next(iter(rows.values()), {})
        names = [n.replace(" ", "_") for n in first.get("classes", self.class_names)[1:]]
        head = ["Network", "Params", "Crop", "Steps"] + [f"Dice {n}" for n in names]
        head += ["Mean Dice", "Mean HD95", "Train s/step", "Train total (s)", "Step memory (MiB)"]
        head += ["Inference s/volume"]
        body = []
        for r in rows.values():
            crop = "x".join(str(v) for v in r.get("crop", ())) or "-"
            cells = [
                r.get("label", r.get("row")),
                f"{r.get('parameters', 0):,}",
                crop,
                r.get("step"),
            ]
            cells += [mean_std(r.get(f"dice_{n}"), r.get(f"dice_{n}_std")) for n in names]
            cells.append(mean_std(r.get("mean_dice"), r.get("mean_dice_std")))
            cells.append(mean_std(r.get("mean_hd95"), r.get("mean_hd95_std"), 2))
            for key, fmt in (
                ("step_s", ".2f"),
                ("train_wall_s", ".0f"),
                ("step_memory_mib", ".0f"),
                ("inference_s_per_volume", ".2f"),
            ):
                v = r.get(key)
                cells.append(format(v, fmt) if isinstance(v, int | float) else "-")
            body.append(cells)
        return markdown_table(head, body)

    def compare_figures(self, rows, workdir):
        """compare_dice.png: per-class Dice of every network (mean ± std over test volumes)."""
        first = next(iter(rows.values()), {})
        names = [n.replace(" ", "_") for n in first.get("classes", self.class_names)[1:]]
        labels = [r.get("label", k).split(" (")[0] for k, r in rows.items()]
        series = {
            n: (
                [r.get(f"dice_{n}", np.nan) for r in rows.values()],
                [r.get(f"dice_{n}_std", np.nan) for r in rows.values()],
            )
            for n in names
        }
        path = pathlib.Path(workdir) / "figures" / "compare_dice.png"
        return [F.bar_chart(path, labels, series, ylabel="Dice (held-out volumes)", ylim=(0, 1))]

    # ------------------------------------------------------------------ prediction

    def predict(self, state, inputs, out_dir):
        """Label maps of NIfTI scans (any size) with each scan's affine: ``<name>_seg.nii.gz``.

        A scan is one file ``(*S, C)`` with the training channels in their order (a 4D NIfTI for
        several modalities; a 3D one for one). It is preprocessed as
        in training and segmented by sliding windows of the crop (volumes smaller than a window are
        padded and cropped back).
        """
        predict = self.predictor(state)
        c = self.in_channels

        def prepare(image):
            arr = np.asarray(image.array, np.float32)
            if arr.ndim != 4 or arr.shape[-1] != c:
                raise ValueError(
                    f"inputs: {image.path}: expected a 3D volume with {c} channel(s) "
                    f"({', '.join(self.modalities)}, the training data's), got array shape "
                    f"{arr.shape}"
                )
            return Prepared(preprocess(arr, self.config), lambda a, order=0: a)

        return predict_files(
            [pathlib.Path(p) for p in inputs],
            out_dir,
            predict=predict,
            preprocess=prepare,
            num_classes=self.num_classes,
            metadata={"model": self.name, "classes": list(self.class_names)},
        )
