"""Estienne et al. 2020 joint registration + tumour segmentation: the medjax Experiment.

Data (``config.data``):

- ``synthetic``: :func:`medjax.data.synthetic.brain_phantom` subjects (4 BraTS-like modalities,
  8 anatomical labels, 3 tumour classes). Training pairs: subject i (a reshuffled permutation each
  epoch) is the moving image, a partner drawn per epoch from the same pool is the fixed one. Test and
  validation pairs come from held-out subjects.
- ``brats``: a BraTS 2018-2021/2023 folder (``medjax.data.datasets.brats_records``), split
  199/26/60 (scaled to the folder size), centre crop ``brats_crop``, labels {0,1,2,4} -> {0,1,2,3}.
  BraTS has no anatomical labels: evaluation reports tumour Dice, image MSE and deformation quality.
- ``oasis``: a neurite-oasis folder (``OASIS_OAS1_*/aligned_{norm,seg35}.nii.gz``), registration
  only (segmentation loss off, no mask), centre crop ``oasis_crop``; evaluation reports
  ``anatomical_dice_before`` / ``anatomical_dice_after`` (means over test pairs and structures).

Every volume is z-scored per modality (whole volume). Test pairs are (subject 2k, subject 2k+1).
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
from medjax import metrics, ops
from medjax.data import datasets, pipeline, synthetic, transforms
from medjax.data.io import load_image, save_image
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


def _rotation(angles):
    """(3,) radians -> (3, 3): rotations about axes 0, 1, 2 in turn."""
    out = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[j, i], r[i, j] = np.sin(a), -np.sin(a)
        out = r @ out
    return out


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
    matrix = (_rotation(angles) * factors[None, :]).astype(np.float32)[None]
    translation = rng.uniform(-shift, shift, (1, 3)).astype(np.float32)
    disp = transforms.affine_displacement(matrix, translation, shape)
    if mag > 0:
        key = jax.random.key(int(rng.integers(2**31)))
        disp = disp + transforms.elastic_displacement(key, 1, shape, sigma=sigma, magnitude=mag)
    return np.asarray(disp)[0]


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
        "image": transforms.zscore(image).astype(np.float32),
        "anatomy": anatomy.astype(np.int32),
        "tumour": tumour.astype(np.int32),
    }


def _pair(m, f, with_anatomy):
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


class SyntheticData:
    """Synthetic phantom subjects: train pool, validation and test pairs (see module docstring)."""

    has_tumour = True

    def __init__(self, config):
        s = config.synthetic
        self.shape = tuple(int(v) for v in s.shape)
        if s.num_modalities not in (1, 4):
            raise ValueError(
                f"config.synthetic.num_modalities: expected 1 or 4, got {s.num_modalities}"
            )
        self.modalities = synthetic.MODALITIES if s.num_modalities == 4 else ("t1",)
        self.n_modalities = len(self.modalities)
        self.n_anatomy = len(synthetic.ANATOMY_LABELS)
        self.anatomy_names = [synthetic.ANATOMY_LABELS[i] for i in range(1, self.n_anatomy)]
        base = int(s.seed)
        self.train_seeds = [base + i for i in range(int(s.num_train))]
        self.val_seeds = [base + 100_000 + i for i in range(4)]
        self.test_seeds = [base + 200_000 + i for i in range(2 * int(s.num_test_pairs))]
        self.deform = (
            float(s.rotation),
            float(s.scale),
            float(s.translation),
            float(s.elastic),
            float(s.elastic_sigma),
        )

    def subject(self, seed):
        """Normalised subject dict: image (*S, M), anatomy (*S), tumour (*S)."""
        return _phantom(int(seed), self.shape, self.modalities, self.deform)

    def train_source(self):
        """(source over moving subjects, transform drawing the fixed partner per epoch)."""
        seeds = self.train_seeds

        def moving(i):
            return {"index": np.int64(i)}

        def transform(rec, rng):
            i = int(rec["index"])
            j = int(rng.integers(len(seeds) - 1))
            j = j + 1 if j >= i else j  # a different subject
            return _pair(self.subject(seeds[i]), self.subject(seeds[j]), False)

        return pipeline.FunctionSource(len(seeds), moving), transform

    def _pairs(self, seeds, with_anatomy=True):
        for k in range(len(seeds) // 2):
            yield _pair(self.subject(seeds[2 * k]), self.subject(seeds[2 * k + 1]), with_anatomy)

    def val_pairs(self):
        """Iterator of validation pair dicts."""
        return self._pairs(self.val_seeds, False)

    def test_pairs(self):
        """Iterator of test pair dicts (with anatomy labels)."""
        return self._pairs(self.test_seeds, True)

    @property
    def num_test_pairs(self):
        return len(self.test_seeds) // 2


class FolderData:
    """BraTS or OASIS folder data (records loaded on demand, centre-cropped, z-scored)."""

    def __init__(self, config):
        kind = config.data
        root = config.data_dir
        if not root:
            raise ValueError(f"config.data_dir: expected a {kind} folder for data={kind!r}, got ''")
        if kind == "brats":
            records = datasets.brats_records(root)
            self.shape = tuple(int(v) for v in config.brats_crop)
            self.has_tumour, self.n_anatomy, self.n_modalities = True, None, 4
            self.anatomy_names = []
            fr = np.asarray(config.brats_split, np.float64)
        else:
            records = datasets.oasis_records(root)
            self.shape = tuple(int(v) for v in config.oasis_crop)
            self.has_tumour, self.n_modalities = False, 1
            self.n_anatomy = len(records[0]["meta"]["label_map"])
            self.anatomy_names = [f"label {i}" for i in range(1, self.n_anatomy)]
            fr = np.asarray((0.7, 0.1, 0.2))
        n = len(records)
        if n < 4:
            raise ValueError(f"config.data_dir: expected at least 4 {kind} subjects, got {n}")
        n_test = max(2, int(round(fr[2] / fr.sum() * n)))
        n_val = max(1, int(round(fr[1] / fr.sum() * n))) if n >= 8 else 0
        n_train = n - n_test - n_val
        self.train, self.val, self.test = datasets.split(
            records, (n_train / n, n_val / n, n_test / n), seed=int(config.seed)
        )
        self.test = self.test[: 2 * int(config.max_test_pairs)]
        if len(self.train) < 2:
            raise ValueError(
                f"config.data_dir: expected >= 2 training subjects, got {len(self.train)}"
            )

    def subject(self, record):
        """Normalised subject dict from a record: image (*S, M), anatomy or tumour (*S)."""
        image, label, _ = datasets.load_record(record)
        if image.shape[-1] != self.n_modalities:
            raise ValueError(
                f"{record['id']}: expected {self.n_modalities} modalities, got {image.shape[-1]}"
            )
        image = transforms.zscore(transforms.crop_or_pad(image, self.shape)).astype(np.float32)
        lab = np.zeros(self.shape, np.int32)
        if label is not None:
            lab = transforms.crop_or_pad(label, self.shape).astype(np.int32)
        zeros = np.zeros(self.shape, np.int32)
        if self.has_tumour:
            return {"image": image, "tumour": lab, "anatomy": zeros}
        return {"image": image, "tumour": zeros, "anatomy": lab}

    def train_source(self):
        """(source over moving records, transform loading a random fixed partner)."""
        recs = self.train

        def moving(i):
            return {"index": np.int64(i)}

        def transform(rec, rng):
            i = int(rec["index"])
            j = int(rng.integers(len(recs) - 1))
            j = j + 1 if j >= i else j
            return _pair(self.subject(recs[i]), self.subject(recs[j]), False)

        return pipeline.FunctionSource(len(recs), moving), transform

    def _pairs(self, recs, with_anatomy):
        for k in range(len(recs) // 2):
            yield _pair(self.subject(recs[2 * k]), self.subject(recs[2 * k + 1]), with_anatomy)

    def val_pairs(self):
        """Iterator of validation pair dicts."""
        return self._pairs(self.val, False)

    def test_pairs(self):
        """Iterator of test pair dicts (anatomy labels where the dataset has them)."""
        return self._pairs(self.test, self.n_anatomy is not None)

    @property
    def num_test_pairs(self):
        return len(self.test) // 2


def optimise_pair(moving, fixed, *, steps, lr, lam):
    """Classical per-pair registration, the reference no network is trained for.

    Adam on a free displacement field (B, *S, 3), from zero, minimising
    ``mse(warp(moving, u), fixed) + lam * ||grad u||^2`` for ``steps`` iterations (jit-friendly).
    """
    import optax

    from medjax.losses import displacement_l2_gradient, mse

    tx = optax.adam(lr)

    def loss(u):
        return mse(ops.warp(moving, u), fixed) + lam * displacement_l2_gradient(u)

    def body(_, carry):
        u, opt = carry
        grads = jax.grad(loss)(u)
        updates, opt = tx.update(grads, opt, u)
        return optax.apply_updates(u, updates), opt

    u = jnp.zeros(moving.shape[:-1] + (moving.ndim - 2,), jnp.float32)
    u, _ = jax.lax.fori_loop(0, steps, body, (u, tx.init(u)))
    return u


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
        return JointRegSeg(**common, merge=m.merge, original_offset=bool(m.original_offset))
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


def _dice_mean(pred, target, num_classes, region=None):
    """Mean Dice over foreground structures present in the target (inside ``region`` if given)."""
    if region is not None:
        pred = np.where(region, pred, 0)
        target = np.where(region, target, 0)
    d = np.asarray(metrics.dice(pred[None], target[None], num_classes=num_classes))[0]
    return float(np.nanmean(d)) if np.any(np.isfinite(d)) else float("nan")


def paired_gain(before, after, *, resamples=10_000, seed=0):
    """Paired change ``after - before`` over test pairs: mean, 95 % bootstrap CI, pairs improved.

    The pairs differ far more from each other than a model changes them, so the paired change (not
    the two means and their spreads) says whether registration helped. Deterministic in ``seed``.
    Returns ``{"mean", "ci95": [lo, hi], "improved", "n"}``, or None for fewer than 2 pairs.
    """
    d = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, d.size, (resamples, d.size))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return {
        "mean": float(d.mean()),
        "ci95": [float(lo), float(hi)],
        "improved": int((d > 0).sum()),
        "n": int(d.size),
    }


def _class_names(n_classes):
    """Foreground class names: BraTS's NCR, ED, ET for 4 classes, else class1, class2, ..."""
    if n_classes == len(TUMOUR_CLASSES) + 1:
        return TUMOUR_CLASSES
    return tuple(f"class{c}" for c in range(1, n_classes))


def _stats(values):
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


class Experiment(medjax.train.Experiment):
    """Joint registration + segmentation (and its baselines) on synthetic, BraTS or OASIS data."""

    eval_metric = "val_loss"
    eval_mode = "min"

    def __init__(self, config):
        super().__init__(config)
        self.data = make_data(config)
        self.kind = config.model.kind
        self.model = build_model(config, self.data.n_modalities)
        self.beta = float(config.loss.beta) if self.data.has_tumour else 0.0
        self.masked = bool(config.model.masked) and self.data.has_tumour
        if self.kind == "segonly" and not self.data.has_tumour:
            raise ValueError(
                f"config.model.kind: 'segonly' needs tumour labels, but data={config.data!r} has none"
            )
        factor = 2 ** (len(config.model.multipliers) - 1)
        if self.kind == "voxelmorph":
            factor = 2 ** len(config.model.vxm_enc)
        if any(s % factor for s in self.data.shape):
            raise ValueError(
                f"volume shape: expected sizes divisible by {factor} for model {self.kind!r}, "
                f"got {self.data.shape}"
            )
        self._step = supervised_step(self._loss_fn)
        self._forward_jit = jax.jit(self._forward)

    # ---------------------------------------------------------------- training

    def init_state(self, rng):
        """TrainState of the model (a dummy scalar parameter for ``identity``)."""
        tx = make_optimizer(self.config.optimizer)
        if self.model is None:
            return TrainState.create(
                apply_fn=lambda *a, **k: None,
                params={"unused": jnp.zeros((), jnp.float32)},
                tx=tx,
                rng=rng,
            )
        x = jnp.zeros((1, *self.data.shape, self.data.n_modalities), jnp.float32)
        args = (x,) if self.kind == "segonly" else (x, x)
        params = fast_init(self.model, rng, *args)["params"]
        return TrainState.create(apply_fn=self.model.apply, params=params, tx=tx, rng=rng)

    def _loss_terms(self, params, batch):
        cfg = self.config
        if self.kind == "joint":
            out = self.model.apply({"params": params}, batch["moving"], batch["fixed"])
            return joint_loss_terms(
                out, batch, masked=self.masked, alpha=float(cfg.loss.alpha), beta=self.beta
            )
        if self.kind == "voxelmorph":
            out = self.model.apply({"params": params}, batch["moving"], batch["fixed"])
            return voxelmorph_loss_terms(
                out, batch, similarity=cfg.loss.vxm_similarity, lam=float(cfg.loss.vxm_lambda)
            )
        if self.kind == "segonly":
            from medjax.losses import cross_entropy

            x = jnp.concatenate([batch["moving"], batch["fixed"]], axis=0)
            y = jnp.concatenate([batch["tumour_moving"], batch["tumour_fixed"]], axis=0)
            ce = cross_entropy(self.model.apply({"params": params}, x)["logits"], y)
            return {"loss": ce, "seg": ce}
        zero = 0.0 * params["unused"]
        return {"loss": zero}

    def _loss_fn(self, params, model_state, batch, rng, rest):
        del rng, rest
        terms = self._loss_terms(params, batch)
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
            record = transform(record, rng) if transform is not None else record
            for key in ("tumour_moving", "tumour_fixed"):
                if key in record:
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
            losses.append(float(self._val_loss(state.params, batch)))
        return {"val_loss": float(np.mean(losses)) if losses else float("nan")}

    @functools.cached_property
    def _val_loss(self):
        return jax.jit(lambda p, b: self._loss_terms(p, b)["loss"])

    # ---------------------------------------------------------------- inference

    def _forward(self, params, moving, fixed):
        """displacement (B, *S, 3), warped (B, *S, M), optional seg probabilities (B, *S, K)."""
        zeros = jnp.zeros(moving.shape[:-1] + (3,), jnp.float32)
        if self.kind == "joint":
            out = self.model.apply({"params": params}, moving, fixed)
            return {k: out[k] for k in ("displacement", "warped", "seg_moving", "seg_fixed", "phi")}
        if self.kind == "voxelmorph":
            out = self.model.apply({"params": params}, moving, fixed)
            return {"displacement": out["displacement"], "warped": out["warped"]}
        if self.kind == "segonly":
            pm = self.model.apply({"params": params}, moving)["probs"]
            pf = self.model.apply({"params": params}, fixed)["probs"]
            return {"displacement": zeros, "warped": moving, "seg_moving": pm, "seg_fixed": pf}
        if self.kind == "optimise":
            o = self.config.optimise
            disp = optimise_pair(
                moving, fixed, steps=int(o.steps), lr=float(o.learning_rate), lam=float(o.lam)
            )
            return {"displacement": disp, "warped": ops.warp(moving, disp)}
        return {"displacement": zeros, "warped": moving}

    def forward(self, state, moving, fixed):
        """Host arrays of the model's outputs for one batch of pairs (B, *S, M)."""
        params = None if state is None else state.params
        if self.model is None:
            params = {"unused": jnp.zeros((), jnp.float32)}
        out = self._forward_jit(params, jnp.asarray(moving), jnp.asarray(fixed))
        return {k: np.asarray(v) for k, v in out.items()}

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, state, workdir):
        """Registration / segmentation / deformation metrics on the test pairs; writes figures.

        Returns means (and ``*_std``) over test pairs plus ``per_pair`` lists. ``state`` may be None
        for the ``identity`` kind.
        """
        t0 = time.perf_counter()
        workdir = pathlib.Path(workdir)
        fig_dir = workdir / "figures"
        nan = float("nan")
        per = {}

        def add(key, value):
            per.setdefault(key, []).append(float(value))

        n_anat = self.data.n_anatomy
        n_cls = int(self.config.model.n_classes)
        band = int(self.config.near_band)
        infer_times = []
        for idx, pair in enumerate(self.data.test_pairs()):
            ti = time.perf_counter()
            out = self.forward(state, pair["moving"][None], pair["fixed"][None])
            if idx > 0:
                infer_times.append(time.perf_counter() - ti)
            disp = out["displacement"]
            fixed, moving = pair["fixed"], pair["moving"]
            add("image_mse_before", np.mean((moving - fixed) ** 2))
            add("image_mse_after", np.mean((out["warped"][0] - fixed) ** 2))
            det = np.asarray(metrics.jacobian_determinant(disp))[0]
            add("folding_percent", 100.0 * np.mean(det <= 0))
            add("jacobian_std", np.std(det))
            add("displacement_mean_abs", np.mean(np.abs(disp)))
            warped_lab = None
            if n_anat is not None and "anatomy_moving" in pair:
                am, af = pair["anatomy_moving"], pair["anatomy_fixed"]
                warped_lab = np.asarray(
                    ops.warp(am[None, ..., None], disp, order=0, padding="border")
                )[0, ..., 0]
                add("anatomical_dice_before", _dice_mean(am, af, n_anat))
                add("anatomical_dice_after", _dice_mean(warped_lab, af, n_anat))
                if self.data.has_tumour:
                    tum = (pair["tumour_moving"] > 0) | (pair["tumour_fixed"] > 0)
                    near = ndimage.binary_dilation(tum, iterations=band) if band else tum
                    far = ~near
                    add("dice_near_tumour_before", _dice_mean(am, af, n_anat, near))
                    add("dice_near_tumour_after", _dice_mean(warped_lab, af, n_anat, near))
                    add("dice_far_tumour_before", _dice_mean(am, af, n_anat, far))
                    add("dice_far_tumour_after", _dice_mean(warped_lab, af, n_anat, far))
            if "seg_moving" in out and self.data.has_tumour:
                for name, probs, truth in (
                    ("moving", out["seg_moving"][0], pair["tumour_moving"]),
                    ("fixed", out["seg_fixed"][0], pair["tumour_fixed"]),
                ):
                    pred = np.argmax(probs, axis=-1).astype(np.int32)
                    d = np.asarray(metrics.dice(pred[None], truth[None], num_classes=n_cls))[0]
                    for c, cname in enumerate(_class_names(n_cls)):
                        add(f"tumour_dice_{cname}", d[c])
                    whole = np.asarray(
                        metrics.dice(
                            (pred > 0)[None].astype(np.int32),
                            (truth > 0)[None].astype(np.int32),
                            num_classes=2,
                        )
                    )[0, 0]
                    add("tumour_dice_whole", whole)
                    add(f"tumour_dice_whole_{name}", whole)
            if idx == 0:
                try:
                    self._figures(fig_dir, pair, out, warped_lab)
                except Exception as e:  # figures must never lose the metrics
                    print(f"estienne2020: figures failed: {type(e).__name__}: {e}")
        results = {"kind": self.kind, "data": self.config.data, "num_test_pairs": 0}
        if per:
            results["num_test_pairs"] = len(next(iter(per.values())))
        for k, v in per.items():
            results[k], results[f"{k}_std"] = _stats(v)
        results["inference_s_per_pair"] = float(np.mean(infer_times)) if infer_times else nan
        results["eval_wall_s"] = time.perf_counter() - t0
        results["figures"] = sorted(str(p.name) for p in fig_dir.glob("*.png"))
        results["per_pair"] = per
        return results

    def report(self, results):
        """Markdown table of ``evaluate()``'s results: before (identity) and after warping."""

        def cell(key):
            mean, std = results.get(key), results.get(f"{key}_std")
            if not isinstance(mean, int | float) or not np.isfinite(mean):
                return "-"
            return f"{mean:.3f} ± {std:.3f}" if isinstance(std, float) else f"{mean:.3f}"

        rows = [
            ("anatomical Dice", "anatomical_dice"),
            ("Dice near tumour", "dice_near_tumour"),
            ("Dice far from tumour", "dice_far_tumour"),
            ("image MSE", "image_mse"),
        ]
        lines = [
            f"{self.kind} model, {results.get('num_test_pairs', 0)} test pairs ({results.get('data')} "
            f"data), checkpoint step {results.get('checkpoint_step', '?')}; mean ± std over pairs",
            "",
            "| metric | before (identity) | after |",
            "|---|---|---|",
        ]
        for label, key in rows:
            if f"{key}_after" in results:
                lines.append(f"| {label} | {cell(key + '_before')} | {cell(key + '_after')} |")
        for label, key in (
            ("% folding voxels", "folding_percent"),
            ("Jacobian std", "jacobian_std"),
        ):
            lines.append(f"| {label} | 0.000 | {cell(key)} |")
        for c in (*_class_names(int(self.config.model.n_classes)), "whole"):
            if f"tumour_dice_{c}" in results:
                lines.append(f"| tumour Dice {c.upper()} | - | {cell(f'tumour_dice_{c}')} |")
        per = results.get("per_pair", {})
        gain = paired_gain(
            per.get("anatomical_dice_before", []), per.get("anatomical_dice_after", [])
        )
        if gain is not None:
            lo, hi = gain["ci95"]
            lines += [
                "",
                f"anatomical Dice after - before, paired over test pairs: {gain['mean']:+.3f} "
                f"(95 % bootstrap CI {lo:+.3f} to {hi:+.3f}); it improves on {gain['improved']} "
                f"of {gain['n']} pairs",
            ]
        return "\n".join(lines)

    def _figures(self, fig_dir, pair, out, warped_lab):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig_dir.mkdir(parents=True, exist_ok=True)
        fixed, moving, warped = pair["fixed"], pair["moving"], out["warped"][0]
        tf = pair["tumour_fixed"]
        z = int(np.argmax((tf > 0).sum(axis=(0, 1)))) if tf.any() else fixed.shape[2] // 2
        ch = min(3, fixed.shape[-1] - 1)  # FLAIR when there are 4 modalities

        def show(ax, img, title, lab=None):
            ax.imshow(img[:, :, z, ch].T, cmap="gray", origin="lower")
            if lab is not None and np.any(lab):
                ax.contour(
                    lab[:, :, z].T,
                    levels=np.arange(0.5, lab.max() + 1),
                    linewidths=0.6,
                    cmap="tab10",
                    origin="lower",
                )
            ax.set_title(title, fontsize=8)
            ax.axis("off")

        # 1. moving / fixed / warped with anatomical label contours, and the differences
        fig, axes = plt.subplots(1, 5, figsize=(14, 3.2))
        am = pair.get("anatomy_moving")
        af = pair.get("anatomy_fixed")
        show(axes[0], moving, "moving S (moving labels)", am)
        show(axes[1], fixed, "fixed R (fixed labels)", af)
        show(axes[2], warped[..., :], "warped D (warped labels)", warped_lab)
        vmax = float(np.abs(moving - fixed)[:, :, z, ch].max()) or 1.0
        for ax, d, t in (
            (axes[3], moving - fixed, "|S - R| before"),
            (axes[4], warped - fixed, "|D - R| after"),
        ):
            ax.imshow(np.abs(d[:, :, z, ch]).T, cmap="magma", vmin=0, vmax=vmax, origin="lower")
            ax.set_title(t, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{self.kind}: axial slice z={z}", fontsize=9)
        fig.tight_layout()
        fig.savefig(fig_dir / "registration_pair0.png", dpi=110)
        plt.close(fig)

        # 2. deformation grid (in-plane components) and Jacobian determinant
        disp = out["displacement"][0]
        det = np.asarray(metrics.jacobian_determinant(out["displacement"]))[0]
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        nx, ny = disp.shape[0], disp.shape[1]
        gx, gy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
        px, py = gx + disp[:, :, z, 0], gy + disp[:, :, z, 1]
        step = max(1, nx // 24)
        ax = axes[0]
        ax.imshow(fixed[:, :, z, ch].T, cmap="gray", origin="lower", alpha=0.5)
        for i in range(0, nx, step):
            ax.plot(px[i, :], py[i, :], "r-", lw=0.5)
        for j in range(0, ny, step):
            ax.plot(px[:, j], py[:, j], "r-", lw=0.5)
        ax.set_title("sampling grid x + u(x) (in-plane)", fontsize=8)
        ax.axis("off")
        im = axes[1].imshow(det[:, :, z].T, cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
        axes[1].set_title(
            f"Jacobian determinant (fold <= 0: {100 * np.mean(det <= 0):.2f}%)", fontsize=8
        )
        axes[1].axis("off")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        fig.tight_layout()
        fig.savefig(fig_dir / "deformation_pair0.png", dpi=110)
        plt.close(fig)

        # 3. tumour predictions vs truth
        if "seg_moving" in out and self.data.has_tumour:
            fig, axes = plt.subplots(2, 3, figsize=(9, 6))
            for r, (name, img, probs, truth) in enumerate(
                (
                    ("moving", moving, out["seg_moving"][0], pair["tumour_moving"]),
                    ("fixed", fixed, out["seg_fixed"][0], tf),
                )
            ):
                zz = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else z
                pred = np.argmax(probs, axis=-1)
                axes[r, 0].imshow(img[:, :, zz, ch].T, cmap="gray", origin="lower")
                axes[r, 0].set_title(f"{name} image", fontsize=8)
                for c, (lab, t) in enumerate(((truth, "truth"), (pred, "prediction")), start=1):
                    axes[r, c].imshow(img[:, :, zz, ch].T, cmap="gray", origin="lower")
                    axes[r, c].imshow(
                        np.ma.masked_equal(lab[:, :, zz], 0).T,
                        cmap="jet",
                        vmin=0,
                        vmax=3,
                        alpha=0.6,
                        origin="lower",
                    )
                    axes[r, c].set_title(f"{name} tumour {t}", fontsize=8)
                for a in axes[r]:
                    a.axis("off")
            fig.tight_layout()
            fig.savefig(fig_dir / "tumour_pair0.png", dpi=110)
            plt.close(fig)

    # ---------------------------------------------------------------- prediction

    def predict(self, state, inputs, out_dir):
        """Register a moving/fixed NIfTI pair: ``inputs = [moving, fixed]`` -> written NIfTI paths.

        Writes ``displacement.nii.gz`` (*S, 3) voxels and ``warped.nii.gz`` (*S, M) on the fixed
        grid (fixed affine), ``seg_moving.nii.gz`` (moving affine), ``seg_fixed.nii.gz`` and
        ``warped_seg.nii.gz`` (fixed affine) when the model segments. Images are z-scored per
        modality and padded to the network's size multiple (results are cropped back).
        """
        inputs = [pathlib.Path(p) for p in inputs]
        if len(inputs) != 2:
            raise ValueError(f"inputs: expected [moving, fixed] (2 files), got {len(inputs)}")
        mov_img, fix_img = load_image(inputs[0]), load_image(inputs[1])
        n_mod = self.data.n_modalities
        for name, im in (("moving", mov_img), ("fixed", fix_img)):
            if im.array.ndim != 4 or im.array.shape[-1] != n_mod:
                raise ValueError(
                    f"inputs ({name}): expected a 3D volume with {n_mod} channel(s), "
                    f"got array shape {im.array.shape}"
                )
        if mov_img.spatial_shape != fix_img.spatial_shape:
            raise ValueError(
                f"inputs (fixed): expected the moving image's spatial shape "
                f"{mov_img.spatial_shape}, got {fix_img.spatial_shape}"
            )
        shape = mov_img.spatial_shape
        factor = 2 ** (len(self.config.model.multipliers) - 1)
        if self.kind == "voxelmorph":
            factor = 2 ** len(self.config.model.vxm_enc)
        padded = tuple(-(-s // factor) * factor for s in shape)

        def prep(im):
            x = transforms.zscore(im.array).astype(np.float32)
            pad = [(0, p - s) for p, s in zip(padded, shape, strict=True)] + [(0, 0)]
            return np.pad(x, pad, mode="edge")[None]

        moving, fixed = prep(mov_img), prep(fix_img)
        out = self.forward(state, moving, fixed)
        crop = tuple(slice(0, s) for s in shape)
        disp = out["displacement"][0][crop]
        # Re-warp the unpadded moving image (in its original intensities) with the cropped field.
        warped = np.asarray(ops.warp(mov_img.array[None], disp[None], order=1, padding="border"))[0]
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [
            save_image(out_dir / "displacement.nii.gz", disp, like=fix_img),
            save_image(out_dir / "warped.nii.gz", warped, like=fix_img),
        ]
        if "seg_moving" in out:
            seg_m = np.argmax(out["seg_moving"][0][crop], -1).astype(np.int32)
            seg_f = np.argmax(out["seg_fixed"][0][crop], -1).astype(np.int32)
            wseg = np.asarray(
                ops.warp(seg_m[None, ..., None], disp[None], order=0, padding="border")
            )[0, ..., 0]
            written += [
                save_image(out_dir / "seg_moving.nii.gz", seg_m, like=mov_img),
                save_image(out_dir / "seg_fixed.nii.gz", seg_f, like=fix_img),
                save_image(out_dir / "warped_seg.nii.gz", wseg, like=fix_img),
            ]
        (out_dir / "predict.json").write_text(
            json.dumps({"moving": str(inputs[0]), "fixed": str(inputs[1]), "kind": self.kind})
        )
        return [pathlib.Path(p) for p in written]
