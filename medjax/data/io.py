"""Medical image I/O: NIfTI, Analyze, MGH and NRRD volumes as channels-last arrays with their affine.

Every array leaves this module channels-last and in native byte order: an image is float32 ``(*S, C)``
(a 3D scalar volume becomes ``(X, Y, Z, 1)``, a 4D NIfTI ``(x, y, z, t)`` becomes ``(X, Y, Z, T)``), a label
is int32 ``(*S)``. The 4x4 ``affine`` maps voxel indices to RAS+ world millimetres (NIfTI convention), also
for NRRD files whose header is usually in LPS.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DataFileError",
    "DataFileNotFoundError",
    "Image",
    "check_pair",
    "image_format",
    "load_image",
    "load_label",
    "orient_back",
    "remap_labels",
    "reorient",
    "reorient_to_ras",
    "resample_image",
    "resample_to",
    "unresample",
    "same_grid",
    "save_image",
]

PathLike = str | os.PathLike


class DataFileError(ValueError):
    """A data file is unreadable, corrupt or inconsistent; the message names the file and the problem."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """A data file does not exist (both a ``ValueError`` and a ``FileNotFoundError``)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Image:
    """A loaded volume and its geometry.

    Attributes:
      array: float32 ``(*S, C)`` for images, int32 ``(*S)`` for labels (``is_label``).
      affine: float64 ``(4, 4)`` voxel -> RAS+ world (mm).
      spacing: voxel size per spatial axis (mm), the column norms of ``affine``.
      orientation: axis codes of ``affine``, e.g. ``("R", "A", "S")``.
      path: the file it came from (None for in-memory images).
      header: the original header (nibabel header or NRRD header dict), kept for writing.
      is_label: True when ``array`` is an integer label map without a channel axis.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    orientation: tuple[str, ...]
    path: str | None = None
    header: Any = None
    is_label: bool = False

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The spatial shape ``S`` (the array shape without the channel axis)."""
        return tuple(self.array.shape if self.is_label else self.array.shape[:-1])

    @property
    def num_channels(self) -> int:
        """Number of channels (1 for labels)."""
        return 1 if self.is_label else int(self.array.shape[-1])

    def replace(self, **changes) -> Image:
        """Returns a copy with fields replaced (spacing/orientation recomputed from a new affine)."""
        if "affine" in changes:
            aff = np.asarray(changes["affine"], np.float64)
            changes["affine"] = aff
            n = len(self.spatial_shape)
            changes.setdefault("spacing", _spacing_from_affine(aff, n))
            changes.setdefault("orientation", _axcodes(aff))
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------- formats

_FORMATS = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".hdr.gz", "analyze"),
    (".img.gz", "analyze"),
    (".hdr", "analyze"),
    (".img", "analyze"),
    (".mgz", "mgh"),
    (".mgh", "mgh"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
)


def image_format(path: PathLike) -> str:
    """Returns the format of ``path`` from its suffix: "nifti", "analyze", "mgh" or "nrrd"."""
    name = os.fspath(path).lower()
    for suffix, fmt in _FORMATS:
        if name.endswith(suffix):
            return fmt
    raise DataFileError(
        f"{os.fspath(path)}: unsupported file type; expected one of "
        f"{', '.join(s for s, _ in _FORMATS)}"
    )


def _spacing_from_affine(affine: np.ndarray, n_spatial: int) -> tuple[float, ...]:
    zooms = np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))
    return tuple(float(z) for z in zooms[:n_spatial])


def _axcodes(affine: np.ndarray) -> tuple[str, ...]:
    import nibabel as nib

    return tuple(str(c) for c in nib.aff2axcodes(affine))


# NRRD "space" -> sign flips that take that space to RAS+.
_NRRD_SPACE_FLIPS = {
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "scanner-xyz": (1.0, 1.0, 1.0),
    "3d-right-handed": (1.0, 1.0, 1.0),
}


def _nrrd_geometry(header: Mapping[str, Any], path: str) -> tuple[np.ndarray, list[int]]:
    """Returns (RAS affine over the spatial axes, indices of the spatial axes) of an NRRD header."""
    ndim = int(header["dimension"])
    dirs = header.get("space directions")
    if dirs is not None:
        dirs = np.asarray(dirs, dtype=np.float64)
        if dirs.ndim != 2 or dirs.shape[0] != ndim:
            raise DataFileError(f"{path}: malformed 'space directions' {dirs.tolist()}")
        spatial = [i for i in range(ndim) if np.all(np.isfinite(dirs[i]))]
    else:
        spatial = list(range(min(ndim, 3)))
    if not 1 <= len(spatial) <= 3:
        raise DataFileError(f"{path}: expected 1 to 3 spatial axes, found {len(spatial)}")
    affine = np.eye(4)
    if dirs is not None:
        sdim = dirs.shape[1]
        if sdim > 3:
            raise DataFileError(f"{path}: space dimension {sdim} > 3 is not supported")
        for k, ax in enumerate(spatial):
            affine[:3, k] = 0.0
            affine[:sdim, k] = dirs[ax]
        origin = header.get("space origin")
        if origin is not None:
            origin = np.asarray(origin, np.float64)
            affine[: origin.shape[0], 3] = np.where(np.isfinite(origin), origin, 0.0)
    else:
        spacings = header.get("spacings")
        if spacings is not None:
            sp = np.asarray(spacings, np.float64)[spatial]
            affine[np.arange(len(spatial)), np.arange(len(spatial))] = np.where(
                np.isfinite(sp), sp, 1.0
            )
    space = str(header.get("space", "")).lower()
    flips = _NRRD_SPACE_FLIPS.get(space, (1.0, 1.0, 1.0))
    affine = np.diag([*flips, 1.0]) @ affine
    return affine, spatial


def _read_raw(path: str) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """Reads (data in file axis order, affine, header, format); every failure names the file."""
    fmt = image_format(path)
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"{path}: file not found")
    try:
        if fmt == "nrrd":
            import nrrd

            data, header = nrrd.read(path)
            affine, spatial = _nrrd_geometry(header, path)
            others = [i for i in range(data.ndim) if i not in spatial]
            data = np.transpose(data, spatial + others)
        else:
            import nibabel as nib

            img = nib.load(path)
            data = np.asanyarray(img.dataobj)  # reads (and decompresses) everything now
            affine = np.asarray(img.affine, np.float64)
            header = img.header
    except DataFileError:
        raise
    except Exception as e:  # nibabel/gzip/pynrrd raise many types for corrupt or truncated files
        raise DataFileError(
            f"{path}: cannot read {fmt} file (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from e
    return np.asarray(data), affine, header, fmt


def _squeeze_trailing(data: np.ndarray) -> np.ndarray:
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector images: (x, y, z, 1, c)
        data = data[:, :, :, 0, :]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


# --------------------------------------------------------------------------------- reorient/resample


def _axis_codes(codes: Sequence[str]) -> tuple[str, ...]:
    """``codes`` upper-cased, checked to name R/L, A/P and S/I once each."""
    up = tuple(str(c).upper() for c in codes)
    if len(up) != 3 or any(sum(c in pair for c in up) != 1 for pair in ("LR", "AP", "IS")):
        raise ValueError(
            f"codes: expected one of R/L, A/P and S/I each once (e.g. ('R', 'A', 'S')), got {tuple(codes)}"
        )
    return up


def reorient(image: Image, codes: Sequence[str] = ("R", "A", "S")) -> Image:
    """Returns ``image`` with its spatial axes permuted/flipped to the axis codes ``codes`` (3D only).

    Each voxel keeps its world position: the affine is updated with the array. ``codes`` name the
    direction each new axis points to, e.g. ``("R", "A", "S")`` (RAS+) or ``("A", "I", "L")``.
    :func:`orient_back` takes an array on the new grid back to ``image``'s voxel layout.
    """
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    shape = image.spatial_shape
    if len(shape) != 3:
        raise ValueError(f"image: reorientation needs a 3D image, got spatial shape {shape}")
    tr = ornt_transform(io_orientation(image.affine), axcodes2ornt(_axis_codes(codes)))
    array = np.ascontiguousarray(apply_orientation(image.array, tr))
    affine = image.affine @ inv_ornt_aff(tr, shape)
    return image.replace(array=array, affine=affine)


def orient_back(array, affine: np.ndarray, codes: Sequence[str] = ("R", "A", "S")) -> np.ndarray:
    """Undoes :func:`reorient`: ``array`` ``(*S', ...)`` on ``reorient(image, codes)``'s grid ->
    ``image``'s voxel layout, where ``affine`` is ``image.affine`` (trailing axes are kept)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    back = ornt_transform(axcodes2ornt(_axis_codes(codes)), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(np.asarray(array), back))


def reorient_to_ras(image: Image) -> Image:
    """Returns ``image`` with its spatial axes permuted/flipped to RAS+ (``reorient(image)``)."""
    return reorient(image, ("R", "A", "S"))


def resample_image(image: Image, spacing: float | Sequence[float]) -> Image:
    """Returns ``image`` resampled to voxel size ``spacing`` (mm), linear for images, nearest for labels.

    The first voxel centre stays in place; the new size along axis k is ``round(n_k * old_k / new_k)``
    (at least 1), and the affine's columns are rescaled so world coordinates stay consistent.
    """
    from scipy import ndimage

    shape = image.spatial_shape
    n = len(shape)
    target = np.broadcast_to(np.asarray(spacing, np.float64), (n,)).copy()
    if not np.all(np.isfinite(target)) or np.any(target <= 0):
        raise ValueError(f"spacing: expected positive finite values, got {target.tolist()}")
    old = np.asarray(image.spacing, np.float64)
    scale = target / old  # old voxel coordinate = scale * new voxel coordinate
    out_shape = tuple(
        max(1, int(round(s * o / t))) for s, o, t in zip(shape, old, target, strict=True)
    )
    order = 0 if image.is_label else 1

    def one(channel):
        return ndimage.affine_transform(
            channel, scale, offset=0.0, output_shape=out_shape, order=order, mode="nearest"
        )

    if image.is_label:
        array = one(image.array)
    else:
        array = np.stack([one(image.array[..., c]) for c in range(image.num_channels)], axis=-1)
    affine = image.affine.copy()
    affine[:3, :n] = affine[:3, :n] * scale[None, :]
    return image.replace(array=array, affine=affine)


def unresample(array, shape, spacing, resampled_spacing, *, order: int = 0) -> np.ndarray:
    """The inverse of :func:`resample_image` for a map on its grid: ``array`` (``(*S')``, on the
    grid of voxel size ``resampled_spacing``) back onto the grid of ``shape`` and ``spacing`` that
    was resampled (the first voxel centre shared; nearest neighbour for ``order`` 0, e.g. labels).
    Returns ``array`` itself when the grids are the same."""
    from scipy import ndimage

    a = np.asarray(array)
    shape = tuple(int(v) for v in shape)
    before = np.broadcast_to(np.asarray(spacing, np.float64), (len(shape),))
    after = np.broadcast_to(np.asarray(resampled_spacing, np.float64), (len(shape),))
    if a.shape == shape and np.allclose(before, after):
        return a
    # resampled voxel coordinate = (before / after) * original voxel coordinate
    return ndimage.affine_transform(
        a, before / after, output_shape=shape, order=int(order), mode="nearest"
    )


def same_grid(a: Image, b: Image, *, atol: float = 1e-3) -> bool:
    """Whether two images share one voxel grid: the same spatial shape and (to ``atol`` mm) affine."""
    return a.spatial_shape == b.spatial_shape and np.allclose(a.affine, b.affine, atol=atol)


def resample_to(image: Image, like: Image, *, order: int | None = None, fill: float = 0.0) -> Image:
    """``image`` resampled onto ``like``'s voxel grid through both affines (world space).

    Each voxel of ``like`` is mapped to world coordinates by ``like.affine`` and back into
    ``image``'s voxels by the inverse of ``image.affine``, and sampled there (linear for images,
    nearest for labels unless ``order`` is given; ``fill`` outside ``image``). The result has
    ``like``'s spatial shape and affine: a registration tool's first step when two scans lie on
    different grids (other sizes, spacings or orientations).
    """
    from scipy import ndimage

    n = len(image.spatial_shape)
    if len(like.spatial_shape) != n:
        raise ValueError(
            f"like: expected a {n}D grid like the image's, got spatial shape {like.spatial_shape}"
        )
    m = np.linalg.inv(image.affine) @ like.affine  # like voxel -> image voxel
    matrix, offset = m[:n, :n], m[:n, 3]
    order = (0 if image.is_label else 1) if order is None else int(order)

    def one(channel):
        return ndimage.affine_transform(
            channel,
            matrix,
            offset=offset,
            output_shape=like.spatial_shape,
            order=order,
            mode="constant",
            cval=fill,
        )

    if image.is_label:
        array = one(image.array).astype(image.array.dtype)
    else:
        array = np.stack([one(image.array[..., c]) for c in range(image.num_channels)], axis=-1)
        array = array.astype(np.float32)
    return image.replace(array=array, affine=like.affine.copy())


# --------------------------------------------------------------------------------------- loading


def load_image(
    path: PathLike,
    *,
    ndim: int | None = None,
    reorient: bool = False,
    spacing: float | Sequence[float] | None = None,
    is_label: bool = False,
) -> Image:
    """Loads a NIfTI/Analyze/MGH/NRRD file as an :class:`Image`.

    Args:
      path: ``.nii``, ``.nii.gz``, ``.hdr``/``.img``, ``.mgz``/``.mgh``, ``.nrrd``/``.nhdr``.
      ndim: expected dimensionality of the stored data after dropping trailing singleton axes
        (3: one 3D volume; 4: a 4D multi-channel/time series); a mismatch raises.
      reorient: permute/flip the axes to RAS+ (affine updated).
      spacing: resample to this voxel size in mm (linear; nearest for labels).
      is_label: return an int32 label map ``(*S)`` (values must be integers) instead of float32 ``(*S, C)``.

    Returns:
      Image with ``.array`` float32 ``(*S, C)`` (or int32 ``(*S)`` for labels) in native byte order.
    """
    path = os.fspath(path)
    data, affine, header, _ = _read_raw(path)
    data = _squeeze_trailing(data)
    if ndim is not None and data.ndim != ndim:
        raise DataFileError(
            f"{path}: expected a {ndim}D array, got a {data.ndim}D array of shape {data.shape}"
        )
    if data.ndim not in (2, 3, 4):
        raise DataFileError(f"{path}: expected a 2D, 3D or 4D array, got shape {data.shape}")
    n_spatial = min(data.ndim, 3)
    if is_label:
        if data.ndim == 4:
            raise DataFileError(
                f"{path}: expected a single-channel label volume, got shape {data.shape}"
            )
        if data.dtype.kind == "f":
            if not np.all(np.isfinite(data)):
                raise DataFileError(f"{path}: label volume contains non-finite values")
            rounded = np.rint(data)
            if not np.array_equal(rounded, data):
                bad = data[rounded != data].flat[0]
                raise DataFileError(f"{path}: label volume has non-integer value {bad}")
            data = rounded
        elif data.dtype.kind not in "iub":
            raise DataFileError(f"{path}: label volume has non-numeric dtype {data.dtype}")
        if data.size and (
            data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max
        ):
            raise DataFileError(f"{path}: label values exceed the int32 range")
        array = data.astype(np.int32)
    else:
        if data.dtype.kind not in "iubf":
            raise DataFileError(f"{path}: image has non-numeric dtype {data.dtype}")
        array = data.astype(np.float32)
        if data.ndim < 4:
            array = array[..., None]
        finite = np.isfinite(array)
        if not np.all(finite):
            raise DataFileError(
                f"{path}: {int(array.size - finite.sum())} non-finite intensities (NaN or inf)"
            )
    image = Image(
        array=np.ascontiguousarray(array),
        affine=affine,
        spacing=_spacing_from_affine(affine, n_spatial),
        orientation=_axcodes(affine),
        path=path,
        header=header,
        is_label=is_label,
    )
    if reorient:
        image = reorient_to_ras(image)
    if spacing is not None:
        image = resample_image(image, spacing)
    return image


def remap_labels(
    array: np.ndarray, label_map: Mapping[int, int] | Sequence[int], *, source: str = "label"
) -> np.ndarray:
    """Returns int32 ``array`` with raw values mapped through ``label_map`` (same shape).

    ``label_map`` is either ``{raw value: class id}`` or a sequence of allowed values (kept as they are).
    A value outside the map raises :class:`DataFileError` naming ``source`` and the value.
    """
    if isinstance(label_map, Mapping):
        keys = np.asarray(sorted(int(k) for k in label_map), np.int64)
        vals = np.asarray([int(label_map[k]) for k in sorted(label_map, key=int)], np.int32)
    else:
        keys = np.asarray(sorted({int(v) for v in label_map}), np.int64)
        vals = keys.astype(np.int32)
    if keys.size == 0:
        raise ValueError("label_map: expected at least one label value, got an empty map")
    array = np.asarray(array)
    present = np.unique(array)
    bad = np.setdiff1d(present, keys)
    if bad.size:
        raise DataFileError(
            f"{source}: label value(s) {bad.tolist()} not in the label map {keys.tolist()}"
        )
    idx = np.searchsorted(keys, array)
    return vals[idx].astype(np.int32)


def load_label(
    path: PathLike,
    *,
    label_map: Mapping[int, int] | Sequence[int] | None = None,
    reorient: bool = False,
    spacing: float | Sequence[float] | None = None,
) -> Image:
    """Loads an integer label volume: ``Image`` with int32 ``.array`` of shape ``(*S)``.

    With ``label_map`` (``{raw: class}`` or allowed values) every value is validated (the error names the
    file and the value) and remapped. Resampling uses nearest neighbour.
    """
    image = load_image(path, reorient=reorient, spacing=spacing, is_label=True)
    if label_map is not None:
        image = image.replace(array=remap_labels(image.array, label_map, source=os.fspath(path)))
    return image


def check_pair(image: Image, label: Image, *, atol: float = 1e-3) -> None:
    """Raises :class:`DataFileError` unless ``image`` and ``label`` share spatial shape and affine (``atol`` mm)."""
    if image.spatial_shape != label.spatial_shape:
        raise DataFileError(
            f"{label.path} vs {image.path}: spatial shapes disagree: label {label.spatial_shape}, "
            f"image {image.spatial_shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=atol, rtol=0.0):
        diff = float(np.max(np.abs(image.affine - label.affine)))
        raise DataFileError(
            f"{label.path} vs {image.path}: affines disagree by up to {diff:.4g} (atol {atol})"
        )


# --------------------------------------------------------------------------------------- writing


def _like_geometry(like) -> tuple[Any, np.ndarray, tuple[int, ...]]:
    """Returns (header or None, affine, spatial shape) of an Image or an image path."""
    if isinstance(like, Image):
        return like.header, like.affine, like.spatial_shape
    path = os.fspath(like)
    fmt = image_format(path)
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"like: {path}: file not found")
    try:
        if fmt == "nrrd":
            import nrrd

            header = nrrd.read_header(path)
            affine, spatial = _nrrd_geometry(header, path)
            shape = tuple(int(header["sizes"][i]) for i in spatial)
            return header, affine, shape
        import nibabel as nib

        img = nib.load(path)
        shape = img.shape[:3]
        return img.header, np.asarray(img.affine, np.float64), tuple(int(s) for s in shape)
    except DataFileError:
        raise
    except Exception as e:
        raise DataFileError(f"like: {path}: cannot read header: {type(e).__name__}: {e}") from e


def _output_dtype(array: np.ndarray) -> np.dtype:
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype.kind in "iu":
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dt)
        raise ValueError(f"array: integer values in [{lo}, {hi}] do not fit NIfTI int32")
    if array.dtype.kind == "f":
        return np.dtype(np.float32)
    raise ValueError(f"array: expected a boolean, integer or float array, got dtype {array.dtype}")


def save_image(
    path: PathLike,
    array,
    *,
    like: Image | PathLike | None = None,
    affine: np.ndarray | None = None,
) -> pathlib.Path:
    """Writes ``array`` to a NIfTI, Analyze, MGH or NRRD file (chosen by suffix); returns its path.

    Args:
      path: ``.nii``/``.nii.gz``, ``.hdr``/``.img`` (Analyze 7.5, e.g. iSeg-2017), ``.mgz``/``.mgh``
        (FreeSurfer) or ``.nrrd`` (written in LPS space, as PDDCA's files are).
      array: ``(*S)`` or channels-last ``(*S, C)`` (a trailing channel of size 1 is dropped).
        Booleans are written as uint8, integers as the smallest of uint8/int16/int32 that fits,
        floats as float32.
      like: an :class:`Image` or image path whose affine (and, for NIfTI output from a NIfTI or
        Analyze reference, header) is reused, so the output overlays its reference; its spatial shape
        must match ``array``.
      affine: the 4x4 voxel -> RAS affine, overriding ``like``'s (identity when neither is given).
        Analyze headers hold no rotation and only a whole-voxel origin inside the volume: an
        affine they cannot represent is refused for ``.hdr``/``.img`` rather than silently changed.
    """
    path = pathlib.Path(path)
    try:
        fmt = image_format(path)
    except DataFileError:
        raise ValueError(
            f"path: expected a .nii, .nii.gz, .hdr, .img, .mgz, .mgh or .nrrd file name, "
            f"got {str(path)!r}"
        ) from None
    if fmt == "nrrd" and path.name.lower().endswith(".nhdr"):
        raise ValueError(f"path: detached .nhdr output is not supported, got {str(path)!r}")
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3, 4):
        raise ValueError(
            f"array: expected (*S) or (*S, C) with 2 or 3 spatial axes, got shape {array.shape}"
        )
    header, ref_affine = None, None
    if like is not None:
        header, ref_affine, ref_shape = _like_geometry(like)
        shape = tuple(array.shape[: len(ref_shape)])
        if shape != tuple(ref_shape):
            raise ValueError(
                f"array: spatial shape {tuple(array.shape)} does not match like's spatial shape "
                f"{tuple(ref_shape)}"
            )
    if affine is not None:
        ref_affine = np.asarray(affine, np.float64)
        if ref_affine.shape != (4, 4) or not np.all(np.isfinite(ref_affine)):
            raise ValueError(
                f"affine: expected a finite (4, 4) matrix, got shape {ref_affine.shape}"
            )
    if ref_affine is None:
        ref_affine = np.eye(4)
    data = array.astype(_output_dtype(array))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "nrrd":
        return _save_nrrd(path, data, ref_affine)
    if fmt == "nifti":
        return _save_nifti(path, data, ref_affine, header)
    import nibabel as nib

    if fmt == "mgh":  # MGH holds uint8, int16, int32 and float32: every _output_dtype
        img = nib.MGHImage(data, ref_affine)
    else:  # analyze, with SPM's origin field (as iSeg-2017's files)
        img = nib.Spm99AnalyzeImage(data, ref_affine)
        # SPM's 1-based origin voxel, from the signed diagonal (nibabel's set_origin_from_affine
        # ignores the x flip that its own reader applies); checked by reading the header back.
        diag = np.diag(ref_affine)[:3]
        if np.all(diag != 0):
            origin = np.rint(-ref_affine[:3, 3] / diag + 1.0)
            if np.all(np.abs(origin) < 2**15):
                img.header["origin"][:3] = origin
        stored = img.header.get_best_affine()
        if not np.allclose(stored, ref_affine, atol=1e-4):
            raise ValueError(
                f"affine: Analyze (.hdr/.img) stores only voxel sizes, flips and a whole-voxel "
                f"origin inside the volume, so it cannot hold {ref_affine.tolist()} (it would become "
                f"{stored.tolist()}): write NIfTI instead"
            )
    try:
        nib.save(img, str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot write {fmt}: {type(e).__name__}: {e}") from e
    return path


def _save_nifti(path, data, affine, header):
    import nibabel as nib

    if isinstance(header, nib.analyze.AnalyzeHeader):
        hdr = nib.Nifti1Header.from_header(header)
        if hdr.endianness != nib.volumeutils.native_code:
            hdr = hdr.as_byteswapped(nib.volumeutils.native_code)  # write native byte order
    else:
        hdr = None
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_data_dtype(data.dtype)
    out_hdr = img.header
    out_hdr.set_slope_inter(1.0, 0.0)
    out_hdr["cal_min"], out_hdr["cal_max"] = 0.0, 0.0
    sform_code = int(out_hdr["sform_code"]) or 2
    qform_code = int(out_hdr["qform_code"]) or 1
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


def _save_nrrd(path, data, affine):
    """NRRD in LPS space: RAS affine rows 0 and 1 negated; channels as a trailing non-spatial axis."""
    import nrrd

    n = 3 if data.ndim >= 3 else 2
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    directions = [lps[:3, k].tolist() for k in range(n)]
    kinds = ["domain"] * n
    if data.ndim > n:
        directions.append([float("nan")] * 3)
        kinds.append("vector")
    header = {
        "space": "left-posterior-superior",
        "space directions": np.asarray(directions, np.float64),
        "space origin": lps[:3, 3],
        "kinds": kinds,
        "encoding": "gzip",
    }
    nrrd.write(str(path), np.ascontiguousarray(data), header, index_order="F")
    return path
