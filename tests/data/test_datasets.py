"""Dataset layouts on tiny fake trees written with nibabel/pynrrd using the real file names."""

import json

import nibabel as nib
import nrrd
import numpy as np
import pytest

from medjax.data import datasets as ds
from medjax.data.io import DataFileError

SHAPE = (6, 5, 4)
AFF = np.diag([1.0, 1.0, 1.0, 1.0])


def _nii(path, data, affine=AFF):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _image(seed, shape=SHAPE):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _label(values, seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return rng.choice(np.asarray(values), size=shape).astype(np.int16)


# ------------------------------------------------------------------------------------------- BraTS


def test_brats_2021_with_grades(tmp_path):
    raw = {}
    for grade, case in [("HGG", "Brats18_2013_2_1"), ("LGG", "Brats18_TCIA09_141_1")]:
        d = tmp_path / grade / case
        for k, mod in enumerate(["flair", "t1", "t1ce", "t2"]):
            _nii(d / f"{case}_{mod}.nii.gz", np.full(SHAPE, 10 * k + 1, np.float32))
        raw[case] = _label([0, 1, 2, 4], seed=len(case))
        _nii(d / f"{case}_seg.nii.gz", raw[case])
    recs = ds.brats_records(tmp_path)
    assert [r["id"] for r in recs] == ["Brats18_2013_2_1", "Brats18_TCIA09_141_1"]
    assert [r["meta"]["grade"] for r in recs] == ["HGG", "LGG"]
    assert recs[0]["meta"]["format"] == "2018-2021"
    assert [p.rsplit("_", 1)[1] for p in recs[0]["image"]] == [
        "t1.nii.gz",
        "t1ce.nii.gz",
        "t2.nii.gz",
        "flair.nii.gz",
    ]
    loaded = ds.load_record(recs[0])
    image, label, affine = loaded
    assert image.shape == (*SHAPE, 4) and image.dtype == np.float32
    # the record's geometry and provenance travel with the arrays
    assert loaded.spacing == (1.0, 1.0, 1.0) and loaded.orientation == ("R", "A", "S")
    assert loaded.id == "Brats18_2013_2_1" and loaded.paths == recs[0]["image"]
    assert loaded.label_path == recs[0]["label"] and loaded.meta["grade"] == "HGG"
    # channel order t1, t1ce, t2, flair: files were filled with 10 * (flair, t1, t1ce, t2 index) + 1
    np.testing.assert_array_equal(image[0, 0, 0], [11.0, 21.0, 31.0, 1.0])
    expected = np.select([raw["Brats18_2013_2_1"] == v for v in (0, 1, 2, 4)], [0, 1, 2, 3])
    np.testing.assert_array_equal(label, expected)
    assert label.dtype == np.int32
    np.testing.assert_allclose(affine, AFF)
    # BraTS 2020 case 355 ships its segmentation under another name
    odd = tmp_path / "BraTS20_Training_355"
    for mod in ["flair", "t1", "t1ce", "t2"]:
        _nii(odd / f"BraTS20_Training_355_{mod}.nii", np.zeros(SHAPE, np.float32))
    _nii(odd / "W39_1998.09.19_Segm.nii", raw["Brats18_2013_2_1"])
    odd_rec = next(r for r in ds.brats_records(tmp_path) if r["id"] == "BraTS20_Training_355")
    assert odd_rec["label"].endswith("W39_1998.09.19_Segm.nii") and odd_rec["meta"]["grade"] is None
    t1_only = {r["id"]: r for r in ds.brats_records(tmp_path, modalities=("t1",))}
    rec = t1_only["Brats18_2013_2_1"]
    assert len(rec["image"]) == 1 and rec["image"][0].endswith("_t1.nii.gz")
    assert ds.load_record(rec)[0].shape == (*SHAPE, 1)


def test_brats_2023_and_errors(tmp_path):
    case = "BraTS-GLI-00000-000"
    d = tmp_path / case
    for k, mod in enumerate(["t1c", "t1n", "t2f", "t2w"]):
        _nii(d / f"{case}-{mod}.nii.gz", np.full(SHAPE, k, np.float32))
    seg = _label([0, 1, 2, 3], seed=0)
    _nii(d / f"{case}-seg.nii.gz", seg)
    val = "BraTS-GLI-00001-000"
    for mod in ["t1c", "t1n", "t2f", "t2w"]:
        _nii(tmp_path / val / f"{val}-{mod}.nii.gz", np.zeros(SHAPE, np.float32))
    recs = ds.brats_records(tmp_path)
    assert recs[0]["meta"]["format"] == "2023" and recs[1]["label"] is None
    assert recs[0]["meta"]["label_map"] == ds.BRATS2023_LABEL_MAP
    image, label, _ = ds.load_record(recs[0])
    # t1 <- t1n (1), t1ce <- t1c (0), t2 <- t2w (3), flair <- t2f (2)
    np.testing.assert_array_equal(image[1, 1, 1], [1.0, 0.0, 3.0, 2.0])
    np.testing.assert_array_equal(label, seg)
    assert ds.load_record(recs[1])[1] is None
    # a 2018-2021 label value (4) in a 2023 case is rejected, naming the file and value
    bad = seg.copy()
    bad[0, 0, 0] = 4
    _nii(d / f"{case}-seg.nii.gz", bad)
    with pytest.raises(ValueError, match=r"BraTS-GLI-00000-000-seg.nii.gz: label value\(s\) \[4\]"):
        ds.load_record(recs[0])
    # disagreeing label geometry
    _nii(d / f"{case}-seg.nii.gz", seg, affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(DataFileError, match="affines disagree"):
        ds.load_record(recs[0])
    _nii(d / f"{case}-seg.nii.gz", seg)
    # a 4D file where BraTS stores one 3D volume per modality is refused, not taken as channels
    _nii(d / f"{case}-t2w.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    with pytest.raises(DataFileError, match=r"t2w.nii.gz: expected a 3D array, got a 4D"):
        ds.load_record(recs[0])
    (tmp_path / val / f"{val}-t2w.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks modalities \['t2'\]"):
        ds.brats_records(tmp_path)


# ------------------------------------------------------------------------------ Decathlon, nnU-Net


def test_decathlon(tmp_path):
    training = []
    labels = {}
    for i in (3, 5):
        img = np.stack([_image(i), _image(i + 10)], axis=-1)  # 4D multi-modal file
        _nii(tmp_path / "imagesTr" / f"BRATS_{i:03d}.nii.gz", img)
        labels[i] = _label([0, 1, 2, 3], seed=i)
        _nii(tmp_path / "labelsTr" / f"BRATS_{i:03d}.nii.gz", labels[i])
        training.append(
            {
                "image": f"./imagesTr/BRATS_{i:03d}.nii.gz",
                "label": f"./labelsTr/BRATS_{i:03d}.nii.gz",
            }
        )
    _nii(tmp_path / "imagesTs" / "BRATS_900.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    meta = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing"},
        "numTraining": 2,
        "training": training,
        "test": ["./imagesTs/BRATS_900.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    recs = ds.decathlon_records(tmp_path)
    assert [r["id"] for r in recs] == ["BRATS_003", "BRATS_005"]
    assert recs[0]["meta"]["modality"] == ["FLAIR", "T1w"]
    image, label, _ = ds.load_record(recs[1])
    np.testing.assert_array_equal(image, np.stack([_image(5), _image(15)], axis=-1))
    np.testing.assert_array_equal(label, labels[5])
    test = ds.decathlon_records(tmp_path, split="test")
    assert test[0]["id"] == "BRATS_900" and test[0]["label"] is None
    meta["training"].append({"image": "./imagesTr/BRATS_404.nii.gz", "label": "./x.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="BRATS_404"):
        ds.decathlon_records(tmp_path)


def test_nnunet_v2(tmp_path):
    for case in ["prostate_00", "prostate_01", "prostate_10"]:
        for ch in range(2):
            _nii(tmp_path / "imagesTr" / f"{case}_{ch:04d}.nii.gz", _image(ch) + ch)
        _nii(tmp_path / "labelsTr" / f"{case}.nii.gz", _label([0, 1, 2], seed=3))
    js = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(js))
    recs = ds.nnunet_records(tmp_path)
    assert [r["id"] for r in recs] == ["prostate_00", "prostate_01", "prostate_10"]
    assert recs[0]["image"][1].endswith("prostate_00_0001.nii.gz")
    image, label, _ = ds.load_record(recs[2])
    np.testing.assert_array_equal(image, np.stack([_image(0), _image(1) + 1], axis=-1))
    np.testing.assert_array_equal(label, _label([0, 1, 2], seed=3))
    js["numTraining"] = 4
    (tmp_path / "dataset.json").write_text(json.dumps(js))
    with pytest.raises(ValueError, match="numTraining is 4 but 3"):
        ds.nnunet_records(tmp_path)
    js["numTraining"] = 3
    (tmp_path / "dataset.json").write_text(json.dumps(js))
    (tmp_path / "imagesTr" / "prostate_01_0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"prostate_01 lacks channel files \[1\]"):
        ds.nnunet_records(tmp_path)


# ------------------------------------------------------------------------------- iSeg, MM-WHS


def test_iseg_analyze(tmp_path):
    raw = _label([0, 10, 150, 250], seed=7)
    for n in (1, 2, 10):
        for k, mod in enumerate(["T1", "T2"]):
            nib.save(
                nib.AnalyzeImage(np.full(SHAPE, n * 10 + k, np.int16), AFF),
                str(tmp_path / f"subject-{n}-{mod}.hdr"),
            )
        if n != 10:
            nib.save(nib.AnalyzeImage(raw, AFF), str(tmp_path / f"subject-{n}-label.hdr"))
    recs = ds.iseg_records(tmp_path)
    assert [r["id"] for r in recs] == ["subject-1", "subject-2", "subject-10"]
    assert recs[2]["label"] is None
    image, label, _ = ds.load_record(recs[1])
    np.testing.assert_array_equal(image[0, 0, 0], [20.0, 21.0])
    lut = {0: 0, 10: 1, 150: 2, 250: 3}
    np.testing.assert_array_equal(label, np.vectorize(lut.get)(raw))
    (tmp_path / "subject-2-T2.img").unlink()
    with pytest.raises(FileNotFoundError, match=r"subject-2-T2.hdr: the matching .img"):
        ds.iseg_records(tmp_path)


def test_mmwhs_label_maps(tmp_path):
    values = [0, 205, 420, 500, 550, 600, 820, 850]
    raw = _label(values, seed=11)
    for mod, n in [("ct", 1001), ("mr", 1002)]:
        _nii(tmp_path / f"{mod}_train" / f"{mod}_train_{n}_image.nii.gz", _image(n))
        _nii(tmp_path / f"{mod}_train" / f"{mod}_train_{n}_label.nii.gz", raw)
    _nii(tmp_path / "ct_test" / "ct_test_2001_image.nii.gz", _image(0))
    recs = ds.mmwhs_records(tmp_path)
    assert [r["id"] for r in recs] == ["ct_test_2001", "ct_train_1001", "mr_train_1002"]
    assert recs[0]["label"] is None and recs[0]["meta"]["split"] == "test"
    _, label, _ = ds.load_record(recs[1])
    np.testing.assert_array_equal(label, np.searchsorted(values, raw))  # ordinal 0..7
    mr = ds.mmwhs_records(tmp_path, modality="mr", label_map=ds.PNP_ADANET_LABEL_MAP)
    assert [r["id"] for r in mr] == ["mr_train_1002"]
    _, pnp, _ = ds.load_record(mr[0])
    expected = np.zeros(SHAPE, np.int32)
    for cls, value in enumerate([820, 420, 500, 205], start=1):  # 1 AA, 2 LA, 3 LV, 4 Myo
        expected[raw == value] = cls
    np.testing.assert_array_equal(pnp, expected)
    assert ds.PNP_ADANET_CLASSES[1:] == ("AA", "LA", "LV", "Myo")
    raw[0, 0, 0] = 421  # a stray value must not be silently dropped
    _nii(tmp_path / "mr_train" / "mr_train_1002_label.nii.gz", raw)
    with pytest.raises(ValueError, match=r"mr_train_1002_label.nii.gz: label value\(s\) \[421\]"):
        ds.load_record(mr[0])


# -------------------------------------------------------------------------------- OASIS, PDDCA


def test_oasis_and_freesurfer(tmp_path):
    for n in (1, 2):
        d = tmp_path / f"OASIS_OAS1_{n:04d}_MR1"
        _nii(d / "aligned_norm.nii.gz", _image(n))
        _nii(d / "aligned_seg35.nii.gz", _label(range(36), seed=n))
        _nii(d / "aligned_seg4.nii.gz", _label(range(5), seed=n))
    recs = ds.oasis_records(tmp_path)
    assert [r["id"] for r in recs] == ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1"]
    image, label, _ = ds.load_record(recs[1])
    np.testing.assert_array_equal(image[..., 0], _image(2))
    np.testing.assert_array_equal(label, _label(range(36), seed=2))
    _, seg4, _ = ds.load_record(ds.oasis_records(tmp_path, seg="seg4")[0])
    np.testing.assert_array_equal(seg4, _label(range(5), seed=1))

    fs = tmp_path / "fs"
    aseg = _label([0, 2, 3, 41, 42, 251], seed=5)
    for subj in ("OAS1_0001", "OAS1_0002"):
        (fs / subj / "mri").mkdir(parents=True)
        nib.save(nib.MGHImage(_image(9), AFF), str(fs / subj / "mri" / "orig.mgz"))
        nib.save(nib.MGHImage(aseg.astype(np.int32), AFF), str(fs / subj / "mri" / "aseg.mgz"))
    frecs = ds.freesurfer_records(fs)
    assert [r["id"] for r in frecs] == ["OAS1_0001", "OAS1_0002"]
    image, label, _ = ds.load_record(frecs[0])
    np.testing.assert_array_equal(image[..., 0], _image(9))
    np.testing.assert_array_equal(label, aseg)  # FreeSurfer ids kept
    lm = {v: i for i, v in enumerate([0, 2, 3, 41, 42, 251])}
    _, renum, _ = ds.load_record(frecs[0], label_map=lm)
    np.testing.assert_array_equal(renum, np.vectorize(lm.get)(aseg))


def test_pddca_merge_and_presence(tmp_path):
    lps = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.9, 0.9, 2.5]),
        "space origin": np.array([-100.0, -100.0, 0.0]),
    }
    ct = np.random.default_rng(0).integers(-1000, 1500, size=SHAPE).astype(np.int16)
    case = tmp_path / "0522c0001"
    (case / "structures").mkdir(parents=True)
    nrrd.write(str(case / "img.nrrd"), ct, lps)
    masks = {}
    present = ["BrainStem", "Mandible", "OpticNerve_L", "Parotid_R"]
    for k, name in enumerate(present):
        m = np.zeros(SHAPE, np.uint8)
        m[k, :, :] = 1
        masks[name] = m
    masks["Parotid_R"][0, 0, 0] = 1  # overlaps BrainStem: the higher id (7) wins
    for name, m in masks.items():
        nrrd.write(str(case / "structures" / f"{name}.nrrd"), m, lps)
    other = tmp_path / "0522c0002"
    other.mkdir()
    nrrd.write(str(other / "img.nrrd"), ct, lps)
    recs = ds.pddca_records(tmp_path)
    assert [r["id"] for r in recs] == ["0522c0001", "0522c0002"]
    assert recs[0]["meta"]["presence"] == [1, 0, 1, 1, 0, 0, 1, 0, 0]
    assert recs[1]["meta"]["presence"] == [0] * 9 and recs[1]["label"] is None
    image, label, affine = ds.load_record(recs[0])
    np.testing.assert_array_equal(image[..., 0], ct)
    expected = np.zeros(SHAPE, np.int32)
    for name in present:  # in label-id order, so later ids overwrite
        expected[masks[name] > 0] = ds.PDDCA_STRUCTURES.index(name) + 1
    np.testing.assert_array_equal(label, expected)
    assert label[0, 0, 0] == 7 and label[0, 1, 1] == 1
    np.testing.assert_allclose(affine[:3, 3], [100.0, 100.0, 0.0])  # LPS origin -> RAS
    _, presence = ds.load_pddca_label(recs[0])
    np.testing.assert_array_equal(presence, recs[0]["meta"]["presence"])
    assert ds.load_record(recs[1])[1] is None
    bad = masks["Mandible"].copy()
    bad[1, 1, 1] = 3
    nrrd.write(str(case / "structures" / "Mandible.nrrd"), bad, lps)
    with pytest.raises(ValueError, match=r"Mandible.nrrd: label value\(s\) \[3\]"):
        ds.load_record(recs[0])


# ----------------------------------------------------------------------------------------- splits


def _fake_records(n):
    return [
        {"id": f"case_{i:03d}", "image": [f"/x/{i}.nii"], "label": None, "meta": {}}
        for i in range(n)
    ]


def test_split_deterministic_and_partition():
    recs = _fake_records(20)
    a = ds.split(recs, (0.7, 0.1, 0.2), seed=3)
    b = ds.split(list(reversed(recs)), (0.7, 0.1, 0.2), seed=3)  # input order does not matter
    assert [[r["id"] for r in part] for part in a] == [[r["id"] for r in part] for part in b]
    assert [len(p) for p in a] == [14, 2, 4]
    ids = [r["id"] for part in a for r in part]
    assert sorted(ids) == sorted(r["id"] for r in recs)
    c = ds.split(recs, (0.7, 0.1, 0.2), seed=4)
    assert [r["id"] for r in a[2]] != [r["id"] for r in c[2]]
    # same membership as an independent reading of the documented rule
    perm = np.random.default_rng(3).permutation(20)
    assert {r["id"] for r in a[1]} == {f"case_{i:03d}" for i in perm[14:16]}
    with pytest.raises(ValueError, match="fractions"):
        ds.split(recs, (0.5, 0.2), seed=0)
    with pytest.raises(ValueError, match="duplicates"):
        ds.split(recs + recs[:1], seed=0)


def test_kfold_covers_each_record_once():
    recs = _fake_records(11)
    seen = []
    for fold in range(3):
        train, val = ds.kfold(recs, 3, fold, seed=1)
        assert not {r["id"] for r in train} & {r["id"] for r in val}
        assert len(train) + len(val) == 11
        seen += [r["id"] for r in val]
    assert sorted(seen) == sorted(r["id"] for r in recs)
    assert ds.kfold(recs, 3, 1, seed=1) == ds.kfold(recs, 3, 1, seed=1)
    assert ds.kfold(recs, 3, 1, seed=1)[1] != ds.kfold(recs, 3, 1, seed=2)[1]
    with pytest.raises(ValueError, match="fold"):
        ds.kfold(recs, 3, 3)
