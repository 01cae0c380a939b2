"""Synthetic head & neck CT phantom with the 9 PDDCA organs at risk, for FocusNetV2.

Each seed draws one head: skin and subcutaneous fat, skull, brain and cerebellum, CSF cisterns,
eyes in orbital fat, nasal cavity and sinuses (air), maxilla and teeth, pharyngeal airway, cervical
spine and spinal cord, parapharyngeal and submandibular fat, and the organs of
:data:`medjax.data.datasets.PDDCA_STRUCTURES` (label id = position + 1):

=====  =================  ==========================================================
 id    organ              model
=====  =================  ==========================================================
 1     BrainStem          tapered tube (midbrain, pons, medulla) in a CSF sheath
 2     Chiasm             flat ellipsoid in the suprasellar cistern (tiny)
 3     Mandible           bony horseshoe (body) + rami + condyles, cortex and marrow
 4, 5  OpticNerve_L/R     tubes ~5 mm across from the globe to the chiasm (tiny)
 6, 7  Parotid_L/R        fatty gland behind the ramus (superficial + deep lobe)
 8, 9  Submandibular_L/R  gland medial to the mandible body
=====  =================  ==========================================================

Contrast is that of CT: bone and teeth are bright, air is dark, and the soft-tissue organs differ
from the surrounding muscle, brain or CSF by only a few tens of HU (brainstem 29 vs brain 36,
parotid ~14 vs muscle 48, submandibular 38), with correlated noise of 12-25 HU on top. The image is
``(HU + 100) / 1000``, the normalisation of FocusNetV2.

Volumes at the default 32 x 96 x 96 (4 x 2.5 x 2.5 mm voxels), mean over seeds 0-49: mandible
75 cm3, brainstem 26, parotids 21, submandibular glands 7, optic nerves 0.8 and chiasm 0.4 cm3.
The mean large organ (:data:`LARGE_ORGANS`) is ~40x (26-51x) the mean tiny one
(:data:`SMALL_ORGANS`), and the mandible ~180x (110-580x) the chiasm. That is realistic for these
9 organs; the ~1000x quoted for head & neck OARs includes the lenses and the pituitary, which
PDDCA does not label.

Geometry is in millimetres on a fixed field of view :data:`FOV_MM` (128 x 240 x 240 mm) from below
the submandibular glands to above the chiasm, so the same seed gives the same subject at any
``shape``. Axis 0 runs inferior to superior, axis 1 anterior to posterior (image rows), axis 2 from
the patient's right to left (image columns, radiological display): ``*_L`` organs lie at larger
axis-2 indices than ``*_R`` ones.

Some organs can be left unannotated (``unannotated_prob`` or ``unannotated``), as in PDDCA: they
are still drawn in the image, but their voxels get label 0 and their ``presence`` entry is 0.

Run ``python -m medjax.data.synthetic_headneck --figure /tmp/headneck.png`` to draw a few phantoms.
"""

import argparse

import numpy as np

from medjax.data import _phantom as ph
from medjax.data.datasets import PDDCA_STRUCTURES

__all__ = [
    "FOV_MM",
    "HEADNECK_STRUCTURES",
    "LARGE_ORGANS",
    "SMALL_ORGANS",
    "headneck_phantom",
    "save_figure",
]

HEADNECK_STRUCTURES = PDDCA_STRUCTURES
SMALL_ORGANS = (2, 4, 5)
LARGE_ORGANS = (1, 3, 6, 7, 8, 9)
FOV_MM = (128.0, 240.0, 240.0)
_MIN_SHAPE = (16, 32, 32)
_ID = {name: i + 1 for i, name in enumerate(PDDCA_STRUCTURES)}

(
    _AIR,
    _FAT,
    _MUSCLE,
    _BRAIN,
    _CSF,
    _BONE,
    _SPONGY,
    _EYE,
    _CORD,
    _DISC,
    _TEETH,
    _CORTEX,
    _MARROW,
    _BRAINSTEM,
    _CHIASM,
    _NERVE,
    _SUBMANDIBULAR,
    _PAROTID_L,
    _PAROTID_R,
) = range(19)
# Mean HU of each tissue above (the parotids' own density is drawn per subject and side).
_HU = np.array(
    [-1000, -95, 48, 36, 6, 1000, 280, 12, 34, 85, 1800, 1150, 330, 29, 33, 31, 38, 14, 14],
    np.float32,
)
_SOFT = (_FAT, _MUSCLE, _BRAIN, _CSF, _EYE, _CORD, _BRAINSTEM, _CHIASM, _NERVE, _SUBMANDIBULAR)

# FOV centre in the template frame (mm; z from the orbits' centre upwards, y anterior, x left).
_CENTRE = np.array([-48.0, -5.0, 0.0])
# head outline: z level -> (half width x, half depth y, centre y)
_OUTLINE_Z = np.array([-130.0, -115.0, -90.0, -60.0, -30.0, 0.0, 30.0])
_OUTLINE = np.array(
    [
        [52, 60, -18],
        [55, 65, -15],
        [62, 78, -5],
        [66, 85, -8],
        [70, 95, -10],
        [72, 95, -8],
        [72, 95, -8],
    ],
    np.float32,
)


# --------------------------------------------------------------------------------------------------
# subject draws


def _draw_subject(rng):
    """All random parameters of one subject; independent of the output shape and of presence."""
    p = {}
    p["rotation"] = ph.rotation(np.deg2rad(rng.normal(0.0, 2.0, size=3)))
    p["scale"] = float(np.exp(rng.normal(0.0, 0.03)))
    p["shift"] = rng.normal(0.0, 3.0, size=3)
    p["deform"] = ph.waves(rng, 8, 60.0, 140.0, out=3)
    p["deform_mm"] = rng.uniform(1.5, 3.0)
    p["outline"] = np.exp(rng.normal(0.0, 0.04, size=2))
    p["subcutaneous"] = rng.uniform(4.0, 9.0)
    # organs: size factors and position jitter (mm), left and right drawn independently
    for name in PDDCA_STRUCTURES:
        p[f"size_{name}"] = np.exp(rng.normal(0.0, 0.07, size=3))
        p[f"jitter_{name}"] = rng.normal(0.0, 2.0, size=3)
    p["nerve_radius"] = rng.uniform(2.1, 2.7, size=2)
    p["mandible_ab"] = np.exp(rng.normal(0.0, 0.04, size=2))
    # appearance
    p["hu_shift"] = rng.normal(0.0, 6.0, size=len(_HU))
    p["parotid_hu"] = rng.uniform(-5.0, 30.0, size=2)
    p["texture"] = ph.waves(rng, 24, 3.0, 8.0)
    p["texture_hu"] = rng.uniform(3.0, 6.0)
    p["psf_mm"] = rng.uniform(0.8, 1.4)
    p["noise_hu"] = rng.uniform(12.0, 25.0)
    p["noise_seed"] = int(rng.integers(2**31))
    p["presence_draw"] = rng.uniform(size=len(PDDCA_STRUCTURES))
    return p


def _organ(p, name, centre, radii, side=1.0):
    """Jittered centre and radii of a (mirrored by ``side``) organ ellipsoid."""
    centre = np.array(centre, float) + p[f"jitter_{name}"]
    centre[2] *= side
    return centre, np.asarray(radii, float) * p[f"size_{name}"]


# --------------------------------------------------------------------------------------------------
# rendering


def _anatomy(p, axes):
    """Tissue and label (*S) int32 maps of one subject, all organs annotated."""
    q = ph.template_points(p, axes, _CENTRE)
    z, y, x = q[..., 0], q[..., 1], q[..., 2]
    ax_ = np.abs(x)
    tissue = np.full(q.shape[:-1], _AIR, np.int32)
    label = np.zeros(q.shape[:-1], np.int32)

    def paint(mask, t, lab=0):
        """Draw tissue t with label lab (background by default) over ``mask``."""
        tissue[mask] = t
        label[mask] = lab

    def both(fn):
        """min over the two sides of fn(side)."""
        return np.minimum(fn(-1.0), fn(1.0))

    # head outline, subcutaneous fat, default soft tissue (muscle)
    zz = np.clip(z, _OUTLINE_Z[0], _OUTLINE_Z[-1])
    hx, hy, yc = (np.interp(zz, _OUTLINE_Z, _OUTLINE[:, k]).astype(np.float32) for k in range(3))
    hx, hy = hx * p["outline"][0], hy * p["outline"][1]
    head = (np.sqrt((x / hx) ** 2 + ((y - yc) / hy) ** 2) - 1.0) * np.minimum(hx, hy)
    head = np.minimum(head, ph.ellipsoid(q, (-15.0, 86.0, 0.0), (22.0, 14.0, 11.0)))  # nose
    paint(head < 0, _FAT)
    paint(head < -p["subcutaneous"], _MUSCLE)

    # brain, skull, posterior fossa
    floor = np.where(y > 22.0, 20.0, np.where(y > -30.0, np.where(ax_ > 22.0, -22.0, -8.0), 0.0))
    cerebrum = np.maximum(ph.ellipsoid(q, (45.0, -12.0, 0.0), (62.0, 90.0, 62.0)), floor - z)
    cerebellum = ph.ellipsoid(q, (-22.0, -55.0, 0.0), (26.0, 34.0, 48.0))
    stem_c, stem_r = _organ(p, "BrainStem", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    stem_path = np.array([[12.0, -10.0, 0.0], [-12.0, -22.0, 0.0], [-40.0, -30.0, 0.0]]) + stem_c
    stem_radii = np.array([10.0, 12.0, 8.5]) * stem_r.mean()
    qs = q * np.array([1.0, 1.0, 0.87], np.float32)  # the brainstem is wider left-right
    stem = ph.tube(qs, stem_path * (1.0, 1.0, 0.87), stem_radii)
    brain = np.minimum(np.minimum(cerebrum, cerebellum), np.where(z > -42.0, stem - 3.0, np.inf))
    inner = head < -2.0
    paint((brain < 6.0) & inner, _BONE)
    paint((brain < 0) & inner, _BRAIN)
    paint(ph.ellipsoid(q, (-8.0, 6.0, 0.0), (6.0, 9.0, 10.0)) < 0, _BONE)  # sella
    paint(ph.ellipsoid(q, (-14.0, 24.0, 0.0), (10.0, 12.0, 14.0)) < 0, _AIR)  # sphenoid sinus
    paint(ph.tube(q, [[-10.0, 2.0, 0.0], [-42.0, -16.0, 0.0]], 7.0) < 0, _BONE)  # clivus
    paint(ph.ellipsoid(q, (3.0, 5.0, 0.0), (9.0, 12.0, 16.0)) < 0, _CSF)  # suprasellar cistern

    # orbits: bony walls, orbital fat, globes, optic canals
    orbit = both(lambda s: ph.ellipsoid(q, (0.0, 48.0, 31.0 * s), (15.0, 24.0, 17.0)))
    paint((orbit < 3.5) & (y < 66.0) & inner, _BONE)
    paint(orbit < 0, _FAT)
    paint(both(lambda s: ph.ellipsoid(q, (0.0, 62.0, 32.0 * s), (12.0, 12.0, 12.0))) < 0, _EYE)
    paint(both(lambda s: ph.ellipsoid(q, (3.0, 20.0, 13.0 * s), (7.0, 6.0, 7.0))) < 0, _BONE)

    # nasal cavity and maxillary sinuses (bone-walled air), maxilla with upper teeth, palate
    sinus = both(lambda s: ph.ellipsoid(q, (-28.0, 40.0, 26.0 * s), (14.0, 17.0, 12.0)))
    nasal = ph.ellipsoid(q, (-25.0, 52.0, 0.0), (20.0, 24.0, 9.0))
    paint((np.minimum(sinus, nasal) < 2.5) & inner, _BONE)
    paint(np.minimum(sinus, nasal) < 0, _AIR)
    upper = np.sqrt((x / 34.0) ** 2 + ((y - 8.0) / 50.0) ** 2)
    arch = (np.abs(upper - 1.0) * 34.0 < 6.0) & (y > 8.0)
    paint(arch & (z > -60.0) & (z < -46.0), _BONE)
    paint(arch & (z > -60.0) & (z < -53.0) & (np.abs(upper - 1.0) * 34.0 < 4.0), _TEETH)
    paint((upper < 1.0) & (y > 8.0) & (z > -49.0) & (z < -45.0), _BONE)

    # airway, tongue/oral air gap, cervical spine, cord, fat spaces
    paint(ph.ellipsoid(q, (-62.0, 32.0, 0.0), (3.0, 24.0, 22.0)) < 0, _AIR)
    paint(ph.tube(q, [[-35.0, 14.0, 0.0], [-70.0, 10.0, 0.0], [-140.0, 18.0, 0.0]], 8.0) < 0, _AIR)
    cord_path = [[-40.0, -30.0, 0.0], [-140.0, -26.0, 0.0]]
    arches = ph.tube(q, cord_path, 15.0) < 0
    gaps = np.cos(2.0 * np.pi * (z + 50.0) / 18.0) > -0.3
    paint(arches & (z < -44.0) & gaps, _BONE)
    body = ph.tube(q, [[-50.0, -4.0, 0.0], [-140.0, 0.0, 0.0]], 10.0)
    paint(body < 0, _BONE)
    paint(body < -2.0, _SPONGY)
    paint((body < 0) & (np.abs(((z + 59.0) % 18.0) - 9.0) > 7.5), _DISC)
    paint(ph.tube(q, [[-38.0, -4.0, 0.0], [-52.0, -3.0, 0.0]], 5.0) < 0, _BONE)  # dens
    paint(ph.tube(q, cord_path, 8.5) < 0, _CSF)
    paint(ph.tube(q, cord_path, 5.5) < 0, _CORD)
    fat = both(lambda s: ph.ellipsoid(q, (-50.0, 8.0, 20.0 * s), (22.0, 10.0, 7.0)))  # parapharynx
    fat = np.minimum(fat, both(lambda s: ph.ellipsoid(q, (-52.0, 38.0, 40.0 * s), (14, 12, 10))))
    paint((fat < 0) & inner, _FAT)

    # brainstem in its CSF sheath
    paint((stem < 3.0) & (z > -42.0) & (z < 14.0), _CSF)
    paint(stem < 0, _BRAINSTEM, _ID["BrainStem"])

    # submandibular glands in fat, parotids behind the rami
    for s, name in ((1.0, "Submandibular_L"), (-1.0, "Submandibular_R")):
        c, r = _organ(p, name, (-94.0, 15.0, 30.0), (11.0, 15.0, 11.0), s)
        gland = ph.ellipsoid(q, c, r)
        paint((gland < 5.0) & inner, _FAT)
        paint(gland < 0, _SUBMANDIBULAR, _ID[name])
    for s, name in ((1.0, "Parotid_L"), (-1.0, "Parotid_R")):
        c, r = _organ(p, name, (-52.0, -28.0, 46.0), (24.0, 16.0, 13.0), s)
        deep = ph.ellipsoid(q, c + (0.0, 12.0, -13.0 * s), r * (0.58, 0.5, 0.55))
        gland = np.minimum(ph.ellipsoid(q, c, r), deep)
        paint((gland < 0) & (head < -3.0), _PAROTID_L if s > 0 else _PAROTID_R, _ID[name])

    # mandible: body (a horseshoe band), rami and condyles; cortex, marrow and lower teeth
    mc, mr = _organ(p, "Mandible", (0.0, -5.0, 0.0), (1.0, 1.0, 1.0))
    a, b = 46.0 * p["mandible_ab"][0] * mr[2], 68.0 * p["mandible_ab"][1] * mr[1]
    y0 = mc[1]
    ring = np.sqrt((x - mc[2]) ** 2 / a**2 + (y - y0) ** 2 / b**2)
    band = np.abs(ring - 1.0) * a
    zc = -84.0 + mc[0] - 0.12 * (y - y0)
    height = 13.0 * mr[0]
    front = y > y0
    body_out = front & (band < 5.0) & (np.abs(z - zc) < height)
    body_in = front & (band < 2.5) & (np.abs(z - zc) < height - 2.5)
    teeth = front & (band < 4.0) & (z > zc + height) & (z < zc + height + 7.0) & (y > y0 + 15.0)
    ramus_out = np.zeros_like(body_out)
    ramus_in = np.zeros_like(body_out)
    for s in (-1.0, 1.0):
        xr = mc[2] + s * (a + 2.0)
        seg = ph.tube(q[..., :2], [[-84.0 + mc[0], y0 - 7.0], [-35.0 + mc[0], y0 - 11.0]], 11.0)
        ramus_out |= (np.abs(x - xr) < 3.0) & (seg < 0)
        ramus_in |= (np.abs(x - xr) < 1.0) & (seg < -2.5)
        condyle = ph.ellipsoid(q, (-30.0 + mc[0], y0 - 13.0, xr + 2.0 * s), (6.0, 6.0, 10.0))
        ramus_out |= condyle < 0
        ramus_in |= condyle < -2.0
    mandible = body_out | ramus_out
    paint(teeth, _TEETH)
    paint(mandible, _CORTEX, _ID["Mandible"])
    paint(body_in | ramus_in, _MARROW, _ID["Mandible"])

    # optic nerves and chiasm, last (they are thin)
    for s, name, k in ((1.0, "OpticNerve_L", 0), (-1.0, "OpticNerve_R", 1)):
        c, _ = _organ(p, name, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), s)
        path = np.array([[0.0, 51.0, 30.0], [2.0, 32.0, 20.0], [4.0, 14.0, 8.0]]) * (1, 1, s)
        path[:2] += c  # the end at the chiasm stays put
        paint(ph.tube(q, path, p["nerve_radius"][k]) < 0, _NERVE, _ID[name])
    c, r = _organ(p, "Chiasm", (5.0, 9.0, 0.0), (2.6, 4.5, 9.0))
    c[2] = 0.0
    paint(ph.ellipsoid(q, c, r) < 0, _CHIASM, _ID["Chiasm"])
    return tissue, label


def _appearance(p, tissue, axes, spacing):
    """CT image (*S) float32, ``(HU + 100) / 1000``, of a tissue map."""
    hu = _HU.copy()
    soft = np.array(_SOFT)
    hu[soft] += p["hu_shift"][soft].astype(np.float32)
    hu[[_PAROTID_L, _PAROTID_R]] = p["parotid_hu"]
    img = hu[tissue]
    img = img + p["texture_hu"] * ph.wave_grid(p["texture"], axes)[..., 0] * (tissue != _AIR)
    sigma = (0.4 * spacing[0], p["psf_mm"], p["psf_mm"])
    img = ph.blur(img, sigma, spacing)
    img = img + p["noise_hu"] * ph.correlated_noise(p["noise_seed"], img.shape, 0.7)
    return ((img + 100.0) / 1000.0).astype(np.float32)


def _unannotated_ids(unannotated):
    if isinstance(unannotated, str | int | np.integer):
        unannotated = (unannotated,)
    ids = []
    for u in unannotated:
        k = _ID.get(u, u) if isinstance(u, str) else u
        if isinstance(k, str) or isinstance(k, bool) or not 1 <= int(k) <= len(PDDCA_STRUCTURES):
            raise ValueError(
                f"unannotated: expected names from {PDDCA_STRUCTURES} or ids 1..9, got {u!r}"
            )
        ids.append(int(k))
    return ids


def headneck_phantom(
    seed, shape=(32, 96, 96), *, spacing=None, unannotated_prob=0.0, unannotated=()
):
    """One synthetic head & neck CT with the 9 PDDCA organs at risk.

    Args:
      seed: int, sequence of ints or ``numpy.random.SeedSequence`` seeding a
        ``numpy.random.Generator``; the anatomy depends on it only (not on ``shape`` or presence).
      shape: (D, H, W); axis 0 inferior to superior, 1 anterior to posterior, 2 patient right to
        left. At least (16, 32, 32); the tiny organs need about 2.5 mm in-plane and 4 mm slices.
      spacing: voxel size (3,) in mm; default ``FOV_MM / shape`` (4 x 2.5 x 2.5 mm at the default).
      unannotated_prob: probability in [0, 1] that each organ is left unannotated (drawn from the
        seed, independently per organ).
      unannotated: names (:data:`HEADNECK_STRUCTURES`) or ids 1..9 of organs always unannotated.

    Returns:
      dict with ``image`` (D, H, W) float32 ``(HU + 100) / 1000``, ``label`` (D, H, W) int32
      (0 background and unannotated organs, 1..9 :data:`HEADNECK_STRUCTURES`), ``presence`` (9,)
      int32 (1 where organ id k + 1 is annotated) and ``spacing`` (3,) float32 mm.
    """
    shape = ph.check_shape(shape, _MIN_SHAPE)
    spacing = ph.check_spacing(spacing, shape, FOV_MM)
    prob = float(unannotated_prob)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"unannotated_prob: expected a probability in [0, 1], got {prob!r}")
    ids = _unannotated_ids(unannotated)
    p = _draw_subject(np.random.default_rng(seed))
    axes = ph.axes_mm(shape, spacing, signs=(1.0, -1.0, 1.0))
    tissue, label = _anatomy(p, axes)
    presence = (p["presence_draw"] >= prob).astype(np.int32) if prob > 0 else np.ones(9, np.int32)
    presence[np.array(ids, int) - 1] = 0
    missing = np.flatnonzero(presence == 0) + 1
    if missing.size:
        label[np.isin(label, missing)] = 0
    return {
        "image": _appearance(p, tissue, axes, spacing),
        "label": label,
        "presence": presence,
        "spacing": np.asarray(spacing, np.float32),
    }


# --------------------------------------------------------------------------------------------------
# figure

_COLOURS = (
    "#f58231",
    "#ffe119",
    "#e6194b",
    "#3cb44b",
    "#42d4f4",
    "#4363d8",
    "#911eb4",
    "#f032e6",
    "#bfef45",
)


def save_figure(path, seeds=(0, 1), shape=(32, 96, 96)):
    """Draw axial slices through each organ group and a coronal slice of a few phantoms."""
    groups = (("chiasm / optic nerves", (2, 4, 5)), ("brainstem", (1,)), ("parotids", (6, 7)))
    groups += (("mandible", (3,)), ("submandibular", (8, 9)))
    return ph.ct_preview(
        path,
        {seed: headneck_phantom(seed, shape) for seed in seeds},
        groups,
        (6, 7, 1),
        _COLOURS,
        PDDCA_STRUCTURES,
        title=f"medjax.data.synthetic_headneck.headneck_phantom (window W400/L40; {ph.PATIENT_LEFT})",
        panel_size=(2.3, 2.9),
    )


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", default="headneck_phantoms.png", help="output PNG path")
    args = parser.parse_args(argv)
    print(save_figure(args.figure))


if __name__ == "__main__":
    _main()
