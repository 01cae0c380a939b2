"""Synthetic multi-modal brain MRI phantom with tumours, for demos, tests and quick experiments.

Every subject is the same analytic template (cerebrum with folded cortex, sulci and interhemispheric
fissure, lateral and third ventricles, deep grey nuclei, cerebellum, brainstem) seen through its own
smooth random deformation, with its own bias field, contrast jitter and Rician noise. An optional
tumour (necrotic core, enhancing rim, surrounding oedema) first pushes the tissue outwards (a radial
mass-effect displacement applied with :func:`medjax.ops.warp`) and is then drawn into four BraTS-like
contrasts (T1, T1ce, T2, FLAIR). Background is exactly 0, as in skull-stripped BraTS volumes.

Geometry lives in normalised coordinates ``p_k = -1 + 2 i_k / (n_k - 1)`` on every axis, so the phantom
always fills the field of view; non-cubic shapes get anisotropic voxels. Axis 0 runs left to right,
axis 1 posterior to anterior, axis 2 inferior to superior. All random draws are made before any
array is built and do not depend on ``shape``: the same seed gives the same subject at any resolution.

Run ``python -m medjax.data.synthetic --figure docs/figures/phantoms.png`` to draw a few phantoms.
"""

import argparse
import functools

import jax
import numpy as np

from medjax.data.transforms import rotation_matrices
from medjax.ops.warp import warp

__all__ = [
    "ANATOMY_LABELS",
    "TUMOUR_LABELS",
    "MODALITIES",
    "brain_phantom",
    "phantom_pair",
    "save_figure",
]

ANATOMY_LABELS = {
    0: "background",
    1: "CSF",
    2: "grey matter",
    3: "white matter",
    4: "ventricles",
    5: "deep grey nuclei",
    6: "cerebellum",
    7: "brainstem",
}
TUMOUR_LABELS = {0: "background", 1: "necrosis (NCR)", 2: "oedema (ED)", 3: "enhancing (ET)"}
MODALITIES = ("t1", "t1ce", "t2", "flair")

_BG, _CSF, _GM, _WM, _VENT, _DEEP, _CBL, _STEM = range(8)
_NUM_ANATOMY = len(ANATOMY_LABELS)
_TEMPLATE_SEED = 20200707

# Mean intensity of each anatomy label in (t1, t1ce, t2, flair); the cerebellum mixes GM and WM.
_TISSUE = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # background
        [0.18, 0.20, 1.00, 0.08],  # CSF
        [0.50, 0.50, 0.64, 0.62],  # grey matter
        [0.80, 0.78, 0.40, 0.44],  # white matter
        [0.14, 0.16, 1.00, 0.06],  # ventricles
        [0.60, 0.60, 0.54, 0.56],  # deep grey nuclei
        [0.62, 0.60, 0.55, 0.55],  # cerebellum (overridden by the folia texture)
        [0.72, 0.70, 0.47, 0.50],  # brainstem
    ],
    dtype=np.float32,
)
# Tumour: oedema is a shift added to the underlying tissue; necrosis and enhancing are absolute.
_OEDEMA_SHIFT = np.array([-0.16, -0.16, 0.38, 0.45], dtype=np.float32)
_NECROSIS = np.array([0.22, 0.24, 0.88, 0.42], dtype=np.float32)
_ENHANCING = np.array([0.46, 1.15, 0.70, 0.74], dtype=np.float32)
_MOD_INDEX = {m: i for i, m in enumerate(MODALITIES)}


# --------------------------------------------------------------------------------------------------
# random smooth fields: sums of plane waves, analytic and so resolution independent


def _fourier_params(rng, n, freq_lo, freq_hi, out=1):
    """Random plane waves: wave vectors (n, 3), phases (out, n), amplitudes (out, n), unit variance."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = rng.uniform(freq_lo, freq_hi, size=(n, 1))
    phase = rng.uniform(0.0, 2 * np.pi, size=(out, n))
    amp = rng.normal(size=(out, n)) / np.sqrt(0.5 * n)
    return direction * freq, phase, amp


def _fourier_points(params, p):
    """Evaluate plane waves at arbitrary points p (N, 3) -> (N, out) float32."""
    w, phase, amp = params
    proj = p.astype(np.float32) @ w.T.astype(np.float32)
    c, s = np.cos(proj), np.sin(proj)
    # cos(w.p + phi) = cos(w.p) cos(phi) - sin(w.p) sin(phi)
    return (c @ (amp * np.cos(phase)).T.astype(np.float32)) - (
        s @ (amp * np.sin(phase)).T.astype(np.float32)
    )


def _fourier_grid(params, shape):
    """Evaluate plane waves on the normalised voxel grid -> (*shape, out) float32.

    Separable: exp(i w.p) is a product of one 1-D exponential per axis, so the sum over waves is a
    small complex matrix product instead of a cosine per voxel and wave.
    """
    w, phase, amp = params
    axes = _axes(shape)
    e = [np.exp(1j * np.outer(w[:, k], axes[k])).astype(np.complex64) for k in range(3)]  # (n, n_k)
    xy = (e[0][:, :, None] * e[1][:, None, :]).reshape(w.shape[0], -1)  # (n, X*Y)
    coef = (amp * np.exp(1j * phase)).astype(np.complex64)  # (out, n)
    z = coef[:, :, None] * e[2][None]  # (out, n, Z)
    out = np.einsum("nq,onz->qzo", xy, z, optimize=True).real
    return np.ascontiguousarray(out.reshape(*shape, -1), dtype=np.float32)


def _axes(shape):
    """Normalised coordinates along each axis, ``p_k = -1 + 2 i_k / (n_k - 1)``."""
    return [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]


def _grid(shape):
    """Normalised coordinates of every voxel: (*shape, 3) float32."""
    return np.stack(np.meshgrid(*_axes(shape), indexing="ij"), axis=-1)


def _to_voxels(shape):
    """Factor (3,) from normalised units to voxels along each axis."""
    return np.array([(n - 1) / 2.0 for n in shape], np.float32)


_TEMPLATE_RNG = np.random.default_rng(_TEMPLATE_SEED)
_TEMPLATE_FIELDS = {
    "sulci": _fourier_params(_TEMPLATE_RNG, 64, 10.0, 12.0),
    "depth": _fourier_params(_TEMPLATE_RNG, 12, 2.0, 4.0),
    "surface": _fourier_params(_TEMPLATE_RNG, 12, 3.0, 6.0),
    "folia": _fourier_params(_TEMPLATE_RNG, 24, 24.0, 30.0),
}


# --------------------------------------------------------------------------------------------------
# template geometry


def _ellipsoid(q, centre, radii):
    """Approximate signed distance (negative inside) to an axis-aligned ellipsoid; q (..., 3)."""
    rel = (q - np.asarray(centre, np.float32)) / np.asarray(radii, np.float32)
    return (np.sqrt((rel**2).sum(-1)) - 1.0) * min(radii)


def _occupancy(f, h):
    """Soft inside-indicator of a signed function f (partial volume over a width of ~h)."""
    return 0.5 * (1.0 - np.tanh(f / h))


def _paint(frac, label, occ):
    """Draw a structure with occupancy occ (*S) over the label fractions frac (*S, L), in place."""
    frac *= (1.0 - occ)[..., None]
    frac[..., label] += occ


_CEREBRUM_CENTRE = np.array([0.0, 0.03, 0.14], np.float32)
_CEREBRUM_RADII = np.array([0.76, 0.88, 0.70], np.float32)


@functools.lru_cache(maxsize=4)
def _template(shape):
    """Template rendered on the grid of ``shape``: label fractions (*S, L) and folia texture (*S, 1).

    Cached, read-only: subjects are warps of this array.
    """
    q = _grid(shape)
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    h = 0.6 / float(_to_voxels(shape).max())  # partial-volume width ~ half a voxel
    f = _TEMPLATE_FIELDS
    surface = _fourier_grid(f["surface"], shape)[..., 0]
    depth_var = _fourier_grid(f["depth"], shape)[..., 0]

    frac = np.zeros((*shape, _NUM_ANATOMY), np.float32)
    frac[..., _BG] = 1.0

    # cerebrum: an egg (wider at the back) with gentle surface bumps
    qc = np.stack([x / (1.0 - 0.10 * y), y, z], axis=-1)
    cerebrum = _ellipsoid(qc, _CEREBRUM_CENTRE, _CEREBRUM_RADII) + 0.012 * surface
    cerebellum = _ellipsoid(q, (0.0, -0.50, -0.47), (0.48, 0.30, 0.24))
    stem = _ellipsoid(q, (0.0, -0.17, -0.62), (0.13, 0.15, 0.60))
    envelope = np.minimum(np.minimum(cerebrum, cerebellum), stem) - 0.045
    _paint(frac, _CSF, _occupancy(envelope, h))
    _paint(frac, _GM, _occupancy(cerebrum, h))
    _paint(frac, _CSF, _occupancy(cerebellum - 0.03, h))  # tentorium

    # cortex: sulci are CSF sheets perpendicular to the surface, along the zero set of a field on
    # the sphere of directions; the cortical ribbon (thickness t) lines the surface and the sulci.
    direction = (qc - _CEREBRUM_CENTRE) / _CEREBRUM_RADII
    direction /= np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-6)
    g = _fourier_points(f["sulci"], direction.reshape(-1, 3)).reshape(shape)
    dist = np.abs(g) / 12.0  # ~ distance to the sulcal sheet (field std 1, gradient ~ 12)
    depth = -cerebrum
    sulcal_depth = 0.14 + 0.04 * depth_var
    t, w = 0.045, 0.010
    wm = np.maximum(t - depth, np.minimum(w + t - dist, sulcal_depth + t - depth))
    _paint(frac, _WM, _occupancy(wm, h))
    sulcus = np.maximum(dist - w, depth - sulcal_depth)
    _paint(frac, _CSF, _occupancy(sulcus, h) * _occupancy(cerebrum, h))

    # interhemispheric fissure above the corpus callosum and through the frontal/occipital poles
    span = np.maximum(_occupancy(0.30 - 0.3 * y**2 - z, h), _occupancy(0.55 - np.abs(y), h))
    inside = _occupancy(cerebrum, h) * span
    _paint(frac, _GM, _occupancy(np.abs(x) - 0.015 - t, h) * inside)
    _paint(frac, _CSF, _occupancy(np.abs(x) - 0.015, h) * inside)

    _paint(frac, _CBL, _occupancy(cerebellum, h))
    _paint(frac, _STEM, _occupancy(stem, h))

    # deep grey nuclei: thalami, lentiform nuclei, heads of the caudate
    deep = np.full(shape, np.inf, np.float32)
    for s in (-1.0, 1.0):
        deep = np.minimum(deep, _ellipsoid(q, (0.12 * s, -0.13, 0.02), (0.10, 0.16, 0.10)))
        deep = np.minimum(deep, _ellipsoid(q, (0.29 * s, 0.10, 0.04), (0.08, 0.18, 0.12)))
        deep = np.minimum(deep, _ellipsoid(q, (0.19 * s, 0.25, 0.15), (0.055, 0.10, 0.075)))
    _paint(frac, _DEEP, _occupancy(deep, h))

    # lateral ventricles: curved bodies (C-shaped sagittally, diverging posteriorly), third ventricle
    vent = np.full(shape, np.inf, np.float32)
    for s in (-1.0, 1.0):
        zc = 0.18 - 0.6 * (y + 0.03) ** 2
        xc = s * (0.11 + 0.08 * np.clip(-y, 0.0, None))
        rel = np.stack([x - xc, y + 0.03, z - zc], axis=-1)
        vent = np.minimum(vent, _ellipsoid(rel, (0.0, 0.0, 0.0), (0.085, 0.42, 0.12)))
    vent = np.minimum(vent, _ellipsoid(q, (0.0, -0.10, -0.04), (0.022, 0.13, 0.10)))
    _paint(frac, _VENT, _occupancy(vent, h))

    folia = _fourier_grid(f["folia"], shape)[..., 0]
    folia = 0.5 * (1.0 + np.tanh(2.0 * (folia - 0.5)))
    out = np.concatenate([frac, folia[..., None]], axis=-1)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------------
# subject draws


def _rotation(angles):
    """Rotation matrix from three angles (radians) about axes 0, 1, 2 (float64, host)."""
    return rotation_matrices(np.asarray(angles, np.float64)[None], 3, xp=np)[0]


def _draw_subject(rng):
    """All random parameters of one subject; independent of the output shape."""
    p = {}
    p["rotation"] = _rotation(np.deg2rad(rng.normal(0.0, 2.0, size=3)))
    p["scale"] = np.exp(rng.normal(0.0, 0.03, size=3))
    p["translation"] = rng.normal(0.0, 0.015, size=3)
    p["deform"] = _fourier_params(rng, 10, 1.5, 3.5, out=3)
    p["deform_amplitude"] = rng.uniform(0.05, 0.065)
    # tumour (always drawn, so that tumour=False gives the same healthy subject)
    side = rng.choice([-1.0, 1.0])
    p["tumour_centre"] = np.array(
        [side * rng.uniform(0.22, 0.45), rng.uniform(-0.45, 0.50), rng.uniform(-0.05, 0.42)]
    )
    p["core_radius"] = rng.uniform(0.10, 0.17)
    p["oedema_radius"] = p["core_radius"] * rng.uniform(1.5, 2.0)
    p["necrosis_fraction"] = rng.uniform(0.45, 0.70)
    p["tumour_shape"] = _fourier_params(rng, 10, 5.0, 10.0, out=3)
    # intensities
    p["contrast"] = np.exp(rng.normal(0.0, 0.05, size=(_NUM_ANATOMY, len(MODALITIES))))
    p["gain"] = np.exp(rng.normal(0.0, 0.10, size=len(MODALITIES)))
    p["bias"] = _fourier_params(rng, 6, 0.8, 2.0, out=len(MODALITIES))
    p["bias_strength"] = rng.uniform(0.08, 0.18, size=len(MODALITIES))
    p["texture"] = _fourier_params(rng, 12, 10.0, 20.0, out=len(MODALITIES))
    p["noise_sigma"] = rng.uniform(0.015, 0.035)
    p["noise_seed"] = int(rng.integers(2**31))
    return p


def _mass_effect(p, centre, radius):
    """Backward displacement (*S, 3), normalised units, of a ball of ``radius`` grown at ``centre``.

    Volume-preserving radial push: tissue at distance d moves to (d^3 + radius^3)^(1/3), so the
    output at distance d' samples the healthy tissue at d = (d'^3 - radius^3)^(1/3) (0 inside).
    """
    rel = p - centre.astype(np.float32)
    d_out = np.sqrt((rel**2).sum(-1))
    d_in = np.cbrt(np.clip(d_out**3 - radius**3, 0.0, None))
    ratio = np.where(d_out > 1e-6, d_in / np.maximum(d_out, 1e-6), 0.0)
    return (rel * (ratio - 1.0)[..., None]).astype(np.float32)


@jax.jit
def _warp_subject(template, subject, mass):
    """Template (*S, L) seen by the subject: at x, the template at x + m + D(x + m) -> (*S, L).

    ``subject`` D (1, *S, 3) maps the healthy subject to the template and ``mass`` m (1, *S, 3) is
    the tumour's mass effect; both are voxel displacements applied with medjax.ops.warp.
    """
    total = mass + warp(subject, mass, order=1)
    return warp(template[None], total, order=1)[0]


def _check_shape(shape):
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape: expected 3 spatial sizes >= 2, got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape: expected 3 spatial sizes >= 2, got {shape!r}")
    return shape


def _check_modalities(modalities):
    if isinstance(modalities, str):
        modalities = (modalities,)
    modalities = tuple(modalities)
    bad = [m for m in modalities if m not in _MOD_INDEX]
    if not modalities or bad:
        raise ValueError(
            f"modalities: expected a non-empty subset of {MODALITIES}, got {modalities!r}"
        )
    return modalities


def _render(params, shape, tumour, modalities):
    shape = _check_shape(shape)
    modalities = _check_modalities(modalities)
    p = _grid(shape)
    vox = _to_voxels(shape)
    h = 0.6 / float(vox.max())

    # subject -> template map: global affine + smooth random deformation (normalised units)
    smooth = _fourier_grid(params["deform"], shape) * params["deform_amplitude"]
    a = params["rotation"] * params["scale"][None, :]
    subject = ((p @ a.T.astype(np.float32)) + params["translation"] + smooth - p) * vox
    subject = subject[None].astype(np.float32)  # (1, *S, 3) voxels

    centre = params["tumour_centre"].astype(np.float32)
    if tumour:
        mass = _mass_effect(p, centre, params["core_radius"]) * vox
    else:
        mass = np.zeros((*shape, 3), np.float32)
    stacked = np.asarray(_warp_subject(_template(shape), subject, mass[None]))
    frac, folia = stacked[..., :-1], stacked[..., -1]
    anatomy = np.argmax(frac, axis=-1).astype(np.int32)

    # tissue intensities with per-subject contrast jitter and the cerebellar folia texture
    tissue = (_TISSUE * params["contrast"]).astype(np.float32)
    cbl = (1.0 - folia)[..., None] * tissue[_GM] + folia[..., None] * tissue[_WM]
    img = frac @ tissue + frac[..., _CBL : _CBL + 1] * (cbl - tissue[_CBL])
    texture = _fourier_grid(params["texture"], shape)
    img = img * (1.0 + 0.04 * texture)

    # tumour regions (soft), drawn over the displaced tissue
    labels = np.zeros(shape, np.int32)
    if tumour:
        dist = np.sqrt(((p - centre) ** 2).sum(-1))
        shp = _fourier_grid(params["tumour_shape"], shape)
        r_core, r_oed = params["core_radius"], params["oedema_radius"]
        r_nec = r_core * params["necrosis_fraction"]
        parenchyma = np.clip(1.0 - frac[..., [_BG, _CSF, _VENT]].sum(-1), 0.0, 1.0)
        o_oed = _occupancy(dist - r_oed * (1.0 + 0.22 * shp[..., 0]), h) * parenchyma
        o_core = _occupancy(dist - r_core * (1.0 + 0.10 * shp[..., 1]), h)
        o_nec = _occupancy(dist - r_nec * (1.0 + 0.15 * shp[..., 2]), h) * o_core
        w_et = o_core - o_nec
        w_oed = o_oed * (1.0 - o_core)
        img = (
            (1.0 - o_core - w_oed)[..., None] * img
            + w_oed[..., None] * (img + _OEDEMA_SHIFT * (1.0 + 0.15 * texture))
            + w_et[..., None] * _ENHANCING * (1.0 + 0.08 * texture)
            + o_nec[..., None] * _NECROSIS * (1.0 + 0.06 * texture)
        )
        labels[w_oed > 0.5] = 2
        labels[o_core > 0.5] = 3
        labels[o_nec > 0.5] = 1

    # acquisition: bias field, gain, Rician noise inside the head, exact zeros outside
    bias = np.exp(params["bias_strength"] * _fourier_grid(params["bias"], shape))
    img = np.clip(img * bias * params["gain"], 0.0, None)
    sigma = (params["noise_sigma"] * params["gain"]).astype(np.float32)
    noise_rng = np.random.default_rng(params["noise_seed"])
    n1 = noise_rng.standard_normal(img.shape, dtype=np.float32)
    n2 = noise_rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    img = img[..., [_MOD_INDEX[m] for m in modalities]]
    img = (img * (frac[..., _BG] < 0.5)[..., None]).astype(np.float32)

    nan3 = np.full(3, np.nan, np.float32)
    return {
        "image": img,
        "anatomy": anatomy,
        "tumour": labels,
        "modalities": modalities,
        "tumour_centre": ((1.0 + centre) * vox).astype(np.float32) if tumour else nan3,
        "tumour_radius": (params["oedema_radius"] * vox).astype(np.float32) if tumour else nan3,
        "core_radius": (params["core_radius"] * vox).astype(np.float32) if tumour else nan3,
        "mass_effect": mass.astype(np.float32),
    }


def brain_phantom(seed, shape=(64, 64, 64), *, tumour=True, modalities=MODALITIES):
    """One synthetic brain MRI subject.

    Args:
      seed: int (or sequence of ints) seeding a ``numpy.random.Generator``; fully deterministic.
      shape: spatial shape (X, Y, Z); axis 0 left-right, 1 posterior-anterior, 2 inferior-superior.
      tumour: draw a tumour (with mass effect); False gives the same subject without it.
      modalities: subset of ``("t1", "t1ce", "t2", "flair")``, in the channel order wanted.

    Returns:
      dict with ``image`` (*S, M) float32 (background exactly 0), ``anatomy`` (*S) int32 labels
      (:data:`ANATOMY_LABELS`; the displaced healthy tissue, also under the tumour), ``tumour``
      (*S) int32 (:data:`TUMOUR_LABELS`, BraTS classes after remapping), ``modalities`` (tuple),
      ``tumour_centre`` (3,) voxels, ``tumour_radius`` (3,) nominal oedema radius in voxels per axis,
      ``core_radius`` (3,) voxels (all NaN without a tumour) and ``mass_effect`` (*S, 3) the
      displacement (voxels) that :func:`medjax.ops.warp` applied to the healthy anatomy.
    """
    params = _draw_subject(np.random.default_rng(seed))
    return _render(params, shape, tumour, modalities)


def phantom_pair(
    seed, shape=(64, 64, 64), *, tumour_moving=True, tumour_fixed=True, modalities=MODALITIES
):
    """Two different subjects for registration: ``moving_*`` and ``fixed_*`` entries.

    Each entry of :func:`brain_phantom` appears twice, e.g. ``moving_image`` (*S, M),
    ``fixed_anatomy`` (*S); the tumours (if any) lie at different places.
    """
    seed_seq = np.random.SeedSequence(seed if isinstance(seed, int | np.integer) else list(seed))
    moving_seq, fixed_seq = seed_seq.spawn(2)
    moving = _render(
        _draw_subject(np.random.default_rng(moving_seq)), shape, tumour_moving, modalities
    )
    fixed = _render(
        _draw_subject(np.random.default_rng(fixed_seq)), shape, tumour_fixed, modalities
    )
    out = {f"moving_{k}": v for k, v in moving.items()}
    out.update({f"fixed_{k}": v for k, v in fixed.items()})
    return out


# --------------------------------------------------------------------------------------------------
# figure


def save_figure(path, seeds=(0, 1, 2), shape=(96, 96, 96)):
    """Draw slices through the tumour centre (axial/coronal/sagittal) of a few phantoms to ``path``."""
    from matplotlib.colors import ListedColormap

    from medjax import figures as F

    anat_cmap = ListedColormap(
        ["black", "#4a90d9", "#9b9b9b", "#f2f2f2", "#1f3fbf", "#d98f4a", "#7bbf5a", "#bf5a9b"]
    )
    tum_cmap = ListedColormap(["black", "#e03030", "#f0d020", "#30c0f0"])
    views = ("axial", "coronal", "sagittal")
    cols = [*MODALITIES, "anatomy", "tumour"]
    rows = []
    for seed in seeds:
        ph = brain_phantom(seed, shape)
        c = np.round(ph["tumour_centre"]).astype(int)
        for view in views:
            take = {
                "axial": lambda a, c=c: a[:, :, c[2]],
                "coronal": lambda a, c=c: a[:, c[1], :],
                "sagittal": lambda a, c=c: a[c[0], :, :],
            }[view]
            row = []
            for ci, name in enumerate(cols):
                panel = F.Panel(
                    None,
                    title=(name.upper() if ci < len(MODALITIES) else name) if not rows else None,
                    ylabel=f"seed {seed}\n{view}" if ci == 0 else None,
                )
                if ci < len(MODALITIES):
                    panel.image = take(ph["image"][..., ci])
                    panel.vmin, panel.vmax = 0, np.percentile(ph["image"][..., ci], 99.8)
                else:
                    panel.image = take(ph["image"][..., 0])
                    panel.labels = take(ph[name])
                    panel.label_cmap = anat_cmap if name == "anatomy" else tum_cmap
                    panel.num_classes = _NUM_ANATOMY if name == "anatomy" else 4
                row.append(panel)
            rows.append(row)
    legend = {v: anat_cmap(k) for k, v in ANATOMY_LABELS.items() if k}
    legend.update({v: tum_cmap(k) for k, v in TUMOUR_LABELS.items() if k})
    return F.panel_grid(
        path,
        rows,
        panel_size=(2.0, 2.0),
        legend=legend,
        legend_style="patch",
        title="medjax.data.synthetic.brain_phantom: slices through the tumour centre "
        f"({'x'.join(map(str, shape))}; overlays on T1)",
        dpi=80,
    )


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", default="docs/figures/phantoms.png", help="output PNG path")
    parser.add_argument("--size", type=int, default=96, help="cube side of the phantoms drawn")
    args = parser.parse_args(argv)
    save_figure(args.figure, shape=(args.size,) * 3)
    print(args.figure)


if __name__ == "__main__":
    _main()
