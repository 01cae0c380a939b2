"""MRBrainS18 layout and its 9- and 4-class label maps, on tiny fake subject folders."""

import nibabel as nib
import numpy as np
import pytest

from medjax.data import datasets as ds
from medjax.data.io import DataFileError

SHAPE = (3, 2, 2)
#: every raw label 0-10 once, then a 0
RAW = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0], np.uint8).reshape(SHAPE)
#: by hand: 9 classes keep 0-8, infarction (9) and other (10) -> 0
NINE = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0]).reshape(SHAPE)
#: by hand: GM {1, 2} -> 2, WM {3, 4} -> 3, CSF {5, 6} -> 1, cerebellum/brain stem/9/10 -> 0
FOUR = np.array([0, 2, 2, 3, 3, 1, 1, 0, 0, 0, 0, 0]).reshape(SHAPE)


def _nii(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def _subject(root, sid, *, label=True):
    for k, stem in enumerate(["FLAIR", "reg_IR", "reg_T1"]):
        _nii(root / sid / "pre" / f"{stem}.nii.gz", np.full(SHAPE, 10.0 * k + 1, np.float32))
    _nii(root / sid / "pre" / "T1.nii.gz", np.zeros((4, 4, 4), np.float32))  # unregistered
    if label:
        _nii(root / sid / "segm.nii.gz", RAW)


@pytest.fixture
def root(tmp_path):
    for sid in ["148", "070", "14", "1"]:
        _subject(tmp_path, sid, label=sid != "148")
    (tmp_path / "generated").mkdir()  # e.g. MedicalZoo's sub-volume cache: not a subject
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path


def test_records_channels_and_both_class_maps(root):
    recs = ds.mrbrains18_records(root)
    assert [r["id"] for r in recs] == ["1", "14", "070", "148"]
    assert recs[3]["label"] is None and recs[0]["label"].endswith("1/segm.nii.gz")
    assert [p.rsplit("/", 1)[1] for p in recs[0]["image"]] == [
        "reg_T1.nii.gz",
        "reg_IR.nii.gz",
        "FLAIR.nii.gz",
    ]
    meta = recs[0]["meta"]
    assert meta["modalities"] == ["T1", "IR", "FLAIR"] and meta["dataset"] == "mrbrains18"
    assert meta["classes"] == ds.MRBRAINS18_CLASSES_9 and len(ds.MRBRAINS18_CLASSES_9) == 9
    image, label, _ = ds.load_record(recs[2])
    # FLAIR, reg_IR, reg_T1 were filled with 1, 11, 21: channels are T1, IR, FLAIR
    np.testing.assert_array_equal(image[1, 1, 1], [21.0, 11.0, 1.0])
    np.testing.assert_array_equal(label, NINE)
    assert ds.load_record(recs[3])[1] is None
    recs4 = ds.mrbrains18_records(root, classes=4)
    assert (
        recs4[0]["meta"]["classes"] == ds.MRBRAINS18_CLASSES_4 == ("background", "CSF", "GM", "WM")
    )
    np.testing.assert_array_equal(ds.load_record(recs4[1])[1], FOUR)
    assert ds.MRBRAINS18_LABELS[9] == "infarction" and ds.MRBRAINS18_LABELS[10] == "other"
    assert sorted(ds.MRBRAINS18_LABEL_MAP_9) == sorted(ds.MRBRAINS18_LABEL_MAP_4) == list(range(11))


def test_errors(root, tmp_path):
    with pytest.raises(ValueError, match="classes: expected 9 or 4, got 8"):
        ds.mrbrains18_records(root, classes=8)
    bad = RAW.copy()
    bad[0, 0, 0] = 11
    _nii(root / "14" / "segm.nii.gz", bad)
    rec = next(r for r in ds.mrbrains18_records(root) if r["id"] == "14")
    with pytest.raises(DataFileError, match=r"14/segm.nii.gz: label value\(s\) \[11\]"):
        ds.load_record(rec)
    (root / "070" / "pre" / "reg_IR.nii.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"070/pre/reg_IR.nii.gz: file not found .* IR image"
    ):
        ds.mrbrains18_records(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MRBrainS18 subjects"):
        ds.mrbrains18_records(tmp_path / "empty")
