"""Synthetic cardiac MR / CT phantom for unsupervised cross-modality domain adaptation (PnP-AdaNet).

Each seed draws one thorax: a left-ventricle (LV) blood pool (a truncated ellipsoid along a random
long axis), the LV myocardium as a shell around it (open at the valve plane), the left atrium (LA),
the ascending aorta (AA, a tube rising from the LV outflow), and, labelled background, the right
ventricle and atrium, pulmonary trunk and descending aorta (blood too), epicardial and mediastinal
fat, lungs, the lateral chest wall with ribs and subcutaneous fat, the diaphragm with liver below,
and air outside the body. Labels follow :data:`medjax.data.datasets.PNP_ADANET_CLASSES`
(0 background, 1 AA, 2 LA, 3 LV, 4 Myo).

The anatomy depends on the seed only, so ``modality="mr"`` and ``modality="ct"`` with the same seed
give the same label map seen through two different appearances, the low-level shift PnP-AdaNet
adapts to:

- a different, non-monotonic mapping from tissue to intensity. MR (bSSFP-like, arbitrary units):
  air < lung < myocardium < muscle < liver < bone < fat < blood. CT (contrast-enhanced, HU):
  air < lung < fat < muscle < myocardium ~ liver < blood < bone. Fat moves from the second
  brightest tissue to the third darkest, and blood gives up the top of the range to bone;
- texture: a smooth multiplicative field about 20 mm across on MR, a fine additive one (~6 mm) on CT;
- noise: Rician on MR, spatially correlated Gaussian on CT;
- a smooth multiplicative bias field on MR only, and a wider point-spread blur on MR.

MR images are in arbitrary units (about [0, 1.2]); CT images are ``(HU + 100) / 1000``. Both are
meant to be z-scored per domain before training, as in the paper.

Geometry is in millimetres on a fixed field of view :data:`FOV_MM` (120 x 240 x 240 mm) centred on
the heart, so the same seed gives the same subject at any ``shape``; the default ``spacing`` is
``FOV_MM / shape`` (7.5 x 3.75 x 3.75 mm at 16 x 64 x 64). Axis 0 is the slice axis (coronal slices,
posterior to anterior), axis 1 runs superior to inferior (image rows), axis 2 runs from the
patient's right to left (image columns, radiological display). A 2.5D model takes 3 adjacent
slices along axis 0 as channels.

Run ``python -m medjax.data.synthetic_cardiac --figure /tmp/cardiac.png`` to draw a few phantoms.
"""

import argparse

import numpy as np

from medjax.data import _phantom as ph
from medjax.data.datasets import PNP_ADANET_CLASSES

__all__ = [
    "CARDIAC_CLASSES",
    "CARDIAC_MODALITIES",
    "FOV_MM",
    "cardiac_dataset",
    "cardiac_phantom",
    "save_figure",
]

CARDIAC_CLASSES = PNP_ADANET_CLASSES
CARDIAC_MODALITIES = ("mr", "ct")
FOV_MM = (120.0, 240.0, 240.0)
_MIN_SHAPE = (3, 16, 16)

_AA, _LA, _LV, _MYO = 1, 2, 3, 4
_AIR, _LUNG, _FAT, _MUSCLE, _BLOOD, _MYOCARDIUM, _BONE, _LIVER = range(8)
_TISSUES = ("air", "lung", "fat", "muscle", "blood", "myocardium", "bone", "liver")
# bSSFP-like MR (arbitrary units) and contrast-enhanced CT (HU), per tissue above.
_MR = np.array([0.02, 0.08, 0.78, 0.34, 0.95, 0.27, 0.50, 0.40], np.float32)
_CT = np.array([-1000.0, -830.0, -100.0, 45.0, 330.0, 95.0, 650.0, 85.0], np.float32)


# --------------------------------------------------------------------------------------------------
# subject draws


def _draw_subject(rng):
    """All random parameters of one subject (anatomy and both appearances); shape independent."""
    p = {}
    # global pose of the thorax and a smooth deformation
    p["rotation"] = ph.rotation(np.deg2rad(rng.normal(0.0, [4.0, 4.0, 6.0])))
    p["scale"] = float(np.exp(rng.normal(0.0, 0.06)))
    p["shift"] = rng.normal(0.0, [4.0, 6.0, 6.0])
    p["deform"] = ph.waves(rng, 8, 80.0, 160.0, out=3)
    p["deform_mm"] = rng.uniform(2.0, 4.0)
    # heart
    p["heart_rotation"] = ph.rotation(np.deg2rad(rng.normal(0.0, 8.0, size=3)))
    p["lv_axis"] = np.array([0.45, -0.55, 0.70]) + rng.normal(0.0, 0.08, size=3)
    p["lv_centre"] = np.array([5.0, -15.0, 15.0]) + rng.normal(0.0, 3.0, size=3)
    p["lv_long"] = rng.uniform(34.0, 44.0)
    p["lv_short"] = rng.uniform(19.0, 25.0) * np.array([1.0, rng.uniform(0.88, 1.0)])
    p["myo_thickness"] = rng.uniform(8.0, 12.0)
    p["la_offset"] = rng.normal(0.0, 4.0, size=3)
    p["la_radii"] = rng.uniform([17.0, 15.0, 20.0], [23.0, 20.0, 27.0])
    p["aa_radius"] = rng.uniform(12.0, 16.0)
    p["aa_tilt"] = rng.normal(0.0, 6.0, size=3)
    p["rv_radii"] = rng.uniform([19.0, 36.0, 24.0], [25.0, 46.0, 31.0])
    p["ra_radii"] = rng.uniform([18.0, 22.0, 17.0], [24.0, 28.0, 23.0])
    p["epicardial_fat"] = rng.uniform(3.0, 8.0)
    p["fat_field"] = ph.waves(rng, 10, 25.0, 60.0)
    # thorax
    p["body_lr"] = rng.uniform(118.0, 145.0)
    p["wall"] = rng.uniform(18.0, 28.0)
    p["subcutaneous"] = rng.uniform(6.0, 15.0)
    p["dome"] = rng.uniform(-78.0, -62.0)
    p["rib_period"] = rng.uniform(22.0, 28.0)
    p["rib_phase"] = rng.uniform(0.0, 2.0 * np.pi)
    p["mediastinum"] = rng.uniform(18.0, 28.0)
    # MR appearance
    p["mr_contrast"] = np.exp(rng.normal(0.0, 0.05, size=len(_TISSUES)))
    p["mr_texture"] = ph.waves(rng, 24, 12.0, 30.0)
    p["mr_texture_amp"] = rng.uniform(0.04, 0.07)
    p["mr_bias"] = ph.waves(rng, 6, 250.0, 600.0)
    p["mr_bias_strength"] = rng.uniform(0.10, 0.22)
    p["mr_psf_mm"] = rng.uniform(2.0, 3.0)
    p["mr_noise"] = rng.uniform(0.015, 0.03)
    p["mr_noise_seed"] = int(rng.integers(2**31))
    # CT appearance
    p["ct_shift"] = rng.normal(0.0, 10.0, size=len(_TISSUES))
    p["ct_blood"] = rng.uniform(220.0, 360.0)
    p["ct_texture"] = ph.waves(rng, 24, 4.0, 8.0)
    p["ct_texture_amp"] = rng.uniform(8.0, 15.0)
    p["ct_psf_mm"] = rng.uniform(1.0, 1.6)
    p["ct_noise"] = rng.uniform(15.0, 30.0)
    p["ct_noise_seed"] = int(rng.integers(2**31))
    return p


# --------------------------------------------------------------------------------------------------
# rendering


def _anatomy(p, axes):
    """Tissue (*S) and label (*S) int maps of one subject on the grid spanned by ``axes``."""
    q = ph.template_points(p, axes)
    ap, si, lr = q[..., 0], q[..., 1], q[..., 2]
    fat_field = ph.wave_grid(p["fat_field"], axes)[..., 0]
    tissue = np.full(q.shape[:-1], _AIR, np.int32)
    label = np.zeros(q.shape[:-1], np.int32)

    # thorax: elliptic body, chest wall (muscle, ribs, subcutaneous fat), lungs above the diaphragm
    body_ap = 105.0
    body = (np.sqrt(((ap + 10.0) / body_ap) ** 2 + (lr / p["body_lr"]) ** 2) - 1.0) * body_ap
    inner_ap, inner_lr = body_ap - p["wall"], p["body_lr"] - p["wall"]
    cavity = (np.sqrt(((ap + 10.0) / inner_ap) ** 2 + (lr / inner_lr) ** 2) - 1.0) * inner_ap
    tissue[body < 0] = _FAT
    tissue[body < -p["subcutaneous"]] = _MUSCLE
    rib_band = (body < -p["subcutaneous"] - 3.0) & (cavity > 2.0)
    ribs = np.cos(2.0 * np.pi * si / p["rib_period"] + p["rib_phase"]) > 0.45
    tissue[rib_band & ribs] = _BONE
    inside = cavity < 0
    dome = p["dome"] + 0.0022 * lr**2 - 0.08 * lr
    tissue[inside] = _LUNG
    abdomen = inside & (si < dome)
    tissue[abdomen & (lr < 10.0)] = _LIVER
    tissue[abdomen & (lr >= 10.0)] = _MUSCLE
    # mediastinum: soft tissue and fat between the lungs, above the heart and behind it
    upper = inside & (np.abs(lr + 5.0) < p["mediastinum"]) & (si > 10.0)
    posterior = inside & (np.abs(lr - 10.0) < p["mediastinum"] + 5.0) & (ap < -30.0)
    medi = (upper | posterior) & (si >= dome)
    tissue[medi] = np.where(fat_field[medi] > -0.2, _FAT, _MUSCLE)

    # heart, in its own frame
    h = q @ p["heart_rotation"].astype(np.float32)
    u = p["lv_axis"] / np.linalg.norm(p["lv_axis"])
    frame = ph.frame(u)
    c_lv, length = p["lv_centre"], p["lv_long"]
    a, b = p["lv_short"]
    thick = p["myo_thickness"]
    lv = ph.ellipsoid(h, c_lv, (length, a, b), frame)
    t = ((h - c_lv.astype(np.float32)) @ u.astype(np.float32)) / length  # -1 base, +1 apex
    myo_out = ph.ellipsoid(
        h, c_lv + 0.35 * thick * u, (length + 0.9 * thick, a + thick, b + thick), frame
    )
    c_la = c_lv - 50.0 * u + np.array([-15.0, 0.0, 25.0]) + p["la_offset"]
    la = ph.ellipsoid(h, c_la, p["la_radii"])
    root = c_lv - 0.9 * length * u + np.array([12.0, 0.0, -12.0])
    aa_path = [
        root,
        root + np.array([6.0, 45.0, -4.0]) + p["aa_tilt"],
        root + np.array([4.0, 95.0, 8.0]) + p["aa_tilt"],
        root + np.array([-35.0, 125.0, 30.0]),
    ]
    aa = ph.tube(h, aa_path, p["aa_radius"])
    c_rv = c_lv + np.array([18.0, 8.0, -24.0])
    rv = np.maximum(ph.ellipsoid(h, c_rv, p["rv_radii"]), -myo_out)
    rv_wall = np.maximum(ph.ellipsoid(h, c_rv, p["rv_radii"] + 4.0), -myo_out)
    ra = ph.ellipsoid(h, c_la + np.array([8.0, -8.0, -38.0]), p["ra_radii"])
    pa_start = c_rv + np.array([6.0, 30.0, 8.0])
    pa = ph.tube(h, [pa_start, pa_start + np.array([-8.0, 40.0, 14.0]), c_la + (5, 60, 30)], 12.0)
    da = ph.tube(h, [c_la + (-22.0, 140.0, 14.0), c_la + (-22.0, -160.0, 20.0)], 11.0)

    heart = np.minimum.reduce([myo_out, la, aa, rv_wall, ra, pa])
    tissue[(heart < p["epicardial_fat"] * (1.0 + 0.6 * fat_field)) & inside] = _FAT
    tissue[(da < 5.0) & inside] = _FAT
    tissue[da < 0] = _BLOOD
    tissue[rv_wall < 0] = _MYOCARDIUM
    for sdf in (rv, ra, pa, la, aa):
        tissue[sdf < 0] = _BLOOD
    label[la < 0] = _LA
    label[aa < 0] = _AA
    myo = (myo_out < 0) & (t > -0.62)
    tissue[myo] = _MYOCARDIUM
    label[myo] = _MYO
    lv_blood = (lv < 0) & (t > -0.82)
    tissue[lv_blood] = _BLOOD
    label[lv_blood] = _LV
    return tissue, label


def _appearance(p, tissue, axes, spacing, modality):
    """Intensity image (*S) float32 of a tissue map in ``modality``."""
    if modality == "mr":
        mean = (_MR * p["mr_contrast"]).astype(np.float32)
        texture = ph.wave_grid(p["mr_texture"], axes)[..., 0]
        img = ph.blur(mean[tissue] * (1.0 + p["mr_texture_amp"] * texture), p["mr_psf_mm"], spacing)
        img = img * np.exp(p["mr_bias_strength"] * ph.wave_grid(p["mr_bias"], axes)[..., 0])
        rng = np.random.default_rng(p["mr_noise_seed"])
        sigma = np.float32(p["mr_noise"])
        n1 = rng.standard_normal(img.shape, dtype=np.float32)
        n2 = rng.standard_normal(img.shape, dtype=np.float32)
        return np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2).astype(np.float32)
    hu = (_CT + p["ct_shift"]).astype(np.float32)
    hu[_BLOOD] = p["ct_blood"]
    hu[_AIR] = -1000.0
    texture = ph.wave_grid(p["ct_texture"], axes)[..., 0]
    img = ph.blur(hu[tissue] + p["ct_texture_amp"] * texture, p["ct_psf_mm"], spacing)
    img = img + p["ct_noise"] * ph.correlated_noise(p["ct_noise_seed"], img.shape, 0.7)
    return ((img + 100.0) / 1000.0).astype(np.float32)


def _check_modality(modality):
    if modality not in CARDIAC_MODALITIES:
        raise ValueError(f"modality: expected one of {CARDIAC_MODALITIES}, got {modality!r}")
    return modality


def cardiac_phantom(seed, shape=(16, 64, 64), *, modality="mr", spacing=None):
    """One synthetic cardiac volume in MR or CT appearance.

    Args:
      seed: int, sequence of ints or ``numpy.random.SeedSequence`` seeding a
        ``numpy.random.Generator``; the anatomy depends on it only, not on ``modality`` or ``shape``.
      shape: (D, H, W) = (slices, rows, columns); axis 0 is the coronal slice axis (posterior to
        anterior), axis 1 superior to inferior, axis 2 patient right to left. At least (3, 16, 16).
      modality: ``"mr"`` or ``"ct"``.
      spacing: voxel size (3,) in mm; default ``FOV_MM / shape``, so that the view is filled.

    Returns:
      dict with ``image`` (D, H, W) float32 (MR arbitrary units, CT ``(HU + 100) / 1000``),
      ``label`` (D, H, W) int32 in :data:`CARDIAC_CLASSES` (0 background, 1 AA, 2 LA, 3 LV, 4 Myo),
      ``spacing`` (3,) float32 mm and ``modality`` (str).
    """
    shape = ph.check_shape(shape, _MIN_SHAPE)
    modality = _check_modality(modality)
    spacing = ph.check_spacing(spacing, shape, FOV_MM)
    p = _draw_subject(np.random.default_rng(seed))
    axes = ph.axes_mm(shape, spacing, signs=(1.0, -1.0, 1.0))
    tissue, label = _anatomy(p, axes)
    return {
        "image": _appearance(p, tissue, axes, spacing, modality),
        "label": label,
        "spacing": np.asarray(spacing, np.float32),
        "modality": modality,
    }


def cardiac_dataset(seed, n, shape=(16, 64, 64), *, modality="mr", spacing=None, paired=False):
    """``n`` phantoms of one modality: a list of :func:`cardiac_phantom` dicts, each with its ``seed``.

    Subject ``i`` is seeded by ``(seed, i)`` when ``paired`` (the same subjects in both modalities)
    and by ``(seed, 1 + m, i)`` otherwise, ``m`` being the modality's index in
    :data:`CARDIAC_MODALITIES`, so that the MR and CT sets hold different subjects (unpaired, as
    in MM-WHS). ``cardiac_phantom(entry["seed"], ...)`` regenerates an entry.
    """
    modality = _check_modality(modality)
    n = ph.check_count(n)
    seed = ph.check_seed(seed)
    out = []
    for i in range(n):
        s = (seed, i) if paired else (seed, 1 + CARDIAC_MODALITIES.index(modality), i)
        out.append({**cardiac_phantom(s, shape, modality=modality, spacing=spacing), "seed": s})
    return out


# --------------------------------------------------------------------------------------------------
# figure

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231")


def save_figure(path, seeds=(0, 1, 2), shape=(16, 64, 64)):
    """Draw three coronal slices of a few phantoms, MR and CT side by side, with label contours."""
    from medjax import figures as F

    nslice = 3
    rows = []
    for seed in seeds:
        row = []
        for modality in CARDIAC_MODALITIES:
            out = cardiac_phantom(seed, shape, modality=modality)
            img, lab = out["image"], out["label"]
            heart = np.flatnonzero((lab > 0).any(axis=(1, 2)))
            picks = np.linspace(heart[0], heart[-1], nslice + 2)[1:-1].round().astype(int)
            lo, hi = np.percentile(img, [1, 99.5])
            row += [
                F.Panel(
                    F.rows_down(img[z]),
                    title=f"seed {seed} {modality.upper()} slice {z}",
                    vmin=lo,
                    vmax=hi,
                    contours=F.rows_down(lab[z]),
                    contour_colors=_COLOURS,
                )
                for z in picks
            ]
        rows.append(row)
    return F.panel_grid(
        path,
        rows,
        panel_size=(2.2, 2.3),
        legend=dict(zip(CARDIAC_CLASSES[1:], _COLOURS, strict=True)),
        title="medjax.data.synthetic_cardiac.cardiac_phantom: the same anatomy in MR (left) and "
        "CT (right)",
        dpi=80,
    )


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", default="cardiac_phantoms.png", help="output PNG path")
    args = parser.parse_args(argv)
    print(save_figure(args.figure))


if __name__ == "__main__":
    _main()
