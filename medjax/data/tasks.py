"""In-context segmentation tasks (UniverSeg): synthetic task families, task augmentation, folders.

A *task* is a binary 2D segmentation problem; an *episode* is a query (image, label) and a support
set of ``S`` (image, label) pairs of the same task. Images are ``(..., H, W, 1)`` float32 in [0, 1],
labels ``(..., H, W, 1)`` float32 in {0, 1}.

* Synthetic tasks stand in for MegaMedical. A *generator* (one seed) fixes a family (label-map
  shape kind x intensity style) and its appearance parameters (per-label intensity, texture, blur,
  bias field, noise); every subject it draws is a new random label map rendered with that
  appearance. Each (generator, label value) pair is one binary task. The held-out families use
  shape kinds and intensity styles never used in training (:data:`HELDOUT_SHAPES`,
  :data:`HELDOUT_STYLES`). Generation is host-side NumPy with an explicit ``numpy.random.Generator``.
* Augmentation is batched JAX with explicit keys: :func:`in_task_augment` draws independently for
  every image (query and each support element); :func:`task_augment` draws once per task and applies
  the same change to all images and labels of that task (flips, rot90, label -> Sobel boundary,
  intensity inversion), which makes a new task.
* :func:`folder_tasks` turns NIfTI image/label pairs into tasks (2D, or 3D sliced along axes; resized
  to ``size``^2, min-max scaled, one binary task per label value); :func:`support_set` draws a
  support set from a task.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medjax.data import transforms
from medjax.ops import resize

__all__ = [
    "TRAIN_SHAPES",
    "TRAIN_STYLES",
    "HELDOUT_SHAPES",
    "HELDOUT_STYLES",
    "SyntheticTask",
    "TaskData",
    "make_generator",
    "render_subject",
    "synthetic_tasks",
    "sample_task",
    "sample_episode",
    "in_task_augment",
    "task_augment",
    "sobel_boundary",
    "sharpen",
    "folder_tasks",
    "support_set",
]

TRAIN_SHAPES = ("blobs", "ellipses", "rectangles")
TRAIN_STYLES = ("flat", "texture")
HELDOUT_SHAPES = ("stars", "rings")
HELDOUT_STYLES = ("stripes", "speckle")

_MIN_FRACTION = 0.005  # a task's label must cover at least this fraction of the image


# ------------------------------------------------------------------------------------------------
# synthetic generators (host-side NumPy)


def make_generator(seed, *, split="train", num_labels=None):
    """Appearance/shape parameters (a dict) of one task generator, fixed by ``seed``.

    ``split="train"`` draws the family from :data:`TRAIN_SHAPES` x :data:`TRAIN_STYLES`,
    ``"heldout"`` from :data:`HELDOUT_SHAPES` x :data:`HELDOUT_STYLES`.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    salt = 0 if split == "train" else 1
    rng = np.random.default_rng([int(seed), salt, 7])
    shapes, styles = (
        (TRAIN_SHAPES, TRAIN_STYLES) if split == "train" else (HELDOUT_SHAPES, HELDOUT_STYLES)
    )
    k = int(rng.integers(2, 5)) if num_labels is None else int(num_labels)
    if k < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    means = rng.permutation(np.linspace(0.05, 0.95, k + 1) + rng.uniform(-0.04, 0.04, k + 1))
    return {
        "seed": int(seed),
        "split": split,
        "shape": str(shapes[rng.integers(len(shapes))]),
        "style": str(styles[rng.integers(len(styles))]),
        "num_labels": k,
        "means": means,  # (K + 1,) background first
        "tex_amp": rng.uniform(0.03, 0.15, k + 1),
        "tex_sigma": rng.uniform(0.5, 3.0, k + 1),  # texture scale, pixels at 64^2
        "tex_freq": rng.uniform(0.05, 0.25, k + 1),  # stripes, cycles / pixel at 64^2
        "tex_angle": rng.uniform(0, np.pi, k + 1),
        "smooth": rng.uniform(1 / 14, 1 / 7),  # blob scale, fraction of the size
        "radius": np.sort(rng.uniform(0.08, 0.3, 2)),  # object radius range, fraction of size
        "blur": rng.uniform(0.0, 1.2),
        "bias": rng.uniform(0.0, 0.3),
        "noise": rng.uniform(0.01, 0.06),
    }


def _coords(size):
    y, x = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    return y.astype(np.float64), x.astype(np.float64)


def _label_map(gen, rng, size):
    """Integer label map (H, W) in [0, K] for one subject of ``gen``."""
    h, w = size
    k = gen["num_labels"]
    n = min(h, w)
    if gen["shape"] == "blobs":
        fields = rng.standard_normal((k + 1, h, w))
        fields = ndimage.gaussian_filter(fields, (0, gen["smooth"] * n, gen["smooth"] * n))
        fields[0] += 0.02  # slightly favour background on ties
        return np.argmax(fields, axis=0).astype(np.int32)
    y, x = _coords(size)
    out = np.zeros(size, np.int32)
    lo, hi = gen["radius"]
    for label in rng.permutation(np.arange(1, k + 1)):
        cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
        r = rng.uniform(lo, hi) * n
        a = rng.uniform(0, np.pi)
        dy, dx = y - cy, x - cx
        u = dx * np.cos(a) + dy * np.sin(a)
        v = -dx * np.sin(a) + dy * np.cos(a)
        if gen["shape"] == "ellipses":
            ratio = rng.uniform(0.4, 1.0)
            mask = (u / r) ** 2 + (v / (r * ratio)) ** 2 <= 1
        elif gen["shape"] == "rectangles":
            ratio = rng.uniform(0.3, 1.0)
            mask = (np.abs(u) <= r) & (np.abs(v) <= r * ratio)
        elif gen["shape"] == "stars":
            spikes, depth = rng.integers(3, 8), rng.uniform(0.25, 0.5)
            theta = np.arctan2(v, u)
            mask = np.hypot(u, v) <= r * (1 + depth * np.cos(spikes * theta)) / (1 + depth)
        elif gen["shape"] == "rings":
            rad = np.hypot(u, v * rng.uniform(1.0, 1.4))
            mask = (rad <= r) & (rad >= r * rng.uniform(0.45, 0.7))
        else:
            raise ValueError(f"unknown shape kind {gen['shape']!r}")
        out[mask] = label
    return out


def render_subject(gen, rng, size=(64, 64)):
    """One subject of generator ``gen``: image (H, W) float32 in [0, 1], label map (H, W) int32."""
    size = tuple(int(s) for s in size)
    labels = _label_map(gen, rng, size)
    scale = min(size) / 64.0
    k = gen["num_labels"]
    means = gen["means"] + rng.uniform(-0.04, 0.04, k + 1)  # small per-subject jitter
    img = means[labels]
    style = gen["style"]
    if style == "texture":
        for c in range(k + 1):
            tex = ndimage.gaussian_filter(rng.standard_normal(size), gen["tex_sigma"][c] * scale)
            tex /= tex.std() + 1e-8
            img = img + (labels == c) * gen["tex_amp"][c] * tex
    elif style == "stripes":
        y, x = _coords(size)
        for c in range(k + 1):
            a, f = gen["tex_angle"][c], gen["tex_freq"][c] / scale
            wave = np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)) + rng.uniform(0, 6.3))
            img = img + (labels == c) * 1.5 * gen["tex_amp"][c] * wave
    elif style == "speckle":
        looks = 4.0
        img = img * rng.gamma(looks, 1.0 / looks, size)
        img = ndimage.gaussian_filter(img, 0.6 * scale)
    elif style != "flat":
        raise ValueError(f"unknown intensity style {style!r}")
    if gen["blur"] > 0:
        img = ndimage.gaussian_filter(img, gen["blur"] * scale)
    y, x = (c / max(s - 1, 1) * 2 - 1 for c, s in zip(_coords(size), size, strict=True))
    coef = rng.standard_normal(5) / np.sqrt(5)  # smooth quadratic bias field
    bias = coef[0] * y + coef[1] * x + coef[2] * y * y + coef[3] * x * y + coef[4] * x * x
    img = img * np.exp(gen["bias"] * bias)
    img = img + gen["noise"] * rng.standard_normal(size)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-8)
    return img.astype(np.float32), labels


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One binary task: foreground = label value ``label`` of generator ``gen["seed"]``."""

    gen: dict = dataclasses.field(hash=False, compare=False, repr=False)
    label: int
    seed: int
    split: str
    family: tuple[str, str]

    def sample(self, rng, n, size=(64, 64)):
        """``n`` subjects: images ``(n, H, W, 1)`` in [0, 1], binary labels ``(n, H, W, 1)``."""
        images, labels = [], []
        for _ in range(int(n)):
            for _attempt in range(20):  # redraw subjects whose label is (almost) absent
                img, lab = render_subject(self.gen, rng, size)
                fg = lab == self.label
                if fg.mean() >= _MIN_FRACTION:
                    break
            images.append(img)
            labels.append(fg.astype(np.float32))
        return np.stack(images)[..., None], np.stack(labels)[..., None]


def synthetic_tasks(num_generators, *, split="train", seed=0, num_labels=None):
    """All binary tasks of ``num_generators`` generators -> list of :class:`SyntheticTask`."""
    if num_generators < 1:
        raise ValueError(f"num_generators must be >= 1, got {num_generators}")
    tasks = []
    for g in range(int(num_generators)):
        gen = make_generator(int(seed) * 100_003 + g, split=split, num_labels=num_labels)
        for label in range(1, gen["num_labels"] + 1):
            tasks.append(
                SyntheticTask(gen, label, gen["seed"], split, (gen["shape"], gen["style"]))
            )
    return tasks


def sample_task(tasks, rng):
    """One task drawn uniformly from ``tasks``."""
    if not tasks:
        raise ValueError("tasks must not be empty")
    return tasks[int(rng.integers(len(tasks)))]


def sample_episode(tasks, rng, *, support_size, size=(64, 64)):
    """One episode of a uniformly drawn task (per-item task sampling).

    Returns a dict: ``query`` / ``query_label`` ``(H, W, 1)``, ``support_images`` /
    ``support_labels`` ``(S, H, W, 1)``, and ``task`` (int index into ``tasks``).
    """
    if support_size < 1:
        raise ValueError(f"support_size must be >= 1, got {support_size}")
    idx = int(rng.integers(len(tasks)))
    images, labels = tasks[idx].sample(rng, support_size + 1, size)
    return {
        "query": images[0],
        "query_label": labels[0],
        "support_images": images[1:],
        "support_labels": labels[1:],
        "task": np.int32(idx),
    }


# ------------------------------------------------------------------------------------------------
# augmentation (JAX, batched, explicit keys)


def _check_pairs(images, labels, name="images"):
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"{name} must have shape (N, H, W, 1), got {images.shape}")
    if labels.shape != images.shape:
        raise ValueError(f"labels must have shape {images.shape} like {name}, got {labels.shape}")
    return images, labels


def sharpen(key, images, *, amount=(0.0, 1.0), sigma=1.0):
    """Unsharp masking ``x + a (x - blur(x))`` with ``a ~ U(amount)`` per image: (N, H, W, C)."""
    lo, hi = amount
    a = jax.random.uniform(key, (images.shape[0], 1, 1, 1), minval=lo, maxval=hi)
    return images + a * (images - transforms.gaussian_filter(images, sigma))


IN_TASK_DEFAULTS = {
    "flip": {"prob": 0.5},
    "affine": {"rotation": 20.0, "scale": 0.1, "translation": 4.0, "prob": 0.5},
    "elastic": {"sigma": 4.0, "magnitude": 1.5, "prob": 0.3},
    "brightness_contrast": {"brightness": 0.1, "contrast": 0.2, "prob": 0.5},
    "blur": {"sigma": (0.0, 1.0), "prob": 0.3},
    "noise": {"std": (0.0, 0.05), "prob": 0.5},
}


def _freeze(cfg):
    return tuple(
        (
            name,
            tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(kw).items())),
        )
        for name, kw in dict(cfg).items()
    )


@functools.partial(jax.jit, static_argnames=("frozen_cfg", "sharpness"))
def _in_task(key, images, labels, frozen_cfg, sharpness):
    cfg = {name: dict(kw) for name, kw in frozen_cfg}
    k_aug, k_sharp = jax.random.split(key)
    img, lab = transforms.augment(k_aug, images, labels[..., 0].astype(jnp.int32), cfg)
    if sharpness is not None and sharpness[1] > 0:
        img = sharpen(k_sharp, img, amount=sharpness)
    return jnp.clip(img, 0.0, 1.0), lab[..., None].astype(jnp.float32)


def in_task_augment(key, images, labels, cfg=None, *, sharpness=(0.0, 0.5)):
    """Independent random augmentation of every image/label pair -> (images, labels).

    images, labels ``(N, H, W, 1)`` (flatten batch and support axes first). ``cfg`` is a
    :func:`medjax.data.transforms.augment` config (default :data:`IN_TASK_DEFAULTS`: flips, affine,
    elastic, brightness/contrast, blur, noise); sharpness is unsharp masking with a per-image amount
    ``U(sharpness)`` (None: off). Labels are warped nearest, so they stay binary; images are clipped
    to [0, 1]. Jitted (``cfg`` and ``sharpness`` are static).
    """
    images, labels = _check_pairs(images, labels)
    cfg = IN_TASK_DEFAULTS if cfg is None else cfg
    sharpness = None if sharpness is None else tuple(float(v) for v in sharpness)
    return _in_task(key, images, labels, _freeze(cfg), sharpness)


def sobel_boundary(labels):
    """Boundary of binary masks: Sobel gradient magnitude > 0 -> (N, H, W, 1) in {0, 1}.

    Zero padding, so the mask border on the image edge counts as boundary.
    """
    labels = jnp.asarray(labels, jnp.float32)
    sx = jnp.asarray([[1, 0, -1], [2, 0, -2], [1, 0, -1]], jnp.float32)
    kernel = jnp.stack([sx, sx.T], axis=-1)[:, :, None, :]  # (3, 3, 1, 2) HWIO
    g = jax.lax.conv_general_dilated(
        labels, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return (jnp.sum(g**2, axis=-1, keepdims=True) > 1e-6).astype(jnp.float32)


TASK_AUG_DEFAULTS = {"flip": 0.5, "rot90": 0.25, "boundary": 0.2, "invert": 0.25}


def task_augment(key, images, labels, probs=None):
    """One random task change per task, applied identically to its images and labels.

    images, labels ``(B, N, H, W, 1)``: ``N`` images (query and support) of each of ``B`` tasks.
    ``probs`` maps ``flip`` (each spatial axis), ``rot90`` (square images only), ``boundary`` (label
    -> Sobel boundary) and ``invert`` (image -> 1 - image) to probabilities.
    """
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.float32)
    if images.ndim != 5 or images.shape[-1] != 1 or labels.shape != images.shape:
        raise ValueError(
            f"images/labels must both have shape (B, N, H, W, 1), got {images.shape} and "
            f"{labels.shape}"
        )
    p = dict(TASK_AUG_DEFAULTS if probs is None else probs)
    unknown = sorted(set(p) - set(TASK_AUG_DEFAULTS))
    if unknown:
        raise ValueError(f"probs: expected keys among {tuple(TASK_AUG_DEFAULTS)}, got {unknown}")
    b, n, h, w, _ = images.shape
    keys = jax.random.split(key, 5)

    def draw(k, name):
        return jax.random.uniform(k, (b,)) < p.get(name, 0.0)

    def where(m, x, y):
        return jnp.where(m.reshape((b, 1, 1, 1, 1)), x, y)

    for axis, k in ((2, keys[0]), (3, keys[1])):
        m = draw(k, "flip")
        images, labels = (
            where(m, jnp.flip(images, axis), images),
            where(m, jnp.flip(labels, axis), labels),
        )
    if h == w:
        m = draw(keys[2], "rot90")
        rot = lambda x: jnp.swapaxes(jnp.flip(x, 2), 2, 3)
        images, labels = where(m, rot(images), images), where(m, rot(labels), labels)
    m = draw(keys[3], "boundary")
    edge = sobel_boundary(labels.reshape((b * n, h, w, 1))).reshape(labels.shape)
    labels = where(m, edge, labels)
    m = draw(keys[4], "invert")
    images = where(m, 1.0 - images, images)
    return images, labels


# ------------------------------------------------------------------------------------------------
# folders of NIfTI image/label pairs


@dataclasses.dataclass
class TaskData:
    """A task held in memory: images/labels ``(N, H, W, 1)`` and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    name: str
    sources: list


def _find_pairs(folder):
    for img_dir, lab_dir in (("images", "labels"), ("imagesTr", "labelsTr")):
        imgs = sorted(glob.glob(os.path.join(folder, img_dir, "*.nii*")))
        if imgs:
            pairs = []
            for p in imgs:
                q = os.path.join(folder, lab_dir, os.path.basename(p))
                if not os.path.exists(q):
                    raise ValueError(f"folder: image {p!r} has no label file {q!r}")
                pairs.append((p, q))
            return pairs
    raise ValueError(
        f"folder: expected NIfTI files in {folder!r}/images + /labels or /imagesTr + /labelsTr"
    )


def _resize2d(x, size, *, binary):
    out = resize(jnp.asarray(x, jnp.float32)[None, ..., None], shape=size, align_corners=True)
    out = np.asarray(out[0, ..., 0])
    return (out >= 0.5).astype(np.float32) if binary else out


def folder_tasks(folder_or_pairs, *, size=128, axes=(0, 1, 2), slice_mode="label"):
    """Binary tasks from NIfTI image/label pairs -> dict ``name -> TaskData``.

    ``folder_or_pairs`` is a folder with ``images/`` + ``labels/`` (or ``imagesTr/`` +
    ``labelsTr/``) of same-named files, or a list of ``(image_path, label_path)``. A 3D volume gives
    one slice per axis in ``axes`` (``slice_mode="label"``: the slice with the largest area of the
    task's label; ``"mid"``: the middle slice, as MegaMedical); 2D files are used as they are.
    Slices are resized to ``size`` x ``size`` (bilinear, align_corners; labels thresholded at
    0.5), then min-max scaled to [0, 1]. Every non-zero label value (x every axis for 3D) is one
    task, named ``"label{v}"`` or ``"axis{a}_label{v}"``; empty slices are dropped.
    """
    from medjax.data.io import load_image

    if slice_mode not in ("label", "mid"):
        raise ValueError(f"slice_mode must be 'label' or 'mid', got {slice_mode!r}")
    pairs = (
        _find_pairs(os.fspath(folder_or_pairs))
        if isinstance(folder_or_pairs, str | os.PathLike)
        else list(folder_or_pairs)
    )
    if not pairs:
        raise ValueError("folder_or_pairs: expected at least one (image, label) pair")
    hw = (int(size), int(size))
    tasks = {}
    for img_path, lab_path in pairs:
        img = load_image(img_path).array[..., 0]
        lab = load_image(lab_path, is_label=True).array
        if img.shape != lab.shape or img.ndim not in (2, 3):
            raise ValueError(
                f"{img_path}: expected a 2D or 3D image with a label of the same shape, got "
                f"{img.shape} and {lab.shape}"
            )
        for v in (int(u) for u in np.unique(lab) if u != 0):
            fg = lab == v
            if img.ndim == 2:
                views = [("", img, fg)]
            else:
                views = []
                for a in axes:
                    if slice_mode == "mid":
                        i = img.shape[a] // 2
                    else:
                        area = fg.sum(axis=tuple(d for d in range(3) if d != a))
                        i = int(np.argmax(area))
                    views.append((f"axis{a}_", np.take(img, i, axis=a), np.take(fg, i, axis=a)))
            for prefix, im2, fg2 in views:
                if not fg2.any():
                    continue
                im2 = _resize2d(im2, hw, binary=False)
                im2 = transforms.minmax(im2[..., None])[..., 0]
                fg2 = _resize2d(fg2, hw, binary=True)
                name = f"{prefix}label{v}"
                t = tasks.setdefault(name, TaskData([], [], name, []))
                t.images.append(np.clip(im2, 0, 1))
                t.labels.append(fg2)
                t.sources.append(img_path)
    for t in tasks.values():
        t.images = np.stack(t.images)[..., None].astype(np.float32)
        t.labels = np.stack(t.labels)[..., None].astype(np.float32)
    return tasks


def support_set(task, rng, *, support_size, exclude=(), replace=None):
    """Draw a support set from ``task`` (:class:`TaskData` or ``(images, labels)``).

    Returns images, labels ``(S, H, W, 1)``; indices in ``exclude`` (e.g. the query) are never
    drawn. Sampling is without replacement unless ``replace`` (default: only when too few).
    """
    images, labels = (task.images, task.labels) if isinstance(task, TaskData) else task
    if support_size < 1:
        raise ValueError(f"support_size must be >= 1, got {support_size}")
    pool = np.setdiff1d(np.arange(len(images)), np.asarray(exclude, np.int64))
    if pool.size == 0:
        raise ValueError(f"task has no examples left after excluding {list(exclude)}")
    replace = pool.size < support_size if replace is None else replace
    idx = rng.choice(pool, size=support_size, replace=replace)
    return images[idx], labels[idx]
