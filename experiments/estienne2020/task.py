"""Estienne et al. 2020 joint registration + tumour segmentation: the medjax Experiment.

What is specific to the paper lives here: the pair construction, the five model kinds and the
near/far-tumour metrics. Statistics, reports, figures, the evaluator's per-class metrics and the
comparison sweep come from ``medjax.evaluation`` and ``medjax.train.compare``.

Data (``config.data``):

- ``synthetic``: :func:`medjax.data.synthetic.brain_phantom` subjects (4 BraTS-like modalities,
  8 anatomical labels, 3 tumour classes). Training pairs: subject i (a reshuffled permutation each
  epoch) is the moving image, a partner drawn per epoch from the same pool is the fixed one. Test and
  validation pairs come from held-out subjects.
- ``brats``: a BraTS 2018-2021/2023 folder (``medjax.data.datasets.brats_records``), split
  199/26/60 (scaled to the folder size), labels {0,1,2,4} -> {0,1,2,3}. BraTS has no anatomical
  labels: evaluation reports tumour Dice, image MSE and deformation quality.
- ``oasis``: a neurite-oasis folder (``OASIS_OAS1_*/aligned_norm.nii.gz`` with ``aligned_seg35`` or,
  when a folder has none, ``aligned_seg4`` labels), registration only (segmentation loss off, no mask).

Folder volumes are centre-cropped (or padded) to ``brats_crop`` / ``oasis_crop``; when the crop is
None (the quick variant), to the data's own size rounded up to what the network needs. Every volume
is then z-scored per modality (:func:`preprocess`, the same in training, evaluation and predict).
Test pairs are (subject 2k, subject 2k+1).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

import medjax.train
from medjax import figures as F
from medjax import metrics, ops, registration
from medjax.data import datasets, pipeline, synthetic, transforms
from medjax.data.io import load_image
from medjax.evaluation.segmentation import case_metrics
from medjax.evaluation.stats import summarize
from medjax.losses import joint_loss_terms, voxelmorph_loss_terms
from medjax.models.joint_regseg import JointRegSeg, SegmentationNet
from medjax.models.voxelmorph import VoxelMorph
from medjax.nn.blocks import fast_init
from medjax.train.optim import make_optimizer
from medjax.train.state import TrainState
from medjax.train.steps import supervised_step

KINDS = ("joint", "voxelmorph", "segonly", "identity", "optimise")
UNTRAINED = ("identity", "optimise")  # kinds evaluated without training
DATASETS = ("synthetic", "brats", "oasis")
TUMOUR_CLASSES = ("ncr", "ed", "et")


# ------------------------------------------------------------------------------------------ data


def subject_deformation(seed, shape, deform):
    """Smooth random displacement (*S, 3) in voxels of one synthetic subject (deterministic in seed).

    ``deform`` = (rotation deg, scale, translation voxels, elastic std voxels, elastic sigma voxels):
    a uniform random affine (about the centre) plus Gaussian-smoothed noise
    (:func:`medjax.data.transforms.elastic_displacement`). All zeros gives zero displacement.
    """
    rot, scale, shift, mag, sigma = (float(v) for v in deform)
    rng = np.random.default_rng([int(seed), 7919])
    angles = np.deg2rad(rng.uniform(-rot, rot, 3))
    factors = rng.uniform(1.0 - scale, 1.0 + scale, 3)
    rotation = transforms.rotation_matrices(angles[None], 3, xp=np)[0]
    matrix = (rotation * factors[None, :]).astype(np.float32)[None]
    translation = rng.uniform(-shift, shift, (1, 3)).astype(np.float32)
    disp = transforms.affine_displacement(matrix, translation, shape)
    if mag > 0:
        key = jax.random.key(int(rng.integers(2**31)))
        disp = disp + transforms.elastic_displacement(key, 1, shape, sigma=sigma, magnitude=mag)
    return np.asarray(disp)[0]


def preprocess(image, shape):
    """The one intensity/grid preprocessing: centre crop or pad to ``shape``, then z-score per modality.

    ``image``: ``(*S, M)``. Training, validation, evaluation and ``predict`` all use it.
    """
    return transforms.zscore(transforms.crop_or_pad(image, tuple(shape))).astype(np.float32)


@functools.lru_cache(maxsize=1024)
def _phantom(seed, shape, modalities, deform=(0.0, 0.0, 0.0, 0.0, 4.0)):
    s = synthetic.brain_phantom(seed, shape, modalities=modalities)
    image, anatomy, tumour = s["image"], s["anatomy"], s["tumour"]
    if any(float(v) for v in deform[:4]):
        disp = jnp.asarray(subject_deformation(seed, shape, deform)[None])
        image = np.asarray(ops.warp(jnp.asarray(image[None]), disp, order=1, padding="zeros"))[0]
        labels = jnp.asarray(np.stack([anatomy, tumour], -1)[None].astype(np.float32))
        labels = np.asarray(ops.warp(labels, disp, order=0, padding="zeros"))[0]
        anatomy, tumour = np.rint(labels[..., 0]), np.rint(labels[..., 1])
    return {
        "image": preprocess(image, shape),
        "anatomy": anatomy.astype(np.int32),
        "tumour": tumour.astype(np.int32),
    }


def size_factor(config):
    """Every spatial size must be a multiple of this for the configured model."""
    if config.model.kind == "voxelmorph":
        return 2 ** len(config.model.vxm_enc)
    return 2 ** (len(config.model.multipliers) - 1)


def check_shape(shape, factor, name):
    """``shape`` as a tuple, or ``ValueError`` naming the nearest valid one (multiples of ``factor``)."""
    shape = tuple(int(s) for s in shape)
    if any(s % factor for s in shape):
        nearest = tuple(max(factor, int(np.floor(s / factor + 0.5)) * factor) for s in shape)
        raise ValueError(
            f"{name}: expected sizes divisible by {factor} for this network, got {shape}; the "
            f"nearest valid crop is {nearest}"
        )
    return shape


def num_modalities(config):
    """Input channels of the configured data (without reading it)."""
    if config.data == "synthetic":
        n = int(config.synthetic.num_modalities)
        if n not in (1, 4):
            raise ValueError(f"config.synthetic.num_modalities: expected 1 or 4, got {n}")
        return n
    return 4 if config.data == "brats" else 1


class PairData:
    """Subjects and the pairs drawn from them: training pool, validation and test pairs.

    Subclasses define ``subject(item) -> {"image", "anatomy", "tumour"}`` and the item lists
    ``train``, ``val`` and ``test``.
    """

    train: list
    val: list
    test: list
    has_tumour: bool
    n_anatomy: int | None

    def subject(self, item):
        raise NotImplementedError

    def pair(self, m_item, f_item, with_anatomy):
        """The pair dict of two subjects: moving/fixed images and their labels."""
        m, f = self.subject(m_item), self.subject(f_item)
        out = {
            "moving": m["image"],
            "fixed": f["image"],
            "tumour_moving": m["tumour"],
            "tumour_fixed": f["tumour"],
        }
        if with_anatomy:
            out["anatomy_moving"] = m["anatomy"]
            out["anatomy_fixed"] = f["anatomy"]
        return out

    def train_source(self):
        """(source over moving subjects, transform drawing a different fixed partner per epoch)."""
        items = self.train

        def transform(rec, rng):
            i = int(rec["index"])
            j = int(rng.integers(len(items) - 1))
            j = j + 1 if j >= i else j  # a different subject
            return self.pair(items[i], items[j], False)

        source = pipeline.FunctionSource(len(items), lambda i: {"index": np.int64(i)})
        return source, transform

    def _pairs(self, items, with_anatomy):
        for k in range(len(items) // 2):
            yield self.pair(items[2 * k], items[2 * k + 1], with_anatomy)

    def val_pairs(self):
        """Iterator of validation pair dicts."""
        return self._pairs(self.val, False)

    def test_pairs(self):
        """Iterator of test pair dicts (with anatomy labels where the data has them)."""
        return self._pairs(self.test, self.n_anatomy is not None)

    @property
    def num_test_pairs(self):
        return len(self.test) // 2


class SyntheticData(PairData):
    """Synthetic phantom subjects (see the module docstring)."""

    has_tumour = True

    def __init__(self, config):
        s = config.synthetic
        self.shape = check_shape(s.shape, size_factor(config), "config.synthetic.shape")
        self.modalities = synthetic.MODALITIES if num_modalities(config) == 4 else ("t1",)
        self.n_anatomy = len(synthetic.ANATOMY_LABELS)
        self.anatomy_names = [synthetic.ANATOMY_LABELS[i] for i in range(1, self.n_anatomy)]
        base = int(s.seed)
        self.train = [base + i for i in range(int(s.num_train))]
        self.val = [base + 100_000 + i for i in range(4)]
        self.test = [base + 200_000 + i for i in range(2 * int(s.num_test_pairs))]
        self.deform = tuple(
            float(v) for v in (s.rotation, s.scale, s.translation, s.elastic, s.elastic_sigma)
        )

    def subject(self, item):
        """Normalised subject dict: image (*S, M), anatomy (*S), tumour (*S)."""
        return _phantom(int(item), self.shape, self.modalities, self.deform)


def _split_sizes(n, fractions, with_validation):
    """(train, val, test) subject counts: >= 2 test subjects and, with validation, >= 2 val ones."""
    fr = np.asarray(fractions, np.float64) / np.sum(fractions)
    n_test = max(2, int(round(fr[2] * n)))
    n_val = max(2, int(round(fr[1] * n))) if with_validation else 0
    return n - n_test - n_val, n_val, n_test


class FolderData(PairData):
    """BraTS or OASIS folder data (records loaded on demand, cropped, z-scored)."""

    def __init__(self, config, *, log=print):
        kind, root = config.data, config.data_dir
        if not root:
            raise ValueError(f"config.data_dir: expected a {kind} folder for data={kind!r}, got ''")
        if kind == "brats":
            records = datasets.brats_records(root)
            crop, name = config.brats_crop, "config.brats_crop"
            self.has_tumour, self.n_anatomy, self.n_modalities = True, None, 4
            fractions = config.brats_split
        else:
            seg = (
                "seg35"
                if any(pathlib.Path(root).glob("OASIS_OAS1_*/aligned_seg35.nii*"))
                else "seg4"
            )
            records = datasets.oasis_records(root, seg=seg)
            crop, name = config.oasis_crop, "config.oasis_crop"
            self.has_tumour, self.n_modalities = False, 1
            labelled = [r for r in records if r["label"] is not None]
            self.n_anatomy = len(records[0]["meta"]["label_map"]) if labelled else None
            log(
                f"estienne2020: OASIS labels from aligned_{seg} files ({len(labelled)} of {len(records)} subjects)"
            )
            fractions = (0.7, 0.1, 0.2)
        self.anatomy_names = [f"label {i}" for i in range(1, self.n_anatomy or 1)]
        n = len(records)
        with_val = bool(config.eval_every)
        if n < (6 if with_val else 4):
            raise ValueError(
                f"config.data_dir: expected at least {6 if with_val else 4} {kind} subjects "
                f"({'with' if with_val else 'without'} validation), got {n}"
            )
        sizes = _split_sizes(n, fractions, with_val)
        if sizes[0] < 2:
            raise ValueError(
                f"config.data_dir: {n} {kind} subjects leave {sizes[0]} for training after "
                f"{sizes[1]} validation and {sizes[2]} test subjects; expected >= 2"
            )
        self.train, self.val, self.test = datasets.split(
            records, tuple(s / n for s in sizes), seed=int(config.seed)
        )
        self.test = self.test[: 2 * int(config.max_test_pairs)]
        factor = size_factor(config)
        if crop is None:
            native = load_image(records[0]["image"][0]).spatial_shape
            crop = tuple(-(-int(s) // factor) * factor for s in native)
            log(
                f"estienne2020: {name} not set; using the data's size {native} rounded up to {crop}"
            )
        self.shape = check_shape(crop, factor, name)

    def subject(self, item):
        """Normalised subject dict from a record: image (*S, M), anatomy or tumour (*S)."""
        image, label, _ = datasets.load_record(item)
        if image.shape[-1] != self.n_modalities:
            raise ValueError(
                f"{item['id']}: expected {self.n_modalities} modalities, got {image.shape[-1]}"
            )
        lab = np.zeros(self.shape, np.int32)
        if label is not None:
            lab = transforms.crop_or_pad(label, self.shape).astype(np.int32)
        zeros = np.zeros(self.shape, np.int32)
        image = preprocess(image, self.shape)
        if self.has_tumour:
            return {"image": image, "tumour": lab, "anatomy": zeros}
        return {"image": image, "tumour": zeros, "anatomy": lab}


def make_data(config):
    """The data object of ``config.data`` (synthetic | brats | oasis)."""
    if config.data not in DATASETS:
        raise ValueError(f"config.data: expected one of {DATASETS}, got {config.data!r}")
    if config.data == "synthetic":
        return SyntheticData(config)
    return FolderData(config)


# ----------------------------------------------------------------------------------------- model


def build_model(config, n_modalities):
    """The flax module of ``config.model.kind`` (None for the untrained ``identity``/``optimise``)."""
    m = config.model
    if m.kind not in KINDS:
        raise ValueError(f"config.model.kind: expected one of {KINDS}, got {m.kind!r}")
    dtype = jnp.dtype(m.dtype)
    common = dict(
        f=int(m.f),
        multipliers=tuple(m.multipliers),
        enc_convs=tuple(m.enc_convs),
        dec_convs=tuple(m.dec_convs),
        n_modalities=n_modalities,
        n_classes=int(m.n_classes),
        dtype=dtype,
    )
    if m.kind == "joint":
        inits = {"identity": 1e-5, "original": None}
        if m.reg_init not in inits:
            raise ValueError(
                f"config.model.reg_init: expected one of {sorted(inits)}, got {m.reg_init!r}"
            )
        return JointRegSeg(
            **common,
            merge=m.merge,
            original_offset=bool(m.original_offset),
            phi_init_std=inits[m.reg_init],
            step_scale=float(m.step_scale),
        )
    if m.kind == "segonly":
        return SegmentationNet(**common)
    if m.kind == "voxelmorph":
        return VoxelMorph(
            enc_features=tuple(m.vxm_enc),
            dec_features=tuple(m.vxm_dec),
            n_modalities=n_modalities,
            field=m.vxm_field,
            int_steps=int(m.vxm_int_steps),
            dtype=dtype,
        )
    return None


def _class_names(n_classes):
    """Foreground class names: BraTS's NCR, ED, ET for 4 classes, else class1, class2, ..."""
    if n_classes == len(TUMOUR_CLASSES) + 1:
        return TUMOUR_CLASSES
    return tuple(f"class{c}" for c in range(1, n_classes))


def tumour_dice(probs, truth, n_classes):
    """``{"tumour_dice_<class>": ..., "tumour_dice_whole": ...}`` of one tumour segmentation."""
    pred = np.argmax(probs, axis=-1).astype(np.int32)
    m = case_metrics(
        pred, truth, num_classes=n_classes, class_names=_class_names(n_classes), surface=False
    )
    out = {f"tumour_{k}": v for k, v in m.items() if k.startswith("dice_")}
    whole = case_metrics(
        (pred > 0).astype(np.int32), (truth > 0).astype(np.int32), num_classes=2, surface=False
    )
    out["tumour_dice_whole"] = whole["mean_dice"]
    return out


class Experiment(medjax.train.Experiment):
    """Joint registration + segmentation (and its baselines) on synthetic, BraTS or OASIS data."""

    eval_metric = "val_loss"
    eval_mode = "min"
    #: the config fields a training step's memory grows with (named when a step cannot fit)
    memory_fields = ("batch_size", "synthetic.shape", "brats_crop", "oasis_crop", "model.f")

    def __init__(self, config):
        super().__init__(config)
        self.kind = config.model.kind
        self.n_modalities = num_modalities(config)
        self.model = build_model(config, self.n_modalities)
        self.has_tumour = config.data != "oasis"
        self.beta = float(config.loss.beta) if self.has_tumour else 0.0
        self.masked = bool(config.model.masked) and self.has_tumour
        if self.kind == "segonly" and not self.has_tumour:
            raise ValueError(
                f"config.model.kind: 'segonly' needs tumour labels, but data={config.data!r} has none"
            )
        self._step = supervised_step(self._loss_fn)
        self._forward_jit = jax.jit(self._forward)

    @property
    def needs_training(self):
        """False for the ``identity`` and ``optimise`` kinds (evaluated without a checkpoint)."""
        return self.kind not in UNTRAINED

    @functools.cached_property
    def data(self):
        """The data (built on first use: ``predict`` needs no training folder)."""
        return make_data(self.config)

    def prepare(self):
        """Before training: read the data (a bad folder or crop is the first line a user sees)."""
        _ = self.data

    # ---------------------------------------------------------------- training

    def init_state(self, rng):
        """TrainState of the model (a dummy scalar parameter for ``identity``/``optimise``).

        ``rng`` initialises the parameters; the steps draw from a key folded out of it, so the two
        never share a stream.
        """
        init_key = rng
        step_key = jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rng)), 1)
        )
        tx = make_optimizer(self.config.optimizer)
        if self.model is None:
            return TrainState.create(
                apply_fn=lambda *a, **k: None,
                params={"unused": jnp.zeros((), jnp.float32)},
                tx=tx,
                rng=step_key,
            )
        # The networks are fully convolutional: their parameters do not depend on the spatial
        # size, so they are initialised at the smallest valid one (the same values as at the data's
        # size; tests/experiments/test_estienne2020.py), and restoring a checkpoint for predict
        # needs no training data.
        shape = (size_factor(self.config),) * 3
        x = jnp.zeros((1, *shape, self.n_modalities), jnp.float32)
        args = (x,) if self.kind == "segonly" else (x, x)
        variables = fast_init(self.model, init_key, *args)
        params = variables.pop("params")
        return TrainState.create(
            apply_fn=self.model.apply,
            params=params,
            tx=tx,
            rng=step_key,
            model_state=dict(variables),
        )

    def _loss_terms(self, variables, batch):
        cfg = self.config
        if self.kind == "joint":
            out = self.model.apply(variables, batch["moving"], batch["fixed"])
            return joint_loss_terms(
                out,
                batch,
                masked=self.masked,
                alpha=float(cfg.loss.alpha),
                beta=self.beta,
                mask_normalize=cfg.loss.mask_normalize,
            )
        if self.kind == "voxelmorph":
            out = self.model.apply(variables, batch["moving"], batch["fixed"])
            return voxelmorph_loss_terms(
                out, batch, similarity=cfg.loss.vxm_similarity, lam=float(cfg.loss.vxm_lambda)
            )
        if self.kind == "segonly":
            from medjax.losses import cross_entropy

            x = jnp.concatenate([batch["moving"], batch["fixed"]], axis=0)
            y = jnp.concatenate([batch["tumour_moving"], batch["tumour_fixed"]], axis=0)
            ce = cross_entropy(self.model.apply(variables, x)["logits"], y)
            return {"loss": ce, "seg": ce}
        return {"loss": 0.0 * variables["params"]["unused"]}

    def _loss_fn(self, params, model_state, batch, rng, rest):
        del rng, rest
        terms = self._loss_terms({"params": params, **model_state}, batch)
        return terms["loss"], ({k: v for k, v in terms.items() if k != "loss"}, model_state)

    def train_step(self, state, batch):
        """One Adam step on the configured loss; metrics: loss and its terms."""
        return self._step(state, batch)

    def train_iterator(self):
        """Resumable iterator of pair batches (moving, fixed, tumour labels)."""
        source, transform = self.data.train_source()
        n_cls = int(self.config.model.n_classes)

        def checked(record, rng):
            # Cross-entropy inside the jitted step cannot raise: refuse out-of-range labels here.
            record = transform(record, rng)
            for key in ("tumour_moving", "tumour_fixed"):
                lo, hi = int(np.min(record[key])), int(np.max(record[key]))
                if lo < 0 or hi >= n_cls:
                    raise ValueError(
                        f"{key}: expected labels in [0, {n_cls}) (config.model.n_classes), "
                        f"got values in [{lo}, {hi}]"
                    )
            return record

        return pipeline.make_iterator(
            source,
            batch_size=int(self.config.batch_size),
            seed=int(self.config.seed),
            transform=checked,
            shuffle=True,
            prefetch_threads=1,
        )

    def validate(self, state):
        """Mean loss over the validation pairs: ``{"val_loss"}``."""
        losses = []
        for pair in self.data.val_pairs():
            batch = {k: jnp.asarray(v[None]) for k, v in pair.items()}
            losses.append(float(self._val_loss(state.variables(), batch)))
        if not losses:
            raise ValueError(
                f"validation: the {self.config.data} data has {len(self.data.val)} validation "
                "subject(s), so no validation pair; set --config.eval_every=0 or add subjects"
            )
        return {"val_loss": float(np.mean(losses))}

    @functools.cached_property
    def _val_loss(self):
        return jax.jit(lambda v, b: self._loss_terms(v, b)["loss"])

    # ---------------------------------------------------------------- inference

    def _forward(self, variables, moving, fixed):
        """displacement (B, *S, 3), warped (B, *S, M), optional seg probabilities (B, *S, K)."""
        zeros = jnp.zeros(moving.shape[:-1] + (3,), jnp.float32)
        if self.kind == "joint":
            out = self.model.apply(variables, moving, fixed)
            return {k: out[k] for k in ("displacement", "warped", "seg_moving", "seg_fixed", "phi")}
        if self.kind == "voxelmorph":
            out = self.model.apply(variables, moving, fixed)
            return {"displacement": out["displacement"], "warped": out["warped"]}
        if self.kind == "segonly":
            pm = self.model.apply(variables, moving)["probs"]
            pf = self.model.apply(variables, fixed)["probs"]
            return {"displacement": zeros, "warped": moving, "seg_moving": pm, "seg_fixed": pf}
        if self.kind == "optimise":
            o = self.config.optimise
            disp = registration.optimise_displacement(
                moving, fixed, steps=int(o.steps), lr=float(o.learning_rate), lam=float(o.lam)
            )
            return {"displacement": disp, "warped": ops.warp(moving, disp)}
        return {"displacement": zeros, "warped": moving}

    def forward(self, state, moving, fixed):
        """Host arrays of the model's outputs for one batch of pairs (B, *S, M)."""
        variables = {"params": {"unused": jnp.zeros((), jnp.float32)}}
        if self.model is not None:
            variables = state.variables()
        out = self._forward_jit(variables, jnp.asarray(moving), jnp.asarray(fixed))
        return {k: np.asarray(v) for k, v in out.items()}

    # ---------------------------------------------------------------- evaluation

    def pair_metrics(self, pair, out):
        """The paper's metrics of one registered pair: per-pair scalars (and the warped labels).

        :func:`medjax.registration.pair_metrics`, with the anatomical Dice also near the tumours
        (inside the union of both tumours dilated by ``near_band`` voxels) and far from them.
        """
        labels = regions = None
        if self.data.n_anatomy is not None and "anatomy_moving" in pair:
            labels = (pair["anatomy_moving"], pair["anatomy_fixed"])
            if self.data.has_tumour:
                band = int(self.config.near_band)
                tum = (pair["tumour_moving"] > 0) | (pair["tumour_fixed"] > 0)
                near = ndimage.binary_dilation(tum, iterations=band) if band else tum
                regions = {"near_tumour": near, "far_tumour": ~near}
        return registration.pair_metrics(
            pair["moving"],
            pair["fixed"],
            out["warped"][0],
            out["displacement"],
            labels=labels,
            num_labels=self.data.n_anatomy,
            regions=regions,
        )

    def refine(self, moving, fixed, displacement, steps=None):
        """Test-time refinement of a field (``config.eval``): ``(field, objective before, after)``."""
        e = self.config.eval
        steps = int(e.refine_steps) if steps is None else int(steps)
        u, before, after = registration.refine(
            jnp.asarray(moving),
            jnp.asarray(fixed),
            jnp.asarray(displacement),
            steps=steps,
            lr=float(e.refine_learning_rate),
            lam=float(e.refine_lam),
        )
        return np.asarray(u), float(before), float(after)

    def _refined_metrics(self, pair, out):
        """The pair's metrics after test-time refinement, named ``*_refined`` (empty when off)."""
        if int(self.config.eval.refine_steps) <= 0 or self.kind not in ("joint", "voxelmorph"):
            return {}
        moving, fixed = pair["moving"][None], pair["fixed"][None]
        t0 = time.perf_counter()
        u, before, after = self.refine(moving, fixed, out["displacement"])
        seconds = time.perf_counter() - t0
        warped = np.asarray(ops.warp(jnp.asarray(moving), jnp.asarray(u)))
        m, _ = self.pair_metrics(pair, {"displacement": u, "warped": warped})
        keep = (
            "anatomical_dice_after",
            "dice_near_tumour_after",
            "dice_far_tumour_after",
            "image_mse_after",
            "folding_percent",
            "jacobian_std",
        )
        out = {f"{k.removesuffix('_after')}_refined": m[k] for k in keep if k in m}
        out.update(refine_objective_before=before, refine_objective_after=after, refine_s=seconds)
        return out

    def evaluate(self, state, workdir):
        """Registration / segmentation / deformation metrics on the test pairs; writes figures.

        Returns means (and ``*_std``) over test pairs plus ``per_pair`` lists. ``state`` is None
        for the untrained kinds.
        """
        t0 = time.perf_counter()
        workdir = pathlib.Path(workdir)
        n_cls = int(self.config.model.n_classes)
        if self.config.data == "oasis" and self.data.n_anatomy is None:
            raise ValueError(
                f"evaluation: the OASIS folder {self.config.data_dir} has no aligned_seg35 or "
                "aligned_seg4 label files, so the registration cannot be evaluated"
            )
        per, infer_times = {}, []
        for idx, pair in enumerate(self.data.test_pairs()):
            ti = time.perf_counter()
            out = self.forward(state, pair["moving"][None], pair["fixed"][None])
            if idx > 0:
                infer_times.append(time.perf_counter() - ti)
            m, warped_lab = self.pair_metrics(pair, out)
            m.update(self._refined_metrics(pair, out))
            if "seg_moving" in out and self.data.has_tumour:
                segs = [
                    tumour_dice(out[f"seg_{s}"][0], pair[f"tumour_{s}"], n_cls)
                    for s in ("moving", "fixed")
                ]
                for s, d in zip(("moving", "fixed"), segs, strict=True):
                    per.setdefault(f"tumour_dice_whole_{s}", []).append(d["tumour_dice_whole"])
                for k in segs[0]:  # over both images of the pair
                    per.setdefault(k, []).extend(d[k] for d in segs)
            for k, v in m.items():
                per.setdefault(k, []).append(v)
            if idx == 0:
                try:
                    self._figures(workdir / "figures", pair, out, warped_lab)
                except Exception as e:  # figures must never lose the metrics
                    print(f"estienne2020: figures failed: {type(e).__name__}: {e}")
        results = {"kind": self.kind, "data": self.config.data, "num_test_pairs": 0}
        if per:
            results["num_test_pairs"] = len(per["image_mse_after"])
        results.update(summarize(per))
        results["inference_s_per_pair"] = (
            float(np.mean(infer_times)) if infer_times else float("nan")
        )
        results["eval_wall_s"] = time.perf_counter() - t0
        results["figures"] = sorted(p.name for p in (workdir / "figures").glob("*.png"))
        results["per_pair"] = per
        return results

    def report(self, results):
        """Markdown table of ``evaluate()``'s results: before (identity) and after warping."""
        n = results.get("num_test_pairs", 0)
        title = (
            f"{self.kind} model, {n} test pair{'s' if n != 1 else ''} ({results.get('data')} "
            f"data), checkpoint step {results.get('checkpoint_step', '?')}; mean ± std over pairs"
        )
        rows = (
            ("anatomical Dice", "anatomical_dice"),
            ("Dice near tumour", "dice_near_tumour"),
            ("Dice far from tumour", "dice_far_tumour"),
            ("image MSE", "image_mse"),
        )
        classes = (*_class_names(int(self.config.model.n_classes)), "whole")
        extra = [(f"tumour Dice {c.upper()}", f"tumour_dice_{c}") for c in classes]
        return registration.report(
            results,
            title=title,
            rows=rows,
            extra_rows=extra,
            refine_steps=int(self.config.eval.refine_steps),
        )

    # ---------------------------------------------------------------- comparison (medjax compare)

    compare_columns = [
        ("Anat. Dice", "anatomical_dice_after"),
        ("Dice near tumour", "dice_near_tumour_after"),
        ("Dice far from tumour", "dice_far_tumour_after"),
        ("Tumour Dice NCR", "tumour_dice_ncr"),
        ("Tumour Dice ED", "tumour_dice_ed"),
        ("Tumour Dice ET", "tumour_dice_et"),
        ("Tumour Dice whole", "tumour_dice_whole"),
        ("Image MSE", "image_mse_after", 4),
        ("% folding", "folding_percent", 2),
        ("Jacobian std", "jacobian_std"),
    ]

    def compare_table(self, rows):
        """The comparison table (:func:`medjax.registration.compare_table`)."""
        return registration.compare_table(rows, self.compare_columns)

    def compare_figures(self, rows, workdir):
        """compare_dice.png: anatomical Dice overall / near / far from the tumour per row."""
        names = [r.get("label", k) for k, r in rows.items()]
        series = {}
        for label, key in (
            ("overall", "anatomical_dice_after"),
            ("near tumour", "dice_near_tumour_after"),
            ("far from tumour", "dice_far_tumour_after"),
        ):
            means = [r.get(key, np.nan) for r in rows.values()]
            if np.any(np.isfinite(means)):
                series[label] = (means, [r.get(f"{key}_std", np.nan) for r in rows.values()])
        path = pathlib.Path(workdir) / "figures" / "compare_dice.png"
        return [
            F.bar_chart(path, names, series, ylabel="anatomical Dice after warping", ylim=(0, 1))
        ]

    def _figures(self, fig_dir, pair, out, warped_lab):
        fixed, moving, warped = pair["fixed"], pair["moving"], out["warped"][0]
        z = F.choose_slice(pair["tumour_fixed"], axis=2)
        ch = min(3, fixed.shape[-1] - 1)  # FLAIR when there are 4 modalities
        labels = (pair.get("anatomy_moving"), pair.get("anatomy_fixed"), warped_lab)
        F.registration_panels(
            fig_dir / "registration_pair0.png",
            moving,
            fixed,
            warped,
            labels=labels,
            index=z,
            axis=2,
            channel=ch,
            title=f"{self.kind}: axial slice z={z}",
        )
        det = np.asarray(metrics.jacobian_determinant(out["displacement"]))[0]
        F.deformation_panels(
            fig_dir / "deformation_pair0.png",
            out["displacement"][0],
            det,
            background=fixed,
            index=z,
            axis=2,
            channel=ch,
        )
        if "seg_moving" in out and self.data.has_tumour:
            for name in ("moving", "fixed"):
                pred = np.argmax(out[f"seg_{name}"][0], axis=-1)
                F.segmentation_panels(
                    fig_dir / f"tumour_{name}_pair0.png",
                    pair[name],
                    pair[f"tumour_{name}"],
                    {"prediction": pred},
                    axis=2,
                    channel=ch,
                    num_classes=4,
                    title=f"{name} image: tumour truth and prediction",
                )

    # ---------------------------------------------------------------- prediction

    def predict(self, state, inputs, out_dir, *, refine: int = 0):
        """Register a moving scan onto a fixed one: ``inputs = [moving, fixed]`` -> written NIfTI paths.

        Scans on different grids are first brought together in world space
        (:func:`medjax.registration.load_pair`); every output is on the fixed grid, with the fixed
        scan's affine and header: ``displacement.nii.gz`` (*S, 3, in the fixed grid's voxels),
        ``warped.nii.gz`` and, when the model segments, ``seg_moving``, ``seg_fixed`` and
        ``warped_seg``. Both images go through :func:`preprocess` at the fixed grid's size rounded
        up to the network's size multiple (as training does with a crop that follows the data);
        results are cropped back. ``refine`` > 0 refines the network's field for that many steps
        (:func:`medjax.registration.refine`, never worse on its objective); ``predict.json``
        records it.
        """
        inputs = [pathlib.Path(p) for p in inputs]
        if len(inputs) != 2:
            raise ValueError(f"inputs: expected [moving, fixed] (2 files), got {len(inputs)}")
        mov_img, fix_img, resampled = registration.load_pair(*inputs, channels=self.n_modalities)
        shape = fix_img.spatial_shape
        factor = size_factor(self.config)
        padded = tuple(-(-s // factor) * factor for s in shape)
        moving = preprocess(mov_img.array, padded)[None]
        fixed = preprocess(fix_img.array, padded)[None]
        out = self.forward(state, moving, fixed)
        info = {
            "moving": str(inputs[0]),
            "fixed": str(inputs[1]),
            "kind": self.kind,
            "moving_resampled_onto_fixed_grid": resampled,
            "grid": list(shape),
        }
        if refine:
            t0 = time.perf_counter()
            u, before, after = self.refine(moving, fixed, out["displacement"], steps=int(refine))
            out["displacement"] = u
            info.update(
                refine_steps=int(refine),
                refine_objective_before=before,
                refine_objective_after=after,
                refine_s=time.perf_counter() - t0,
            )
        lo = [(p - s) // 2 for p, s in zip(padded, shape, strict=True)]
        crop = tuple(slice(a, a + s) for a, s in zip(lo, shape, strict=True))
        disp = out["displacement"][0][crop]
        segs = {}
        if "seg_moving" in out:
            segs["seg_moving"] = np.argmax(out["seg_moving"][0][crop], -1).astype(np.int32)
            segs["seg_fixed"] = np.argmax(out["seg_fixed"][0][crop], -1).astype(np.int32)
            segs["warped_seg"] = np.asarray(
                ops.warp(segs["seg_moving"][None, ..., None], disp[None], order=0)
            )[0, ..., 0]
        written = registration.write_pair_outputs(out_dir, fix_img, mov_img, disp, segs)
        (pathlib.Path(out_dir) / "predict.json").write_text(json.dumps(info, indent=2) + "\n")
        return written
