"""Dataset folder layouts -> lists of records, deterministic splits, and record loading.

A record is a plain dict ``{"id": str, "image": [per-modality paths], "label": path or None, "meta": dict}``.
``meta["label_map"]`` (``{raw value: class id}`` or a list of allowed values) is applied by
:func:`load_record`. Layouts: BraTS 2018-2021 and 2023+, Medical Segmentation Decathlon, nnU-Net v2,
iSeg-2017, MM-WHS 2017, OASIS (neurite-oasis and raw FreeSurfer) and PDDCA.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medjax.data.io import (
    DataFileError,
    DataFileNotFoundError,
    check_pair,
    load_image,
    load_label,
    remap_labels,
)

__all__ = [
    "BRATS_LABEL_MAP",
    "BRATS2023_LABEL_MAP",
    "BRATS_MODALITIES",
    "BRATS_MODALITY_ALIASES",
    "ISEG_CLASSES",
    "ISEG_LABEL_MAP",
    "MMWHS_CLASSES",
    "MMWHS_LABEL_MAP",
    "OASIS_SEG4_LABELS",
    "OASIS_SEG35_LABELS",
    "PDDCA_STRUCTURES",
    "PNP_ADANET_CLASSES",
    "PNP_ADANET_LABEL_MAP",
    "LoadedRecord",
    "brats_records",
    "decathlon_records",
    "freesurfer_records",
    "iseg_records",
    "kfold",
    "load_pddca_label",
    "load_record",
    "mmwhs_records",
    "nnunet_records",
    "oasis_records",
    "pddca_records",
    "split",
]

# ------------------------------------------------------------------------------------- constants

#: BraTS modalities in medjax's channel order.
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
#: File-name suffix -> canonical modality (2018-2021 names and 2023+ names).
BRATS_MODALITY_ALIASES = {
    "t1": "t1",
    "t1n": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
}
#: BraTS 2018-2021: {0 background, 1 NCR/NET, 2 edema, 4 ET} -> classes {0, 1, 2, 3}.
BRATS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}
#: BraTS 2023+: {0, 1 NCR, 2 edema, 3 ET} already contiguous (identity).
BRATS2023_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3}

#: iSeg-2017: {0, 10 CSF, 150 GM, 250 WM} -> {0, 1, 2, 3}.
ISEG_LABEL_MAP = {0: 0, 10: 1, 150: 2, 250: 3}
ISEG_CLASSES = ("background", "CSF", "GM", "WM")

#: MM-WHS 2017, all 7 structures in increasing raw-value order -> classes 1..7.
MMWHS_LABEL_MAP = {0: 0, 205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}
MMWHS_CLASSES = ("background", "Myo", "LA", "LV", "RA", "RV", "AA", "PA")
#: PnP-AdaNet's 4 structures: 1 AA (820), 2 LA (420), 3 LV (500), 4 Myo (205); RA, RV, PA -> 0.
PNP_ADANET_LABEL_MAP = {0: 0, 820: 1, 420: 2, 500: 3, 205: 4, 550: 0, 600: 0, 850: 0}
PNP_ADANET_CLASSES = ("background", "AA", "LA", "LV", "Myo")

#: neurite-oasis label sets (FreeSurfer structures already renumbered contiguously).
OASIS_SEG35_LABELS = tuple(range(36))
OASIS_SEG4_LABELS = tuple(range(5))

#: PDDCA structure files, label id = position + 1.
PDDCA_STRUCTURES = (
    "BrainStem",
    "Chiasm",
    "Mandible",
    "OpticNerve_L",
    "OpticNerve_R",
    "Parotid_L",
    "Parotid_R",
    "Submandibular_L",
    "Submandibular_R",
)

_NII = (".nii.gz", ".nii")


def _root(root) -> pathlib.Path:
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataFileNotFoundError(f"root: {root}: not a directory")
    return root


def _find_nii(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for ext in _NII:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _record(id_, images, label, meta, *, image_ndim=3) -> dict:
    """A record; ``meta["image_ndim"]`` is the dimensionality of each image file (None: 3D or 4D)."""
    return {
        "id": str(id_),
        "image": [str(p) for p in images],
        "label": None if label is None else str(label),
        "meta": {**meta, "image_ndim": image_ndim},
    }


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ------------------------------------------------------------------------------------------ BraTS


def brats_records(root, *, modalities: Sequence[str] = BRATS_MODALITIES) -> list[dict]:
    """Returns BraTS records found under ``root`` (any depth; ``HGG/``/``LGG/`` set ``meta["grade"]``).

    Handles 2018-2021 (``Case/Case_{flair,t1,t1ce,t2,seg}.nii.gz``) and 2023+
    (``Case/Case-{t1c,t1n,t2f,t2w,seg}.nii.gz``). ``image`` lists ``modalities`` (canonical names, in
    that order, default :data:`BRATS_MODALITIES`); ``label`` is the seg file (or a single ``*_Segm.nii``
    as in BraTS 2020 case 355) or None; ``meta`` has
    ``format`` ("2018-2021" or "2023"), ``grade``, ``modalities`` and ``label_map``.
    """
    root = _root(root)
    modalities = tuple(modalities)
    bad = [m for m in modalities if m not in BRATS_MODALITIES]
    if bad or not modalities:
        raise ValueError(
            f"modalities: expected a non-empty subset of {BRATS_MODALITIES}, got {modalities}"
        )
    records = []
    for case_dir in sorted(p for p in root.rglob("*") if p.is_dir()):
        case = case_dir.name
        files: dict[str, pathlib.Path] = {}
        fmt = None
        for f in case_dir.iterdir():
            if not f.is_file() or not f.name.startswith(case):
                continue
            rest = f.name[len(case) :]
            if not rest or rest[0] not in "_-":
                continue
            m = re.match(r"^[_-]([A-Za-z0-9]+)\.nii(\.gz)?$", rest)
            if m is None:
                continue
            suffix = m.group(1).lower()
            if suffix == "seg":
                files["seg"] = f
            elif suffix in BRATS_MODALITY_ALIASES:
                files[BRATS_MODALITY_ALIASES[suffix]] = f
                fmt = "2023" if rest[0] == "-" else "2018-2021"
        if fmt is None:
            continue
        if "seg" not in files:  # BraTS 2020 case 355 ships "W39_1998.09.19_Segm.nii"
            segs = [
                f
                for f in case_dir.iterdir()
                if f.is_file() and re.search(r"_seg[a-z]*\.nii(\.gz)?$", f.name.lower())
            ]
            if len(segs) == 1:
                files["seg"] = segs[0]
        missing = [m for m in modalities if m not in files]
        if missing:
            raise DataFileNotFoundError(f"{case_dir}: BraTS case {case} lacks modalities {missing}")
        rel = case_dir.relative_to(root).parts
        grade = next((p.upper() for p in rel[:-1] if p.upper() in ("HGG", "LGG")), None)
        meta = {
            "dataset": "brats",
            "format": fmt,
            "grade": grade,
            "modalities": list(modalities),
            "label_map": dict(BRATS2023_LABEL_MAP if fmt == "2023" else BRATS_LABEL_MAP),
        }
        records.append(_record(case, [files[m] for m in modalities], files.get("seg"), meta))
    if not records:
        raise DataFileNotFoundError(f"root: no BraTS cases found under {root}")
    return records


# -------------------------------------------------------------------------------- MSD and nnU-Net


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise DataFileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path}: invalid JSON: {e}") from e


def _existing(root: pathlib.Path, rel: str, source: pathlib.Path) -> pathlib.Path:
    p = (root / rel).resolve() if not os.path.isabs(rel) else pathlib.Path(rel)
    if not p.is_file():
        raise DataFileNotFoundError(f"{source}: listed file {rel} not found at {p}")
    return p


def _case_id(path) -> str:
    name = pathlib.Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mgz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def decathlon_records(root, *, split: str = "training") -> list[dict]:
    """Returns Medical Segmentation Decathlon records from ``root/dataset.json``.

    ``split`` is "training" (``[{image, label}]``) or "test" (image paths, label None). Each record's
    ``image`` is the one (possibly 4D multi-modal) file; ``meta`` has ``modality`` (names in channel
    order), ``labels`` and an identity ``label_map`` over the declared label ids.
    """
    root = _root(root)
    js_path = root / "dataset.json"
    js = _read_json(js_path)
    if split not in ("training", "test"):
        raise ValueError(f"split: expected 'training' or 'test', got {split!r}")
    for key in ("labels", "modality", split):
        if key not in js:
            raise DataFileError(f"{js_path}: missing key {key!r}")
    modality = [js["modality"][k] for k in sorted(js["modality"], key=int)]
    labels = {int(k): v for k, v in js["labels"].items()}
    meta = {
        "dataset": js.get("name", root.name),
        "modality": modality,
        "labels": labels,
        "label_map": {k: k for k in sorted(labels)},
    }
    records = []
    for entry in js[split]:
        if split == "training":
            if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
                raise DataFileError(f"{js_path}: training entry {entry!r} lacks image/label")
            img = _existing(root, entry["image"], js_path)
            lab = _existing(root, entry["label"], js_path)
        else:
            img = _existing(root, entry if isinstance(entry, str) else entry["image"], js_path)
            lab = None
        # Decathlon images may be 4D (several modalities in one file).
        records.append(_record(_case_id(img), [img], lab, dict(meta), image_ndim=None))
    return records


def nnunet_records(root, *, split: str = "training") -> list[dict]:
    """Returns nnU-Net v2 raw-dataset records (``imagesTr/CASE_0000.nii.gz`` channel files).

    Reads ``channel_names``, ``labels`` (name -> id, or a list of ids for regions), ``file_ending`` and
    ``numTraining`` from ``dataset.json``. ``split`` "training" uses imagesTr/labelsTr, "test" uses
    imagesTs (and labelsTs when present). ``meta["label_map"]`` is the identity over all label ids.
    """
    root = _root(root)
    js_path = root / "dataset.json"
    js = _read_json(js_path)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in js:
            raise DataFileError(f"{js_path}: missing key {key!r}")
    if split not in ("training", "test"):
        raise ValueError(f"split: expected 'training' or 'test', got {split!r}")
    ending = js["file_ending"]
    channels = sorted(int(k) for k in js["channel_names"])
    if channels != list(range(len(channels))):
        raise DataFileError(f"{js_path}: channel_names keys must be 0..C-1, got {channels}")
    ids: set[int] = set()
    for v in js["labels"].values():
        ids.update(int(x) for x in (v if isinstance(v, list | tuple) else [v]))
    img_dir, lab_dir = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
    img_dir = root / img_dir
    if not img_dir.is_dir():
        raise DataFileNotFoundError(f"{img_dir}: folder not found")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    cases: dict[str, dict[int, pathlib.Path]] = {}
    for f in img_dir.iterdir():
        m = pattern.match(f.name)
        if m:
            cases.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
    meta = {
        "dataset": js.get("name", root.name),
        "channel_names": [js["channel_names"][str(c)] for c in channels],
        "labels": js["labels"],
        "label_map": {i: i for i in sorted(ids)},
    }
    records = []
    for case in sorted(cases, key=_natural_key):
        missing = [c for c in channels if c not in cases[case]]
        if missing:
            raise DataFileNotFoundError(f"{img_dir}: case {case} lacks channel files {missing}")
        lab = root / lab_dir / f"{case}{ending}"
        if split == "training" and not lab.is_file():
            raise DataFileNotFoundError(f"{lab}: label of training case {case} not found")
        records.append(
            _record(
                case, [cases[case][c] for c in channels], lab if lab.is_file() else None, dict(meta)
            )
        )
    if split == "training" and "numTraining" in js and int(js["numTraining"]) != len(records):
        raise DataFileError(
            f"{js_path}: numTraining is {js['numTraining']} but {len(records)} cases were found"
        )
    return records


# ------------------------------------------------------------------------------------------- iSeg


def iseg_records(root) -> list[dict]:
    """Returns iSeg-2017 records (Analyze ``subject-N-{T1,T2,label}.hdr/.img``; label None for test).

    ``image`` is ``[T1, T2]``; ``meta["label_map"]`` is :data:`ISEG_LABEL_MAP`.
    """
    root = _root(root)
    found: dict[int, dict[str, pathlib.Path]] = {}
    for f in root.rglob("subject-*-*.hdr"):
        m = re.match(r"^subject-(\d+)-(T1|T2|label)\.hdr$", f.name)
        if m is None:
            continue
        if not f.with_suffix(".img").is_file():
            raise DataFileNotFoundError(f"{f}: the matching .img data file is missing")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = f
    records = []
    for n in sorted(found):
        files = found[n]
        missing = [k for k in ("T1", "T2") if k not in files]
        if missing:
            raise DataFileNotFoundError(f"{root}: subject-{n} lacks {missing}")
        meta = {
            "dataset": "iseg2017",
            "modalities": ["T1", "T2"],
            "label_map": dict(ISEG_LABEL_MAP),
        }
        records.append(
            _record(f"subject-{n}", [files["T1"], files["T2"]], files.get("label"), meta)
        )
    if not records:
        raise DataFileNotFoundError(f"root: no iSeg-2017 subjects found under {root}")
    return records


# ------------------------------------------------------------------------------------------ MM-WHS


def mmwhs_records(
    root, *, modality: str | None = None, label_map: Mapping[int, int] = MMWHS_LABEL_MAP
) -> list[dict]:
    """Returns MM-WHS 2017 records (``{ct,mr}_{train,test}_NNNN_{image,label}.nii.gz``, any depth).

    ``modality`` "ct"/"mr" filters; ``label_map`` is stored in ``meta`` (:data:`MMWHS_LABEL_MAP`, all 7
    structures, or :data:`PNP_ADANET_LABEL_MAP`, the 4 PnP-AdaNet structures 1 AA, 2 LA, 3 LV, 4 Myo).
    """
    root = _root(root)
    if modality not in (None, "ct", "mr"):
        raise ValueError(f"modality: expected None, 'ct' or 'mr', got {modality!r}")
    pattern = re.compile(r"^(ct|mr)_(train|test)_(\d+)_image\.nii(\.gz)?$")
    records = []
    for f in sorted(root.rglob("*_image.nii*")):
        m = pattern.match(f.name)
        if m is None or (modality is not None and m.group(1) != modality):
            continue
        case = f"{m.group(1)}_{m.group(2)}_{m.group(3)}"
        lab = _find_nii(f.parent, f"{case}_label")
        meta = {
            "dataset": "mmwhs2017",
            "modality": m.group(1),
            "split": m.group(2),
            "label_map": dict(label_map),
        }
        records.append(_record(case, [f], lab, meta))
    if not records:
        raise DataFileNotFoundError(f"root: no MM-WHS images found under {root}")
    return sorted(records, key=lambda r: r["id"])


# ------------------------------------------------------------------------------------------- OASIS


def oasis_records(root, *, seg: str = "seg35", image: str = "norm") -> list[dict]:
    """Returns neurite-oasis records (``OASIS_OAS1_0001_MR1/aligned_{norm,seg35,seg4}.nii.gz``).

    ``seg`` "seg35" or "seg4" picks the label file (contiguous ids 0..35 / 0..4); ``image`` "norm" or
    "orig" picks ``aligned_norm`` or ``aligned_orig``.
    """
    root = _root(root)
    if seg not in ("seg35", "seg4"):
        raise ValueError(f"seg: expected 'seg35' or 'seg4', got {seg!r}")
    if image not in ("norm", "orig"):
        raise ValueError(f"image: expected 'norm' or 'orig', got {image!r}")
    labels = OASIS_SEG35_LABELS if seg == "seg35" else OASIS_SEG4_LABELS
    records = []
    for d in sorted(root.glob("OASIS_OAS1_*")):
        if not d.is_dir():
            continue
        img = _find_nii(d, f"aligned_{image}")
        if img is None:
            raise DataFileNotFoundError(f"{d}: aligned_{image}.nii.gz not found")
        meta = {"dataset": "oasis", "seg": seg, "label_map": list(labels)}
        records.append(_record(d.name, [img], _find_nii(d, f"aligned_{seg}"), meta))
    if not records:
        raise DataFileNotFoundError(f"root: no OASIS_OAS1_* folders found under {root}")
    return records


def freesurfer_records(root, *, image: str = "orig", seg: str = "aseg") -> list[dict]:
    """Returns raw FreeSurfer subject records (``SUBJ/mri/{orig,aseg}.mgz`` or ``SUBJ/{orig,aseg}.mgz``).

    Labels keep FreeSurfer look-up-table ids (no ``label_map``); pass one to :func:`load_record` to
    renumber them.
    """
    root = _root(root)
    records = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        folder = d / "mri" if (d / "mri" / f"{image}.mgz").is_file() else d
        img = folder / f"{image}.mgz"
        if not img.is_file():
            continue
        lab = folder / f"{seg}.mgz"
        meta = {"dataset": "freesurfer", "label_map": None}
        records.append(_record(d.name, [img], lab if lab.is_file() else None, meta))
    if not records:
        raise DataFileNotFoundError(f"root: no FreeSurfer subjects with {image}.mgz under {root}")
    return records


# ------------------------------------------------------------------------------------------- PDDCA


def pddca_records(root) -> list[dict]:
    """Returns PDDCA records (``CASE/img.nrrd`` + ``CASE/structures/<Organ>.nrrd``).

    ``label`` is the ``structures`` folder (None when absent); ``meta["structures"]`` maps each of
    :data:`PDDCA_STRUCTURES` to its file or None, and ``meta["presence"]`` is the 9-vector of 0/1
    (a missing structure file means the organ is not annotated).
    """
    root = _root(root)
    records = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        img = d / "img.nrrd"
        if not img.is_file():
            continue
        sdir = d / "structures"
        structures = {}
        for name in PDDCA_STRUCTURES:
            p = sdir / f"{name}.nrrd"
            structures[name] = str(p) if p.is_file() else None
        presence = [int(structures[n] is not None) for n in PDDCA_STRUCTURES]
        meta = {
            "dataset": "pddca",
            "structures": structures,
            "presence": presence,
            "label_map": None,
        }
        records.append(_record(d.name, [img], sdir if sdir.is_dir() else None, meta))
    if not records:
        raise DataFileNotFoundError(f"root: no PDDCA cases (CASE/img.nrrd) found under {root}")
    return records


def load_pddca_label(record: Mapping[str, Any], *, like=None, reorient: bool = False, spacing=None):
    """Merges a PDDCA record's structure masks into one label map.

    Returns ``(label (*S) int32 with ids 1..9 in PDDCA_STRUCTURES order, presence (9,) int32)``.
    Where masks overlap, the later structure (higher id) wins. ``like`` (an Image) is checked against
    every mask's geometry.
    """
    structures = record["meta"].get("structures")
    if structures is None:
        raise ValueError(
            f"record: {record.get('id')!r} is not a PDDCA record (no meta['structures'])"
        )
    label = None
    presence = np.zeros(len(PDDCA_STRUCTURES), np.int32)
    for k, name in enumerate(PDDCA_STRUCTURES):
        path = structures.get(name)
        if path is None:
            continue
        mask = load_label(path, label_map=[0, 1], reorient=reorient, spacing=spacing)
        if like is not None:
            check_pair(like, mask)
        if label is None:
            label = np.zeros(mask.array.shape, np.int32)
            first = mask
        else:
            check_pair(first, mask)
        label[mask.array > 0] = k + 1
        presence[k] = 1
    return label, presence


# ------------------------------------------------------------------------------------ load records


class LoadedRecord(tuple):
    """``(image, label, affine)`` of a loaded record, carrying its geometry and provenance.

    Unpacks like a 3-tuple; also has ``.image``, ``.label``, ``.affine``, ``.spacing`` (mm per
    spatial axis), ``.orientation`` (axis codes, e.g. ``("R", "A", "S")``), ``.id``, ``.paths``
    (the image files, one per modality), ``.label_path`` and ``.meta`` (the record's meta dict).
    """

    def __new__(cls, image, label, affine, *, spacing, orientation, id, paths, label_path, meta):
        self = super().__new__(cls, (image, label, affine))
        self.image, self.label, self.affine = image, label, affine
        self.spacing, self.orientation = tuple(spacing), tuple(orientation)
        self.id, self.paths, self.label_path, self.meta = id, list(paths), label_path, meta
        return self

    def __getnewargs_ex__(self):
        kw = {k: getattr(self, k) for k in ("spacing", "orientation", "id", "paths")}
        kw.update(label_path=self.label_path, meta=self.meta)
        return (self.image, self.label, self.affine), kw


def load_record(
    record: Mapping[str, Any],
    *,
    label_map: Mapping[int, int] | Sequence[int] | None = None,
    reorient: bool = False,
    spacing: float | Sequence[float] | None = None,
):
    """Loads a record: ``(image (*S, C) float32, label (*S) int32 or None, affine (4, 4))``.

    The result is a :class:`LoadedRecord`: it unpacks as that triple and also carries the spacing,
    orientation, id and source paths.

    Modality files are stacked on the channel axis (each may itself have channels) and must share
    geometry; the label must match the image (:func:`medjax.data.io.check_pair`) and is remapped with
    ``label_map`` (default ``record["meta"]["label_map"]``; None keeps raw values). PDDCA records
    merge their structure masks (:func:`load_pddca_label`).
    """
    for key in ("id", "image", "label"):
        if key not in record:
            raise ValueError(f"record: expected key {key!r}, got keys {sorted(record)}")
    paths = record["image"]
    if isinstance(paths, str | os.PathLike) or not paths:
        raise ValueError(f"record: 'image' must be a non-empty list of paths, got {paths!r}")
    meta = record.get("meta") or {}
    # A 4D file where the layout stores one 3D volume per modality is an error, not extra channels.
    ndim = meta.get("image_ndim")
    images = [load_image(p, ndim=ndim, reorient=reorient, spacing=spacing) for p in paths]
    for im in images[1:]:
        check_pair(images[0], im)
    array = np.concatenate([im.array for im in images], axis=-1)
    affine = images[0].affine
    label = None
    if meta.get("structures") is not None:
        label, _ = load_pddca_label(record, like=images[0], reorient=reorient, spacing=spacing)
        if label is None:
            label = None if record["label"] is None else np.zeros(images[0].spatial_shape, np.int32)
    elif record["label"] is not None:
        lab = load_label(record["label"], reorient=reorient, spacing=spacing)
        check_pair(images[0], lab)
        label = lab.array
        lm = label_map if label_map is not None else meta.get("label_map")
        if lm is not None:
            label = remap_labels(label, lm, source=str(record["label"]))
    return LoadedRecord(
        array,
        label,
        affine,
        spacing=images[0].spacing,
        orientation=images[0].orientation,
        id=record["id"],
        paths=[str(p) for p in paths],
        label_path=None if record["label"] is None else str(record["label"]),
        meta=meta,
    )


# ------------------------------------------------------------------------------------------ splits


def _sorted_unique(records: Sequence[Mapping[str, Any]]) -> list:
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"records: ids must be unique, duplicates {dup[:5]}")
    return sorted(records, key=lambda r: _natural_key(r["id"]))


def split(
    records: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[list, ...]:
    """Returns a deterministic seeded partition of ``records`` into ``len(fractions)`` lists.

    The result depends only on the set of record ids and ``seed`` (not on input order). Part sizes are
    ``round(cumsum(fractions) * n)`` differences; each part keeps id order.
    """
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or fr.size == 0 or np.any(fr < 0) or not np.isclose(fr.sum(), 1.0, atol=1e-6):
        raise ValueError(
            f"fractions: expected non-negative values summing to 1, got {list(fractions)}"
        )
    recs = _sorted_unique(records)
    n = len(recs)
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.rint(np.concatenate([[0.0], np.cumsum(fr)]) * n).astype(int)
    bounds[-1] = n
    return tuple(
        [recs[i] for i in sorted(perm[a:b])] for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )


def kfold(
    records: Sequence[Mapping[str, Any]], k: int, fold: int, seed: int = 0
) -> tuple[list, list]:
    """Returns ``(train, val)`` for fold ``fold`` of a deterministic seeded ``k``-fold partition."""
    if not isinstance(k, int | np.integer) or k < 2:
        raise ValueError(f"k: expected an integer >= 2, got {k!r}")
    if not isinstance(fold, int | np.integer) or not 0 <= fold < k:
        raise ValueError(f"fold: expected an integer in [0, {k}), got {fold!r}")
    recs = _sorted_unique(records)
    if len(recs) < k:
        raise ValueError(f"records: need at least k={k} records, got {len(recs)}")
    perm = np.random.default_rng(seed).permutation(len(recs))
    folds = np.array_split(perm, k)
    val = set(folds[fold].tolist())
    train = [r for i, r in enumerate(recs) if i not in val]
    return train, [r for i, r in enumerate(recs) if i in val]
