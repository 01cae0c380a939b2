"""Synthetic abdominal CT phantom and partially labelled single-organ datasets (co-training).

Each seed draws one upper abdomen: body wall (subcutaneous fat, muscle, ribs), lung bases and heart
above a diaphragm dome, spine and back muscles, psoas, aorta and inferior vena cava, portal and
splenic veins, stomach (with a gas cap), duodenal C-loop, colon and small-bowel loops (with gas) in
visceral fat, gallbladder, and four labelled organs of very different sizes
(:data:`ABDOMEN_CLASSES`):

====  ========  ===============================================================  ===============
 id   organ     model                                                            volume (cm3)
====  ========  ===============================================================  ===============
 1    liver     right lobe + left lobe, cut by the diaphragm                     ~1350
 2    kidney    both kidneys share the class: cortex and medulla, a sinus hilum  ~2 x 100
 3    spleen    tilted ellipsoid, concave hilum, against the left lateral wall   ~130
 4    pancreas  tube along a curve from the head (in the duodenal loop) to the   ~75
                tail (at the splenic hilum), flattened, tapered
====  ========  ===============================================================  ===============

Volumes are means over seeds 0-29 at the default shape; the liver is 12-29x the pancreas.

Contrast is that of portal-venous CT: liver ~105 HU, spleen ~115, kidney cortex ~170 and medulla
~110, pancreas ~90 (low contrast against the duodenum and bowel, ~55), vessels ~150-180, fat -100,
bone bright, gas dark, with 10-20 HU correlated noise. The image is ``(HU + 100) / 1000``, the same
scale as :mod:`medjax.data.synthetic_headneck`.

:func:`partial_label_datasets` mimics LiTS / KiTS / Pancreas-CT-style data: disjoint subjects, and
in each dataset only its own organ(s) labelled, every other organ being background although it is
in the image. :func:`full_label_testset` gives fully labelled subjects disjoint from those.

Geometry is in millimetres on a fixed field of view :data:`FOV_MM` (192 x 320 x 320 mm; 6 x 5 x 5
mm voxels at the default 32 x 64 x 64), so the same seed gives the same subject at any ``shape``.
Axis 0 runs inferior to superior, axis 1 anterior to posterior (image rows), axis 2 from the
patient's right to left (image columns, radiological display).

Run ``python -m medjax.data.synthetic_abdomen --figure /tmp/abdomen.png`` to draw a few phantoms.
"""

import argparse

import numpy as np

from medjax.data import _phantom as ph

__all__ = [
    "ABDOMEN_CLASSES",
    "ABDOMEN_ORGANS",
    "FOV_MM",
    "abdomen_phantom",
    "full_label_testset",
    "partial_label_datasets",
    "save_figure",
]

ABDOMEN_CLASSES = ("background", "liver", "kidney", "spleen", "pancreas")
ABDOMEN_ORGANS = ABDOMEN_CLASSES[1:]
FOV_MM = (192.0, 320.0, 320.0)
_MIN_SHAPE = (8, 24, 24)
_LIVER, _KIDNEY, _SPLEEN, _PANCREAS = 1, 2, 3, 4

(
    _AIR,
    _LUNG,
    _FAT,
    _MUSCLE,
    _BONE,
    _SPONGY,
    _DISC,
    _HEART,
    _BLOOD_ART,
    _BLOOD_VEN,
    _FLUID,
    _BOWEL,
    _STOOL,
    _LIVER_T,
    _SPLEEN_T,
    _CORTEX,
    _MEDULLA,
    _SINUS,
    _PANCREAS_T,
) = range(19)
_HU = np.array(
    [-1000, -850, -100, 55, 700, 230, 90, 45, 180, 150, 12, 55, -150, 105, 115, 170, 110, -60, 90],
    np.float32,
)


# --------------------------------------------------------------------------------------------------
# subject draws


def _draw_subject(rng):
    """All random parameters of one subject; independent of the output shape."""
    p = {}
    p["rotation"] = ph.rotation(np.deg2rad(rng.normal(0.0, [2.0, 2.0, 4.0])))
    p["scale"] = float(np.exp(rng.normal(0.0, 0.04)))
    p["shift"] = rng.normal(0.0, [6.0, 4.0, 4.0])
    p["deform"] = ph.waves(rng, 8, 80.0, 200.0, out=3)
    p["deform_mm"] = rng.uniform(2.0, 5.0)
    p["body"] = rng.uniform([135.0, 100.0], [155.0, 120.0])
    p["subcutaneous"] = rng.uniform(8.0, 25.0)
    p["dome"] = rng.uniform(72.0, 88.0)
    p["rib_phase"] = rng.uniform(0.0, 2.0 * np.pi)
    for name in ("liver", "left_lobe", "kidney_l", "kidney_r", "spleen", "pancreas", "stomach"):
        p[f"size_{name}"] = np.exp(rng.normal(0.0, 0.07, size=3))
        p[f"jitter_{name}"] = rng.normal(0.0, 4.0, size=3)
    p["pancreas_bend"] = rng.normal(0.0, 6.0, size=3)
    p["stomach_gas"] = rng.uniform(0.2, 0.7)
    p["bowel"] = ph.waves(rng, 16, 50.0, 90.0, out=2)
    p["bowel_gas"] = rng.uniform(1.0, 1.6)
    # appearance
    p["hu_shift"] = rng.normal(0.0, 6.0, size=len(_HU))
    p["enhancement"] = rng.uniform(0.85, 1.15)
    p["texture"] = ph.waves(rng, 24, 6.0, 14.0)
    p["texture_hu"] = rng.uniform(3.0, 7.0)
    p["psf_mm"] = rng.uniform(1.5, 2.5)
    p["noise_hu"] = rng.uniform(10.0, 20.0)
    p["noise_seed"] = int(rng.integers(2**31))
    return p


def _organ(p, name, centre, radii):
    return np.asarray(centre, float) + p[f"jitter_{name}"], np.asarray(radii, float) * p[
        f"size_{name}"
    ]


def _superellipse(x, y, hx, hy, n=2.5):
    """Approximate signed distance (mm) to a super-ellipse |x/hx|^n + |y/hy|^n = 1."""
    r = (np.abs(x / hx) ** n + np.abs(y / hy) ** n) ** (1.0 / n)
    return (r - 1.0) * min(hx, hy)


# --------------------------------------------------------------------------------------------------
# rendering


def _anatomy(p, axes):
    """Tissue and label (*S) int32 maps of one subject, all organs labelled."""
    q = ph.template_points(p, axes)
    z, y, x = q[..., 0], q[..., 1], q[..., 2]
    tissue = np.full(q.shape[:-1], _AIR, np.int32)
    label = np.zeros(q.shape[:-1], np.int32)

    def paint(mask, t, lab=0):
        """Draw tissue t with label lab (background by default) over ``mask``."""
        tissue[mask] = t
        label[mask] = lab

    # body wall: subcutaneous fat, muscle, ribs; cavity of visceral fat; spine and back muscles
    hx, hy = p["body"]
    body = _superellipse(x, y + 5.0, hx, hy)
    wall = p["subcutaneous"]
    cavity_sdf = _superellipse(x, y + 5.0, hx - wall - 10.0, hy - wall - 10.0)
    paint(body < 0, _FAT)
    paint(body < -wall, _MUSCLE)
    ribs = (body < -wall - 3.0) & (cavity_sdf > 1.0) & (z > -30.0) & (y < 40.0)
    paint(ribs & (np.cos(2.0 * np.pi * z / 32.0 + p["rib_phase"]) > 0.5), _BONE)
    spine_block = (np.abs(x) < 50.0) & (y < -40.0)
    cavity = (cavity_sdf < 0) & ~spine_block
    paint(cavity, _FAT)
    vertebra = _superellipse(x, y + 62.0, 22.0, 19.0, n=2.0)
    paint(vertebra < 0, _BONE)
    paint(vertebra < -2.5, _SPONGY)
    paint((vertebra < 0) & (np.abs(((z + 200.0) % 32.0) - 16.0) > 12.5), _DISC)
    arch = np.sqrt(x**2 + (y + 95.0) ** 2)
    gaps = np.cos(2.0 * np.pi * z / 32.0) > -0.4
    paint((arch < 17.0) & (arch > 9.0) & gaps, _BONE)
    paint(arch < 9.0, _FLUID)
    paint(ph.tube(q[..., 1:], [[-110.0, 0.0], [-95.0, 0.0]], 5.0) < 0, _BONE)  # spinous process
    psoas_r = 8.0 + 0.18 * np.clip(30.0 - z, 0.0, None)
    for s in (-1.0, 1.0):
        paint(np.sqrt((x - 35.0 * s) ** 2 + (y + 45.0) ** 2) < psoas_r, _MUSCLE)

    # thorax above the diaphragm dome: lungs and heart
    dome = p["dome"] - 0.0012 * x**2 + 0.3 * np.clip(y + 20.0, None, 0.0)
    thorax = cavity & (z > dome)
    paint(thorax, _LUNG)
    heart = ph.ellipsoid(q, (p["dome"] + 45.0, 15.0, 15.0), (60.0, 60.0, 65.0))
    paint(thorax & (heart < 0), _HEART)
    paint((cavity_sdf < 0) & (np.abs(z - dome) < 3.0), _MUSCLE)
    below = cavity & (z < dome - 3.0)

    # hollow organs: stomach, colon, small bowel, duodenum
    sc, sr = _organ(p, "stomach", (50.0, 35.0, 45.0), (40.0, 35.0, 40.0))
    stomach = ph.ellipsoid(q, sc, sr)
    paint((stomach < 0) & below, _BOWEL)
    content = (stomach < -4.0) & below
    paint(content, _FLUID)
    paint(content & (y > sc[1] + (1.0 - 2.0 * p["stomach_gas"]) * sr[1] * 0.8), _AIR)
    colon_path = [
        [-90.0, 10.0, -95.0],
        [-20.0, 20.0, -95.0],
        [5.0, 55.0, -60.0],
        [-5.0, 65.0, 0.0],
        [10.0, 50.0, 70.0],
        [20.0, 10.0, 95.0],
        [-90.0, 5.0, 95.0],
    ]
    colon = ph.tube(q, colon_path, 20.0)
    paint((colon < 0) & below, _BOWEL)
    paint((colon < -3.0) & below, _STOOL)
    paint((colon < -6.0) & below & (y > 10.0), _AIR)
    f = ph.wave_grid(p["bowel"], axes)
    loops = below & (z < 0.0) & (y > -20.0) & (f[..., 0] > 0.1) & (colon > 0)
    paint(loops, _BOWEL)
    paint(loops & (f[..., 0] > 0.45), _FLUID)
    paint(loops & (f[..., 0] > 0.45) & (f[..., 1] > p["bowel_gas"]), _AIR)
    duodenum_path = [
        [10.0, 15.0, -30.0],
        [0.0, 10.0, -55.0],
        [-35.0, 10.0, -55.0],
        [-45.0, 15.0, -15.0],
        [-35.0, 20.0, 15.0],
    ]
    duodenum = ph.tube(q, duodenum_path, 11.0)
    paint((duodenum < 0) & below, _BOWEL)
    paint((duodenum < -4.0) & below, _FLUID)

    # great vessels
    aorta = np.sqrt((x - 15.0) ** 2 + (y + 30.0) ** 2) - 11.0
    ivc = np.sqrt((x + 22.0) ** 2 + (y + 25.0) ** 2) - 11.0
    paint(((aorta < 0) | (ivc < 0)) & (z < dome), _BLOOD_ART)
    paint((ivc < 0) & (z < dome), _BLOOD_VEN)

    # solid organs: liver, kidneys, spleen, pancreas
    lc, lr = _organ(p, "liver", (35.0, 0.0, -62.0), (82.0, 90.0, 75.0))
    llc, llr = _organ(p, "left_lobe", (52.0, 40.0, 15.0), (32.0, 45.0, 60.0))
    liver = np.minimum(ph.ellipsoid(q, lc, lr), ph.ellipsoid(q, llc, llr))
    liver_mask = (liver < 0) & below & (cavity_sdf < -2.0)
    paint(liver_mask, _LIVER_T, _LIVER)
    paint((ph.ellipsoid(q, lc + (-60.0, 40.0, 20.0), (25.0, 15.0, 14.0)) < 0) & liver_mask, _FLUID)
    for s, name, zc in ((1.0, "kidney_l", 0.0), (-1.0, "kidney_r", -15.0)):
        kc, kr = _organ(p, name, (zc, -45.0, 62.0 * s), (57.0, 26.0, 31.0))
        k_axes = ph.rotation((np.deg2rad(30.0 * s), np.deg2rad(-12.0 * s), 0.0))
        kidney = ph.ellipsoid(q, kc, kr, k_axes)
        sinus = ph.ellipsoid(q, kc + (0.0, 8.0, -20.0 * s), (25.0, 9.0, 11.0))
        kid = (kidney < 0) & (sinus > 0) & (body < -wall)
        paint((kidney < 4.0) & (body < -wall) & ~spine_block & (label == 0), _FAT)  # perirenal
        paint(kid, _CORTEX, _KIDNEY)
        paint(kid & (kidney < -6.0), _MEDULLA)
        paint((kidney < 0) & (sinus < 0), _SINUS)
        if s > 0:
            kidney_l = kidney
    # the spleen hugs the left postero-lateral wall, above the left kidney (renal impression)
    lateral = hx - wall - 10.0 - 30.0
    spc, spr = _organ(p, "spleen", (45.0, -30.0, lateral), (55.0, 52.0, 25.0))
    spleen_axes = ph.rotation((np.deg2rad(35.0), 0.0, 0.0))
    spleen = np.maximum(
        ph.ellipsoid(q, spc, spr, spleen_axes),
        -ph.ellipsoid(q, spc + (0.0, 22.0, -30.0), (40.0, 25.0, 14.0)),
    )
    spleen_mask = (spleen < 0) & below & (cavity_sdf < -2.0) & (kidney_l > 4.0)
    paint(spleen_mask & (label == 0), _SPLEEN_T, _SPLEEN)
    b = p["pancreas_bend"]
    pc = p["jitter_pancreas"]
    ctrl = np.array([[-20.0, 5.0, -25.0], [0.0, 40.0, 15.0], [20.0, -5.0, 68.0]]) + pc
    ctrl[1] += b
    centre = ph.bezier(ctrl, 12)
    radii = np.interp(np.linspace(0.0, 1.0, 12), [0.0, 0.5, 1.0], [21.0, 14.0, 11.0])
    flat = np.array([1.0, 1.0 / 0.8, 1.0], np.float32)  # flattened antero-posteriorly
    pancreas = ph.tube(q * flat, centre * flat, radii * p["size_pancreas"].mean())
    free = (label == 0) | (label == _LIVER)  # the pancreas indents the liver
    paint((pancreas < 0) & below & free, _PANCREAS_T, _PANCREAS)

    # veins over the organs: portal vein into the liver hilum, splenic vein behind the pancreas
    confluence = centre[4] + (0.0, -8.0, 0.0)
    portal = ph.tube(q, [confluence, lc + (-15.0, 15.0, 25.0)], 7.0)
    splenic = ph.tube(q, [c + (0.0, -15.0, 0.0) for c in centre[4:]], 4.5)
    free = (label != _KIDNEY) & (label != _SPLEEN)
    paint(((portal < 0) | (splenic < 0)) & below & free, _BLOOD_VEN)
    return tissue, label


def _appearance(p, tissue, axes, spacing):
    """CT image (*S) float32, ``(HU + 100) / 1000``, of a tissue map."""
    hu = _HU + p["hu_shift"].astype(np.float32)
    enhanced = [_BLOOD_ART, _BLOOD_VEN, _CORTEX, _MEDULLA, _LIVER_T, _SPLEEN_T, _PANCREAS_T]
    hu[enhanced] = 40.0 + (hu[enhanced] - 40.0) * p["enhancement"]
    hu[_AIR] = -1000.0
    img = hu[tissue] + p["texture_hu"] * ph.wave_grid(p["texture"], axes)[..., 0]
    img = ph.blur(img, (0.4 * spacing[0], p["psf_mm"], p["psf_mm"]), spacing)
    img = img + p["noise_hu"] * ph.correlated_noise(p["noise_seed"], img.shape, 0.7)
    return ((img + 100.0) / 1000.0).astype(np.float32)


def abdomen_phantom(seed, shape=(32, 64, 64), *, spacing=None):
    """One synthetic abdominal CT with liver, kidneys, spleen and pancreas labelled.

    Args:
      seed: int, sequence of ints or ``numpy.random.SeedSequence`` seeding a
        ``numpy.random.Generator``; the subject depends on it only, not on ``shape``.
      shape: (D, H, W); axis 0 inferior to superior, 1 anterior to posterior, 2 patient right to
        left. At least (8, 24, 24).
      spacing: voxel size (3,) in mm; default ``FOV_MM / shape`` (6 x 5 x 5 mm at the default).

    Returns:
      dict with ``image`` (D, H, W) float32 ``(HU + 100) / 1000``, ``label`` (D, H, W) int32 in
      :data:`ABDOMEN_CLASSES` (0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas) and
      ``spacing`` (3,) float32 mm.
    """
    shape = ph.check_shape(shape, _MIN_SHAPE)
    spacing = ph.check_spacing(spacing, shape, FOV_MM)
    p = _draw_subject(np.random.default_rng(seed))
    axes = ph.axes_mm(shape, spacing, signs=(1.0, -1.0, 1.0))
    tissue, label = _anatomy(p, axes)
    return {
        "image": _appearance(p, tissue, axes, spacing),
        "label": label,
        "spacing": np.asarray(spacing, np.float32),
    }


# --------------------------------------------------------------------------------------------------
# partially labelled datasets


def _organ_ids(organs):
    """Each dataset's organs (names or tuples of names) -> tuple of sorted class ids."""
    if isinstance(organs, str):
        organs = (organs,)
    out = []
    for entry in organs:
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        bad = [n for n in names if n not in ABDOMEN_ORGANS]
        if not names or bad:
            raise ValueError(
                f"organs: expected names (or tuples of names) from {ABDOMEN_ORGANS}, got {entry!r}"
            )
        out.append(tuple(sorted({ABDOMEN_CLASSES.index(n) for n in names})))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"organs: expected a non-empty list of distinct datasets, got {organs!r}")
    return out


def partial_label_datasets(
    seed, n_per_dataset, shape=(32, 64, 64), organs=ABDOMEN_ORGANS, *, spacing=None
):
    """Single-organ datasets of disjoint subjects: ``{dataset name: [entry, ...]}``.

    Dataset k keeps only the labels of ``organs[k]`` (a name, or a tuple of names for a
    multi-organ dataset, named ``"a+b"``); every other organ is background although it is drawn in
    the image, as in LiTS / KiTS / Pancreas-CT. Subject ``i`` of a dataset is seeded by
    ``(seed, 100 + mask, i)``, ``mask`` being the bit mask of its class ids, so that subjects differ
    between datasets and from :func:`full_label_testset`, and a dataset is the same whatever the
    other datasets are.

    Each entry is a dict with ``image`` and ``label`` (as :func:`abdomen_phantom`), ``annotated``
    (the tuple of class ids labelled in it), ``dataset`` (its name) and ``seed`` (the tuple that
    :func:`abdomen_phantom` takes to regenerate the subject with all its labels).
    """
    seed = ph.check_seed(seed)
    n = ph.check_count(n_per_dataset, "n_per_dataset")
    datasets = {}
    for ids in _organ_ids(organs):
        name = "+".join(ABDOMEN_CLASSES[c] for c in ids)
        mask = sum(1 << c for c in ids)
        entries = []
        for i in range(n):
            s = (seed, 100 + mask, i)
            out = abdomen_phantom(s, shape, spacing=spacing)
            lab = out["label"]
            out["label"] = np.where(np.isin(lab, ids), lab, 0).astype(np.int32)
            entries.append({**out, "annotated": ids, "dataset": name, "seed": s})
        datasets[name] = entries
    return datasets


def full_label_testset(seed, n, shape=(32, 64, 64), *, spacing=None):
    """``n`` fully labelled subjects seeded by ``(seed, 0, i)``, disjoint from the training sets.

    Entries are shaped as in :func:`partial_label_datasets`, with ``annotated == (1, 2, 3, 4)``
    and ``dataset == "test"``.
    """
    seed = ph.check_seed(seed)
    n = ph.check_count(n)
    ids = tuple(range(1, len(ABDOMEN_CLASSES)))
    out = []
    for i in range(n):
        s = (seed, 0, i)
        out.append(
            {
                **abdomen_phantom(s, shape, spacing=spacing),
                "annotated": ids,
                "dataset": "test",
                "seed": s,
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# figure

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#ffe119")


def save_figure(path, seeds=(0, 1, 2), shape=(32, 64, 64)):
    """Draw axial slices through each organ and a coronal slice of a few phantoms."""
    axial = [(name, (k + 1,)) for k, name in enumerate(ABDOMEN_ORGANS)]
    return ph.ct_preview(
        path,
        {seed: abdomen_phantom(seed, shape) for seed in seeds},
        axial,
        (1, 3),
        _COLOURS,
        ABDOMEN_ORGANS,
        title=f"medjax.data.synthetic_abdomen.abdomen_phantom (window W400/L40; {ph.PATIENT_LEFT})",
        panel_size=(2.4, 2.5),
    )


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", default="abdomen_phantoms.png", help="output PNG path")
    args = parser.parse_args(argv)
    print(save_figure(args.figure))


if __name__ == "__main__":
    _main()
