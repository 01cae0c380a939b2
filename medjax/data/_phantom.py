"""Shared host-side helpers of the analytic phantoms (synthetic_cardiac, _headneck, _abdomen).

Geometry is in millimetres: a grid of voxel centres is built from ``shape`` and ``spacing``, organs
are signed-distance functions (negative inside) of those coordinates, and smooth random fields are
sums of plane waves, so that a subject drawn from a seed does not depend on the output resolution.
"""

import math

import numpy as np
from scipy import ndimage


def check_shape(shape, minimum):
    """``shape`` as a tuple of 3 ints, each at least ``minimum``; ValueError otherwise."""
    msg = f"shape: expected 3 sizes >= {tuple(minimum)}, got {shape!r}"
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if len(shape) != 3 or any(s < m for s, m in zip(shape, minimum, strict=True)):
        raise ValueError(msg)
    return shape


def check_spacing(spacing, shape, fov):
    """Voxel size (3,) in mm: ``spacing`` checked, or ``fov / shape`` when it is None."""
    if spacing is None:
        return tuple(float(f) / n for f, n in zip(fov, shape, strict=True))
    msg = f"spacing: expected 3 positive voxel sizes in mm, got {spacing!r}"
    try:
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(msg)
    return spacing


def check_seed(seed):
    """A dataset's base seed as a non-negative int; ValueError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    return int(seed)


def check_count(n, name="n"):
    """A number of subjects as a non-negative int; ValueError otherwise."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {n!r}")
    return int(n)


def axes_mm(shape, spacing, signs=(1.0, 1.0, 1.0)):
    """Centred mm coordinate of the voxels along each axis (a list of 3 float32 vectors).

    ``signs[k] = -1`` makes coordinate k decrease with the index (e.g. rows running downwards).
    """
    return [
        (sg * (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).astype(np.float32)
        for n, s, sg in zip(shape, spacing, signs, strict=True)
    ]


def grid(axes):
    """Coordinates of every voxel, (*S, 3) float32, from the per-axis coordinates ``axes``."""
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def template_points(p, axes, centre=(0.0, 0.0, 0.0)):
    """Template coordinates (*S, 3) float32 of every voxel of one subject.

    The subject's voxel centres (``axes``, mm) move by its smooth deformation (``p["deform"]``
    waves times ``p["deform_mm"]``), then its inverse pose: ``(x - shift) @ rotation / scale``,
    plus ``centre``, the template point at the middle of the field of view.
    """
    g = grid(axes) + wave_grid(p["deform"], axes) * np.float32(p["deform_mm"])
    q = ((g - np.asarray(p["shift"], np.float32)) @ np.asarray(p["rotation"], np.float32)) / p[
        "scale"
    ]
    return q + np.asarray(centre, np.float32)


def waves(rng, n, wavelength_lo, wavelength_hi, out=1):
    """Random plane waves (wave vectors (n, 3) in rad/mm, phases, amplitudes) of unit variance."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = 2.0 * np.pi / rng.uniform(wavelength_lo, wavelength_hi, size=(n, 1))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(out, n))
    amp = rng.normal(size=(out, n)) / np.sqrt(0.5 * n)
    return direction * k, phase, amp


def wave_grid(params, axes):
    """Plane waves evaluated on the grid spanned by ``axes`` -> (*S, out) float32.

    Separable: exp(i w.p) is a product of one 1-D exponential per axis.
    """
    w, phase, amp = params
    e = [np.exp(1j * np.outer(w[:, k], axes[k])).astype(np.complex64) for k in range(3)]
    coef = (amp * np.exp(1j * phase)).astype(np.complex64)  # (out, n)
    n, a, b = w.shape[0], len(axes[0]), len(axes[1])
    ab = (e[0][:, :, None] * e[1][:, None, :]).reshape(n, a * b)
    out = np.einsum("nq,onc->qco", ab, coef[:, :, None] * e[2][None], optimize=True).real
    return np.ascontiguousarray(out.reshape(a, b, -1, coef.shape[0]), dtype=np.float32)


def rotation(angles):
    """Rotation matrix from three angles (radians) about axes 0, 1, 2."""
    out = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        out = r @ out
    return out


def frame(u):
    """Orthonormal frame (3, 3) whose first column is the unit vector along ``u``."""
    u = np.asarray(u, float) / np.linalg.norm(u)
    helper = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    v = np.cross(u, helper)
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


def ellipsoid(q, centre, radii, axes=None):
    """Approximate signed distance in mm (negative inside) to an ellipsoid; q (..., 3).

    ``axes`` (3, 3), if given, holds the ellipsoid's principal directions as columns.
    """
    radii = np.asarray(radii, np.float32)
    rel = q - np.asarray(centre, np.float32)
    if axes is None:
        rel = rel * (1.0 / radii)
    else:
        rel = rel @ (np.asarray(axes, np.float32) / radii)
    return (np.sqrt(np.einsum("...i,...i->...", rel, rel)) - 1.0) * float(radii.min())


def tube(q, points, radii):
    """Signed distance in mm to a tube around the polyline ``points`` (k, d); q (..., d).

    ``radii`` is one radius or one per point (linearly interpolated along each segment).
    """
    points = np.asarray(points, np.float32)
    radii = np.broadcast_to(np.asarray(radii, np.float32), (len(points),))
    out = np.full(q.shape[:-1], np.inf, np.float32)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
        ab = b - a
        ab2 = float(ab @ ab)
        qa = q - a
        proj = qa @ ab
        t = np.clip(proj / ab2, 0.0, 1.0)
        d2 = np.einsum("...i,...i->...", qa, qa) - t * (2.0 * proj - t * ab2)
        d = np.sqrt(np.maximum(d2, 0.0)) - (ra + t * (rb - ra))
        np.minimum(out, d, out=out)
    return out


def bezier(points, n):
    """``n`` points (n, 3) along the quadratic Bezier curve with control ``points`` (3, 3)."""
    p0, p1, p2 = (np.asarray(p, float) for p in points)
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def correlated_noise(seed, shape, sigma_voxels):
    """Unit-variance Gaussian noise (*S) float32, smoothed by ``sigma_voxels`` (CT-like grain)."""
    noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    if sigma_voxels:
        noise = ndimage.gaussian_filter(noise, sigma_voxels, mode="wrap")
    return noise / max(float(noise.std()), 1e-6)


def blur(img, sigma_mm, spacing):
    """Gaussian blur of ``img`` with a point-spread ``sigma_mm`` (scalar or (3,)) in mm."""
    sigma = np.asarray(sigma_mm, np.float32) / np.asarray(spacing, np.float32)
    return ndimage.gaussian_filter(img, np.broadcast_to(sigma, (3,)), mode="nearest")


#: The CT window W 400 / L 40 HU in the CT phantoms' intensity units, (HU + 100) / 1000
CT_WINDOW = ((40.0 - 200.0 + 100.0) / 1000.0, (40.0 + 200.0 + 100.0) / 1000.0)


#: how the CT previews are oriented (radiological convention)
PATIENT_LEFT = "patient left on the right"


def ct_preview(path, phantoms, axial, coronal_ids, colours, names, *, title, panel_size):
    """A CT phantom preview written to ``path``: a row per phantom (``phantoms``: seed -> the
    phantom's dict), in it for each ``(name, label ids)`` of ``axial`` the axial slice with most
    of those labels, then the coronal slice with most of ``coronal_ids``; label contours in
    ``colours`` (label k in ``colours[k - 1]``, named ``names[k - 1]`` in the legend), the W400/L40
    window."""
    from medjax import figures as F

    rows = [_ct_row(F, out, axial, coronal_ids, colours, seed) for seed, out in phantoms.items()]
    legend = dict(zip(names, colours, strict=True))
    return F.panel_grid(path, rows, panel_size=panel_size, legend=legend, title=title, dpi=80)


def _ct_row(F, out, axial, coronal_ids, colours, seed):
    img, lab = out["image"], out["label"]
    window = dict(vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], contour_colors=colours)
    row = []
    for name, ids in axial:
        z = int(np.argmax(np.isin(lab, ids).sum(axis=(1, 2))))
        title = f"seed {seed} {name} (z {z})"
        row.append(F.Panel(F.rows_down(img[z]), title, contours=F.rows_down(lab[z]), **window))
    col = int(np.argmax(np.isin(lab, coronal_ids).sum(axis=(0, 2))))
    row.append(
        F.Panel(
            F.rows_down(img[::-1, col]),
            "coronal",
            contours=F.rows_down(lab[::-1, col]),
            aspect=out["spacing"][0] / out["spacing"][2],
            **window,
        )
    )
    return row
