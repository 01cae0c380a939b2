"""Dataset folder layouts -> lists of records, deterministic splits, and record loading.

A record is a plain dict ``{"id": str, "image": [per-modality paths], "label": path or None, "meta": dict}``.
``meta["label_map"]`` (``{raw value: class id}`` or a list of allowed values) is applied by
:func:`load_record`. Layouts: BraTS 2018-2021 and 2023+, Medical Segmentation Decathlon, nnU-Net v2,
iSeg-2017, MRBrainS18, MM-WHS 2017, OASIS (neurite-oasis and raw FreeSurfer) and PDDCA;
:func:`partial_label_records` unifies the labels of several partially labelled Decathlon (or KiTS19)
folders by name.
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
    "MRBRAINS18_CLASSES_4",
    "MRBRAINS18_CLASSES_9",
    "MRBRAINS18_LABELS",
    "MRBRAINS18_LABEL_MAP_4",
    "MRBRAINS18_LABEL_MAP_9",
    "MRBRAINS18_MODALITIES",
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
    "mrbrains18_records",
    "nnunet_records",
    "oasis_records",
    "partial_label_records",
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


# -------------------------------------------------------------------------------------- MRBrainS18

#: MRBrainS18 modalities in medjax's channel order, read from ``pre/reg_T1``, ``pre/reg_IR`` and
#: ``pre/FLAIR`` (T1 and IR registered to the FLAIR grid, on which ``segm.nii.gz`` is drawn).
MRBRAINS18_MODALITIES = ("T1", "IR", "FLAIR")
_MRBRAINS18_FILES = ("reg_T1", "reg_IR", "FLAIR")
#: The challenge's raw ``segm.nii.gz`` labels.
MRBRAINS18_LABELS = {
    0: "background",
    1: "cortical gray matter",
    2: "basal ganglia",
    3: "white matter",
    4: "white matter lesions",
    5: "cerebrospinal fluid in the extracerebral space",
    6: "ventricles",
    7: "cerebellum",
    8: "brain stem",
    9: "infarction",
    10: "other",
}
#: 9 classes: the 8 structures the challenge evaluates keep their ids 1-8; 9 (infarction) and
#: 10 (other) become background 0, as the organisers' evaluation.py (hjkuijf/MRBrainS18) masks
#: them out of both the reference and the result before scoring labels 1-8.
MRBRAINS18_LABEL_MAP_9 = {**{v: v for v in range(9)}, 9: 0, 10: 0}
MRBRAINS18_CLASSES_9 = (
    "background",
    "cortical GM",
    "basal ganglia",
    "WM",
    "WM lesions",
    "CSF",
    "ventricles",
    "cerebellum",
    "brain stem",
)
#: 4 classes: 1 CSF = {5 extracerebral CSF, 6 ventricles}, 2 GM = {1 cortical GM, 2 basal ganglia},
#: 3 WM = {3 WM, 4 WM lesions}; 7 cerebellum, 8 brain stem, 9 and 10 -> background 0 (MRBrainS13's
#: three-tissue labels, which MedicalZooPytorch's "mrbrains4" groups the same way).
MRBRAINS18_LABEL_MAP_4 = {0: 0, 1: 2, 2: 2, 3: 3, 4: 3, 5: 1, 6: 1, 7: 0, 8: 0, 9: 0, 10: 0}
MRBRAINS18_CLASSES_4 = ("background", "CSF", "GM", "WM")


def mrbrains18_records(root, *, classes: int = 9) -> list[dict]:
    """Returns MRBrainS18 records (``<id>/pre/{reg_T1,reg_IR,FLAIR}.nii.gz`` + ``<id>/segm.nii.gz``).

    ``root`` holds one folder per subject (ids such as "1", "14", "070", kept as written, in natural
    order); a folder counts as a subject when it has ``pre/`` or a ``segm`` file. ``image`` is
    ``[reg_T1, reg_IR, FLAIR]``, so the channels are :data:`MRBRAINS18_MODALITIES` (T1, IR, FLAIR,
    MedicalZooPytorch's order); ``label`` is ``segm.nii.gz`` or None. ``classes`` picks
    ``meta["label_map"]`` over the raw labels 0-10 (:data:`MRBRAINS18_LABELS`):

    * 9: :data:`MRBRAINS18_LABEL_MAP_9` -> :data:`MRBRAINS18_CLASSES_9`, the challenge's 8 evaluated
      structures plus background; infarction (9) and other (10) become background, as the
      challenge's evaluation masks them out of the reference and of the result.
    * 4: :data:`MRBRAINS18_LABEL_MAP_4` -> :data:`MRBRAINS18_CLASSES_4` (background, CSF, GM, WM):
      CSF = 5 + 6, GM = 1 + 2, WM = 3 + 4, and 7-10 background, as MRBrainS13's tissue labels.
      MedicalZooPytorch groups 1+2, 3+4 and 5+6 alike but numbers them GM 1, WM 2, CSF 3 (against
      its own class names Air, CSF, GM, WM) and leaves 7-10 unmapped; medjax follows the names.

    ``meta`` has ``dataset`` ("mrbrains18"), ``modalities``, ``classes`` (names) and ``label_map``.
    """
    root = _root(root)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes not in (9, 4):
        raise ValueError(f"classes: expected 9 or 4, got {classes!r}")
    label_map, names = (
        (MRBRAINS18_LABEL_MAP_9, MRBRAINS18_CLASSES_9)
        if classes == 9
        else (MRBRAINS18_LABEL_MAP_4, MRBRAINS18_CLASSES_4)
    )
    records = []
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
        seg = _find_nii(d, "segm")
        if not (d / "pre").is_dir() and seg is None:
            continue
        images = []
        for mod, stem in zip(MRBRAINS18_MODALITIES, _MRBRAINS18_FILES, strict=True):
            f = _find_nii(d / "pre", stem)
            if f is None:
                raise DataFileNotFoundError(
                    f"{d / 'pre' / (stem + '.nii.gz')}: file not found (MRBrainS18 subject "
                    f"{d.name} lacks its {mod} image)"
                )
            images.append(f)
        meta = {
            "dataset": "mrbrains18",
            "modalities": list(MRBRAINS18_MODALITIES),
            "classes": names,
            "label_map": dict(label_map),
        }
        records.append(_record(d.name, images, seg, meta))
    if not records:
        raise DataFileNotFoundError(
            f"root: no MRBrainS18 subjects (<id>/pre/ or <id>/segm.nii.gz) found under {root}"
        )
    return records


# ------------------------------------------------------------------- partially labelled datasets

#: Label names (whole names, case-insensitive) that the default rule merges into a dataset's organ.
_TUMOUR_NAMES = frozenset(
    w + s for w in ("cancer", "tumour", "tumor", "lesion", "cyst") for s in ("", "s")
)
#: KiTS19 ``case_NNNNN/segmentation.nii.gz`` values.
_KITS19_LABELS = {0: "background", 1: "kidney", 2: "tumor"}


def _norm_name(name: str) -> str:
    return " ".join(name.split()).lower()


class _JsonObject(dict):
    """A JSON object that remembers keys given twice with different values."""

    conflicts: list


def _json_object(pairs) -> _JsonObject:
    obj = _JsonObject()
    obj.conflicts = []
    for k, v in pairs:
        if k in obj and obj[k] != v:
            obj.conflicts.append((k, obj[k], v))
        obj[k] = v
    return obj


def _msd_labels(js_path: pathlib.Path, where: str) -> dict[int, str]:
    """``{value: name}`` of a dataset.json's ``labels`` map, validated (one name per value and back)."""
    try:
        js = json.loads(js_path.read_text(), object_pairs_hook=_json_object)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{where}: invalid JSON: {e}") from e
    if not isinstance(js, Mapping) or "labels" not in js:
        raise DataFileError(f"{where}: missing key 'labels'")
    raw = js["labels"]
    if not isinstance(raw, Mapping):
        raise DataFileError(
            f"{where}: 'labels' must be an object {{value: name}}, got {type(raw).__name__} {raw!r}"
        )
    if raw.conflicts:
        k, a, b = raw.conflicts[0]
        raise DataFileError(f"{where}: label value {k!r} is given twice, as {a!r} and {b!r}")
    labels: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for k, name in raw.items():
        if not re.fullmatch(r"\s*\d+\s*", k):
            raise DataFileError(
                f"{where}: label value {k!r} (named {name!r}) is not a non-negative integer"
            )
        v = int(k)
        if not isinstance(name, str) or not name.strip():
            raise DataFileError(f"{where}: label {k!r} must be named by a string, got {name!r}")
        if v in labels:
            raise DataFileError(
                f"{where}: label value {v} is given twice, as {labels[v]!r} and {name!r}"
            )
        key = _norm_name(name)
        if key in by_name:
            raise DataFileError(
                f"{where}: label name {name!r} is given twice, for values {by_name[key]} and {v}"
            )
        labels[v], by_name[key] = name, v
    return labels


def _kits_records(root: pathlib.Path, split: str) -> list[dict]:
    cases = sorted(
        (d for d in root.iterdir() if d.is_dir() and re.fullmatch(r"case_\d+", d.name)),
        key=lambda d: _natural_key(d.name),
    )
    if not cases:
        raise DataFileNotFoundError(
            f"{root}: dataset {root.name}: neither a dataset.json nor KiTS19 case_NNNNN folders"
        )
    meta = {"modality": ["CT"], "labels": dict(_KITS19_LABELS)}
    records = []
    for d in cases:
        img, seg = _find_nii(d, "imaging"), _find_nii(d, "segmentation")
        if img is None:
            raise DataFileNotFoundError(
                f"{d / 'imaging.nii.gz'}: dataset {root.name}: KiTS case {d.name} has no imaging file"
            )
        if (seg is not None) == (split == "training"):
            records.append(_record(d.name, [img], seg, dict(meta)))
    return records


def _check_rename(rename, folders: Sequence[str]) -> dict[str, dict[str, str | None]]:
    if rename is None:
        return {}
    expected = "{dataset folder name or '*': {label name: new name or None}}"
    if not isinstance(rename, Mapping):
        raise ValueError(f"rename: expected {expected}, got {type(rename).__name__}")
    out = {}
    for ds, names in rename.items():
        if ds != "*" and ds not in folders:
            raise ValueError(
                f"rename: key {ds!r} is neither '*' nor a dataset folder name ({list(folders)})"
            )
        if not isinstance(names, Mapping):
            raise ValueError(f"rename[{ds!r}]: expected {expected}, got {type(names).__name__}")
        inner: dict[str, str | None] = {}
        for old, new in names.items():
            if not isinstance(old, str) or not old.strip():
                raise ValueError(f"rename[{ds!r}]: expected label names as keys, got {old!r}")
            if _norm_name(old) == "background":
                raise ValueError(f"rename[{ds!r}]: 'background' cannot be renamed")
            if new is not None and (not isinstance(new, str) or not new.strip()):
                raise ValueError(
                    f"rename[{ds!r}][{old!r}]: expected a label name or None, got {new!r}"
                )
            new = None if new is None else _norm_name(new)
            inner[_norm_name(old)] = None if new == "background" else new
        out[ds] = inner
    return out


def _unified_names(labels: Mapping[int, str], rename, folder: str, where: str) -> dict[int, str]:
    """raw value -> unified name ("background" for class 0) of one dataset."""
    specific, common = rename.get(folder, {}), rename.get("*", {})
    keys = {v: _norm_name(n) for v, n in labels.items()}
    unknown = sorted(set(specific) - set(keys.values()))
    if unknown:
        raise ValueError(
            f"rename[{folder!r}]: {unknown} are not labels of {where} (its labels: "
            f"{sorted(keys.values())})"
        )
    if "background" not in keys.values():
        raise DataFileError(f"{where}: no label is named 'background' (labels {dict(labels)})")
    names: dict[int, str] = {}
    tumours = []
    for v in sorted(keys):
        key = keys[v]
        if key == "background":
            names[v] = key
        elif key in specific or key in common:
            new = specific[key] if key in specific else common[key]
            names[v] = "background" if new is None else new
        elif key in _TUMOUR_NAMES:
            tumours.append(v)
        else:
            names[v] = key
    organs = list(dict.fromkeys(n for n in names.values() if n != "background"))
    if tumours and len(organs) != 1:
        found = [labels[v] for v in tumours]
        has = f"several organs {organs}" if organs else "no organ"
        raise ValueError(
            f"{where}: labels {found} are tumour-like, but the dataset labels {has}, so there is "
            f"no single organ to merge them into: say what they become with rename="
            f"{{{folder!r}: {{{labels[tumours[0]]!r}: <an organ, a new class name or None>}}}}"
        )
    for v in tumours:
        names[v] = organs[0]
    if not organs:
        raise DataFileError(f"{where}: annotates no organ (only background; labels {dict(labels)})")
    return {v: names[v] for v in sorted(names)}


def partial_label_records(
    roots: Sequence[str | os.PathLike],
    *,
    rename: Mapping[str, Mapping[str, str | None]] | None = None,
    split: str = "training",
) -> tuple[list[dict], tuple[str, ...]]:
    """Returns ``(records, classes)`` of several partially labelled datasets with unified labels.

    Each root is a Medical Segmentation Decathlon folder (``dataset.json``, read by
    :func:`decathlon_records`, whose ``labels`` map ``{"value": "name"}`` names its structures) or,
    without ``dataset.json``, a KiTS19 folder (``case_NNNNN/imaging.nii.gz`` and, for training,
    ``segmentation.nii.gz``; labels 0 background, 1 kidney, 2 tumor; ``split="test"`` takes the cases
    without a segmentation). Labels are unified by name (case-insensitive, whitespace stripped and
    collapsed, so "Liver " and "liver" agree) whatever their values: ``classes`` is ``("background",
    *organ names in order of first appearance over roots and, within a root, by raw value)``, the
    names lower-cased. Records come in ``roots`` order and keep their case ids.

    ``rename`` ``{folder name or "*": {label name: new name or None}}`` (the folder's entry first,
    then ``"*"``) renames labels before unification, to merge structures (several names to one) or
    drop them (None: the voxels become background, the class does not exist). Without an entry,
    the default rule merges a tumour-like label (whole name "cancer", "tumour", "tumor", "lesion" or
    "cyst", or their plurals) into the dataset's organ when it labels exactly one organ (an organ
    segmentation includes its tumours: Task03_Liver's "cancer" joins "liver", KiTS's "tumor"
    "kidney"); with several organs (or none) it raises, asking for ``rename``. To keep tumours as
    classes of their own, name them: ``rename={"Task03_Liver": {"cancer": "liver tumour"}}``
    (or ``{"*": {"cancer": "cancer"}}`` for one shared class). The rule goes by name only: check
    datasets such as Task08_HepaticVessel, whose "Tumour" (of the liver) would join "vessel".

    Each record's ``meta`` gains:

    * ``dataset``: the folder name; ``classes``: the unified names;
    * ``label_map``: ``{raw value: class id}`` over the values the dataset names, applied by
      :func:`load_record`, which raises :class:`DataFileError` naming the file and any value the
      dataset does not name;
    * ``annotated``: ``len(classes)`` bools. ``annotated[c]`` (c >= 1): the dataset labels class c,
      so its voxels labelled c are c and no other voxel is. ``annotated[0]`` (background) is True
      only when the dataset labels every foreground class: elsewhere a voxel labelled 0 may be an
      unannotated organ. So ``~annotated[label]`` is the mask of uncertain voxels (co-training's
      region mask), and per-class losses or metrics may skip every class with ``annotated`` False.
      Pass these as :func:`medjax.data.pipeline.make_mixed_iterator`'s ``class_masks``, one source
      per dataset.

    Raises :class:`DataFileError` (a ``ValueError``) naming the folder and file for a malformed
    ``labels`` map (not an object, a value that is not a non-negative integer, one value or one name
    given twice, no "background"), a dataset that annotates no organ or has no ``split`` cases, and
    ``ValueError`` for an empty ``roots``, repeated folder names or a bad ``rename``.
    """
    if isinstance(roots, str | os.PathLike):
        raise ValueError(
            f"roots: expected a list of dataset folders, got the single path {roots!r}"
        )
    roots = [_root(r) for r in roots]
    if not roots:
        raise ValueError("roots: expected at least one dataset folder, got none")
    if split not in ("training", "test"):
        raise ValueError(f"split: expected 'training' or 'test', got {split!r}")
    folders = [r.name for r in roots]
    if len(set(folders)) != len(folders):
        dup = sorted({f for f in folders if folders.count(f) > 1})
        raise ValueError(f"roots: dataset folder names must differ (they name datasets), got {dup}")
    rename = _check_rename(rename, folders)
    datasets = []
    for root in roots:
        js_path = root / "dataset.json"
        if js_path.is_file():
            where = f"{js_path}: dataset {root.name}"
            labels = _msd_labels(js_path, where)
            recs = decathlon_records(root, split=split)
        else:
            where = f"{root}: dataset {root.name} (KiTS19 layout)"
            labels = dict(_KITS19_LABELS)
            recs = _kits_records(root, split)
        names = _unified_names(labels, rename, root.name, where)
        if not recs:
            raise DataFileError(f"{where}: no {split} cases")
        datasets.append((root.name, names, recs))
    classes = list(
        dict.fromkeys(["background", *(n for _, ns, _ in datasets for n in ns.values())])
    )
    classes = tuple(classes)
    records = []
    for folder, names, recs in datasets:
        label_map = {v: classes.index(n) for v, n in names.items()}
        annotated = [c in label_map.values() for c in range(len(classes))]
        annotated[0] = all(annotated[1:])
        for r in recs:
            meta = {
                **r["meta"],
                "dataset": folder,
                "classes": classes,
                "label_map": dict(label_map),
                "annotated": list(annotated),
            }
            records.append({**r, "meta": meta})
    return records, classes
