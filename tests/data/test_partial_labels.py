"""Partially labelled Decathlon/KiTS folders unified by label name (tiny fake MSD trees)."""

import json

import nibabel as nib
import numpy as np
import pytest

from medjax.data import datasets as ds
from medjax.data.io import DataFileError
from medjax.data.pipeline import RecordSource, make_mixed_iterator

SHAPE = (6, 5, 4)
LIVER = {"0": "background", "1": "liver", "2": "cancer"}
PANCREAS = {"0": "background", "1": "cancer", "2": "pancreas"}  # organ and tumour swapped
SPLEEN = {"0": "background", "1": "spleen"}


def _nii(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def _raw(values, seed):
    return np.random.default_rng(seed).choice(np.asarray(values), size=SHAPE).astype(np.int16)


def _msd(root, labels, cases, *, seed=0, test=()):
    """An MSD folder with one CT image per case and labels drawn from every named value."""
    training, raw = [], {}
    for k, case in enumerate(cases):
        _nii(root / "imagesTr" / f"{case}.nii.gz", np.full(SHAPE, seed + k, np.float32))
        raw[case] = _raw([int(v) for v in labels], seed=seed + k)
        _nii(root / "labelsTr" / f"{case}.nii.gz", raw[case])
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    for case in test:
        _nii(root / "imagesTs" / f"{case}.nii.gz", np.zeros(SHAPE, np.float32))
    js = {
        "name": root.name.split("_", 1)[-1],
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": len(cases),
        "training": training,
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }
    (root / "dataset.json").write_text(json.dumps(js))
    return raw


def _kits(root, cases, test=()):
    raw = {}
    for k, case in enumerate(cases):
        _nii(root / case / "imaging.nii.gz", np.full(SHAPE, 100.0 + k, np.float32))
        raw[case] = _raw([0, 1, 2], seed=50 + k)
        _nii(root / case / "segmentation.nii.gz", raw[case])
    for case in test:
        _nii(root / case / "imaging.nii.gz", np.zeros(SHAPE, np.float32))
    return raw


@pytest.fixture
def tree(tmp_path):
    raw = {}
    raw["Task03_Liver"] = _msd(tmp_path / "Task03_Liver", LIVER, ["liver_0", "liver_1"], seed=1)
    raw["Task07_Pancreas"] = _msd(
        tmp_path / "Task07_Pancreas", PANCREAS, ["pancreas_001", "pancreas_004"], seed=3
    )
    raw["Task09_Spleen"] = _msd(
        tmp_path / "Task09_Spleen", SPLEEN, ["spleen_2"], seed=5, test=["spleen_1"]
    )
    raw["kits19"] = _kits(tmp_path / "kits19", ["case_00000", "case_00001"], test=["case_00210"])
    roots = [tmp_path / name for name in raw]
    return roots, raw


def _lookup(raw, table):
    """Hand remap: ``table`` {raw value: class id}, a loop over the voxels."""
    out = np.empty(raw.shape, np.int32)
    for idx, v in np.ndenumerate(raw):
        out[idx] = table[int(v)]
    return out


def test_unified_classes_label_maps_and_annotated(tree):
    roots, raw = tree
    recs, classes = ds.partial_label_records(roots)
    assert classes == ("background", "liver", "pancreas", "spleen", "kidney")
    assert [r["id"] for r in recs] == [
        "liver_0",
        "liver_1",
        "pancreas_001",
        "pancreas_004",
        "spleen_2",
        "case_00000",
        "case_00001",
    ]
    # tumours merged into their dataset's single organ, whatever their raw value
    tables = {
        "Task03_Liver": {0: 0, 1: 1, 2: 1},
        "Task07_Pancreas": {0: 0, 1: 2, 2: 2},
        "Task09_Spleen": {0: 0, 1: 3},
        "kits19": {0: 0, 1: 4, 2: 4},
    }
    annotated = {
        "Task03_Liver": [False, True, False, False, False],
        "Task07_Pancreas": [False, False, True, False, False],
        "Task09_Spleen": [False, False, False, True, False],
        "kits19": [False, False, False, False, True],
    }
    for r in recs:
        meta = r["meta"]
        name = meta["dataset"]
        assert meta["label_map"] == tables[name]
        assert meta["annotated"] == annotated[name]
        assert meta["classes"] == classes
        image, label, _ = ds.load_record(r)
        assert image.shape == (*SHAPE, 1) and label.dtype == np.int32
        np.testing.assert_array_equal(label, _lookup(raw[name][r["id"]], tables[name]))
    kits = [r for r in recs if r["meta"]["dataset"] == "kits19"]
    assert kits[1]["meta"]["labels"] == {0: "background", 1: "kidney", 2: "tumor"}
    np.testing.assert_array_equal(ds.load_record(kits[1])[0][..., 0], np.full(SHAPE, 101.0))
    # test splits: MSD imagesTs, KiTS cases without a segmentation
    test, test_classes = ds.partial_label_records([roots[2], roots[3]], split="test")
    assert [(r["id"], r["label"]) for r in test] == [("spleen_1", None), ("case_00210", None)]
    assert test_classes == ("background", "spleen", "kidney")


def test_same_organ_other_value_and_fully_labelled_background(tmp_path):
    # one organ under different values and spellings; a dataset labelling every class
    a = _msd(tmp_path / "Task09_Spleen", SPLEEN, ["spleen_2"], seed=0)
    b = _msd(
        tmp_path / "MOBA",
        {"0": "background", "1": " Liver ", "2": "SPLEEN"},
        ["moba_1"],
        seed=7,
    )
    _msd(tmp_path / "Task03_Liver", LIVER, ["liver_0"], seed=9)
    recs, classes = ds.partial_label_records([tmp_path / n for n in ("Task09_Spleen", "MOBA")])
    assert classes == ("background", "spleen", "liver")
    assert recs[1]["meta"]["label_map"] == {0: 0, 1: 2, 2: 1}
    # background is annotated only where every foreground class is
    assert recs[0]["meta"]["annotated"] == [False, True, False]
    assert recs[1]["meta"]["annotated"] == [True, True, True]
    np.testing.assert_array_equal(
        ds.load_record(recs[1])[1], _lookup(b["moba_1"], {0: 0, 1: 2, 2: 1})
    )
    np.testing.assert_array_equal(ds.load_record(recs[0])[1], a["spleen_2"])
    roots = [tmp_path / n for n in ("Task03_Liver", "MOBA")]
    _, classes = ds.partial_label_records(roots)
    assert classes == ("background", "liver", "spleen")


def test_rename_keeps_merges_and_drops(tree):
    roots, raw = tree
    # tumours as classes of their own (the default merge turned off by naming them)
    rename = {
        "Task03_Liver": {"cancer": "liver tumour"},
        "Task07_Pancreas": {"Cancer": "pancreas tumour"},
        "kits19": {"tumor": "kidney tumour"},
    }
    recs, classes = ds.partial_label_records(roots, rename=rename)
    assert classes == (
        "background",
        "liver",
        "liver tumour",
        "pancreas tumour",
        "pancreas",
        "spleen",
        "kidney",
        "kidney tumour",
    )
    by = {r["meta"]["dataset"]: r for r in recs}
    assert by["Task07_Pancreas"]["meta"]["label_map"] == {0: 0, 1: 3, 2: 4}
    assert by["Task07_Pancreas"]["meta"]["annotated"] == [False] * 3 + [True] * 2 + [False] * 3
    assert by["kits19"]["meta"]["label_map"] == {0: 0, 1: 6, 2: 7}
    # "*" for every dataset: one shared tumour class (KiTS's "tumor" keeps the default rule)
    recs, classes = ds.partial_label_records(roots, rename={"*": {"cancer": "tumour"}})
    assert classes == ("background", "liver", "tumour", "pancreas", "spleen", "kidney")
    by = {r["meta"]["dataset"]: r for r in recs}
    assert by["Task03_Liver"]["meta"]["label_map"] == {0: 0, 1: 1, 2: 2}
    assert by["Task07_Pancreas"]["meta"]["label_map"] == {0: 0, 1: 2, 2: 3}
    assert by["kits19"]["meta"]["label_map"] == {0: 0, 1: 5, 2: 5}
    # None drops a structure: its voxels become background, the dataset entry beats "*"
    rename = {"*": {"cancer": "tumour"}, "Task03_Liver": {"cancer": None}}
    recs, classes = ds.partial_label_records(roots[:2], rename=rename)
    assert classes == ("background", "liver", "tumour", "pancreas")
    liver = recs[0]
    assert liver["meta"]["label_map"] == {0: 0, 1: 1, 2: 0}
    assert liver["meta"]["annotated"] == [False, True, False, False]
    np.testing.assert_array_equal(
        ds.load_record(liver)[1], _lookup(raw["Task03_Liver"]["liver_0"], {0: 0, 1: 1, 2: 0})
    )
    # merging two organs into one name
    recs, classes = ds.partial_label_records(
        roots[:3], rename={"*": {"pancreas": "liver", "spleen": "liver"}}
    )
    assert classes == ("background", "liver")
    assert all(r["meta"]["annotated"] == [True, True] for r in recs)


def _labels_error(tmp_path, labels, match, exc=DataFileError):
    root = tmp_path / "Task99_Bad"
    _msd(root, {"0": "background", "1": "liver"}, ["bad_0"])
    js = json.loads((root / "dataset.json").read_text())
    js["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(js))
    with pytest.raises(exc, match=match):
        ds.partial_label_records([root])
    return root


def test_malformed_labels_and_datasets(tmp_path):
    where = r"Task99_Bad/dataset.json: dataset Task99_Bad: "
    _labels_error(tmp_path, ["background", "liver"], where + r"'labels' must be an object")
    _labels_error(
        tmp_path,
        {"0": "background", "one": "liver"},
        where + r"label value 'one' \(named 'liver'\) is not a non-neg",
    )
    _labels_error(tmp_path, {"0": "background", "1.5": "liver"}, r"'1.5' .* not a non-negative")
    _labels_error(tmp_path, {"0": "background", "1": 7}, where + r"label '1' must be named")
    _labels_error(
        tmp_path,
        {"0": "background", "1": "liver", "2": " Liver"},
        where + r"label name ' Liver' is given twice, for values 1 and 2",
    )
    _labels_error(
        tmp_path, {"0": "background", "1": "liver", "01": "spleen"}, r"label value 1 is given twice"
    )
    _labels_error(tmp_path, {"1": "liver"}, where + r"no label is named 'background'")
    _labels_error(tmp_path, {"0": "background"}, where + r"annotates no organ \(only background")
    _labels_error(
        tmp_path,
        {"0": "background", "1": "liver", "2": "spleen", "3": "tumour"},
        where + r"labels \['tumour'\] are tumour-like, .* organs \['liver', 'spleen'\].*rename=",
        exc=ValueError,
    )
    _labels_error(
        tmp_path, {"0": "background", "1": "cancer"}, r"labels no organ.*rename=", ValueError
    )
    # the same value twice in the JSON text (json.loads alone would keep the last silently)
    root = tmp_path / "Task99_Bad"
    js = json.loads((root / "dataset.json").read_text())
    js["labels"] = "LABELS"
    text = json.dumps(js).replace('"LABELS"', '{"0": "background", "1": "liver", "1": "spleen"}')
    (root / "dataset.json").write_text(text)
    with pytest.raises(DataFileError, match=where + r"label value '1' is given twice, as 'liver'"):
        ds.partial_label_records([root])
    # every organ dropped by rename
    js["labels"] = {"0": "background", "1": "liver"}
    (root / "dataset.json").write_text(json.dumps(js))
    assert ds.partial_label_records([root])[1] == ("background", "liver")
    with pytest.raises(DataFileError, match=where + "annotates no organ"):
        ds.partial_label_records([root], rename={"Task99_Bad": {"liver": None}})


def test_argument_errors(tree, tmp_path):
    roots, _ = tree
    with pytest.raises(ValueError, match="roots: expected at least one dataset folder"):
        ds.partial_label_records([])
    with pytest.raises(ValueError, match="roots: expected a list"):
        ds.partial_label_records(roots[0])
    with pytest.raises(ValueError, match=r"roots: dataset folder names must differ"):
        ds.partial_label_records([roots[0], roots[0]])
    with pytest.raises(ValueError, match=r"rename: key 'Task03_liver' is neither"):
        ds.partial_label_records(roots, rename={"Task03_liver": {"cancer": None}})
    with pytest.raises(ValueError, match=r"rename\['Task09_Spleen'\]: \['cancer'\] are not labels"):
        ds.partial_label_records(roots, rename={"Task09_Spleen": {"cancer": None}})
    with pytest.raises(ValueError, match=r"'background' cannot be renamed"):
        ds.partial_label_records(roots, rename={"*": {"Background": "air"}})
    with pytest.raises(ValueError, match=r"expected a label name or None, got 3"):
        ds.partial_label_records(roots, rename={"*": {"cancer": 3}})
    with pytest.raises(ValueError, match="split"):
        ds.partial_label_records(roots, split="validation")
    # a dataset without cases of the split, a folder of neither layout, KiTS without imaging
    with pytest.raises(
        DataFileError, match=r"Task03_Liver/dataset.json: dataset Task03_Liver: no test"
    ):
        ds.partial_label_records(roots[:1], split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: dataset empty: neither a dataset.json"):
        ds.partial_label_records([tmp_path / "empty"])
    (roots[3] / "case_00001" / "imaging.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case_00001/imaging.nii.gz: dataset kits19"):
        ds.partial_label_records(roots)


def test_unnamed_label_value_raises_at_load(tree):
    roots, raw = tree
    recs, _ = ds.partial_label_records(roots)
    bad = raw["Task09_Spleen"]["spleen_2"].copy()
    bad[1, 2, 3] = 2  # Task09_Spleen names only 0 and 1
    _nii(roots[2] / "labelsTr" / "spleen_2.nii.gz", bad)
    spleen = next(r for r in recs if r["id"] == "spleen_2")
    with pytest.raises(
        DataFileError, match=r"Task09_Spleen/labelsTr/spleen_2.nii.gz: label value\(s\) \[2\]"
    ):
        ds.load_record(spleen)
    kits = raw["kits19"]["case_00000"].copy()
    kits[0, 0, 0] = 3  # a KiTS21 cyst in a KiTS19 folder
    _nii(roots[3] / "case_00000" / "segmentation.nii.gz", kits)
    with pytest.raises(
        DataFileError, match=r"case_00000/segmentation.nii.gz: label value\(s\) \[3\]"
    ):
        ds.load_record(next(r for r in recs if r["id"] == "case_00000"))


def test_mixed_iterator_consumes_one_source_per_dataset(tree):
    roots, _ = tree
    recs, classes = ds.partial_label_records(roots)
    names = list(dict.fromkeys(r["meta"]["dataset"] for r in recs))
    groups = [[r for r in recs if r["meta"]["dataset"] == n] for n in names]
    masks = [g[0]["meta"]["annotated"] for g in groups]
    it = make_mixed_iterator(
        [RecordSource(g) for g in groups],
        batch_size=4,
        seed=0,
        class_masks=masks,
        process_index=0,
        process_count=1,
        prefetch_threads=1,
    )
    seen = set()
    for _ in range(4):
        b = next(it)
        assert b["image"].shape == (4, *SHAPE, 1) and b["label"].shape == (4, *SHAPE)
        assert b["class_mask"].shape == (4, len(classes))
        for k, label, mask in zip(b["source"], b["label"], b["class_mask"], strict=True):
            seen.add(int(k))
            np.testing.assert_array_equal(mask, masks[k])
            # labels only use the source's annotated classes (or background) ...
            assert set(np.unique(label).tolist()) <= {0, *np.flatnonzero(mask).tolist()}
            # ... and ~mask[label], the uncertain region, is its background here
            np.testing.assert_array_equal(~mask[label], label == 0)
    it.close()
    assert seen == set(range(len(groups)))
