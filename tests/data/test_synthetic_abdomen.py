"""Tests for the synthetic abdominal CT phantom and partial-label datasets (synthetic_abdomen)."""

import numpy as np
import pytest
from scipy import ndimage

from medjax.data import synthetic_abdomen as A

SHAPE = (32, 64, 64)
SMALL = (12, 32, 32)


@pytest.fixture(scope="module")
def phantom():
    return A.abdomen_phantom(3, SHAPE)


@pytest.fixture(scope="module")
def partial():
    return A.partial_label_datasets(0, 2, SMALL)


def test_shapes_dtypes_and_labels(phantom):
    assert A.ABDOMEN_CLASSES == ("background", "liver", "kidney", "spleen", "pancreas")
    assert phantom["image"].shape == SHAPE and phantom["image"].dtype == np.float32
    assert phantom["label"].shape == SHAPE and phantom["label"].dtype == np.int32
    assert set(np.unique(phantom["label"])) == set(range(5))
    assert np.isfinite(phantom["image"]).all()
    np.testing.assert_allclose(phantom["spacing"], (6.0, 5.0, 5.0))
    hu = phantom["image"] * 1000.0 - 100.0
    assert np.percentile(hu, 1) < -900  # air around the body
    for organ, lo, hi in ((1, 60, 160), (3, 60, 170), (4, 40, 140)):
        assert lo < np.median(hu[phantom["label"] == organ]) < hi


def test_determinism_and_seed_dependence(phantom):
    again = A.abdomen_phantom(3, SHAPE)
    np.testing.assert_array_equal(again["image"], phantom["image"])
    np.testing.assert_array_equal(again["label"], phantom["label"])
    other = A.abdomen_phantom(4, SHAPE)
    assert not np.array_equal(other["label"], phantom["label"])
    assert np.abs(other["image"] - phantom["image"]).mean() > 0.02


def test_organ_sizes_and_sides(phantom):
    label = phantom["label"]
    volume = np.bincount(label.ravel(), minlength=5)[1:] * np.prod(phantom["spacing"]) / 1000.0
    liver, kidney, spleen, pancreas = volume
    assert 700 < liver < 2200 and 100 < kidney < 400 and 50 < spleen < 300 and 30 < pancreas < 120
    assert liver > 10 * pancreas and liver > spleen
    # liver on the patient's right (low axis-2 index), spleen on the left
    mid = (SHAPE[2] - 1) / 2.0
    assert np.argwhere(label == 1)[:, 2].mean() < mid < np.argwhere(label == 3)[:, 2].mean()
    # two kidneys, one each side of the spine, behind the pancreas
    parts, n = ndimage.label(label == 2)
    sizes = np.bincount(parts.ravel())[1:]
    two = np.argsort(sizes)[::-1][:2] + 1
    assert sizes[two - 1].sum() > 0.97 * sizes.sum() and sizes[two - 1].min() > 0.3 * sizes.max()
    xs = sorted(np.argwhere(parts == k)[:, 2].mean() for k in two)
    assert xs[0] < mid < xs[1]
    assert np.argwhere(label == 2)[:, 1].mean() > np.argwhere(label == 4)[:, 1].mean()
    # the pancreas is elongated: its principal extent is several times its thickness
    pts = np.argwhere(label == 4) * phantom["spacing"]
    sv = np.linalg.svd(pts - pts.mean(0), compute_uv=False)
    assert sv[0] > 2.5 * sv[2]


def test_partial_datasets_keep_one_organ_each(partial):
    assert list(partial) == list(A.ABDOMEN_ORGANS)
    for k, (name, entries) in enumerate(partial.items(), start=1):
        assert len(entries) == 2
        for e in entries:
            assert e["annotated"] == (k,) and e["dataset"] == name
            assert set(np.unique(e["label"])) == {0, k}
            # the other organs are in the image, labelled background
            full = A.abdomen_phantom(e["seed"], SMALL)
            np.testing.assert_array_equal(full["image"], e["image"])
            np.testing.assert_array_equal(e["label"], np.where(full["label"] == k, k, 0))
            assert set(np.unique(full["label"])) == set(range(5))


def test_subjects_are_disjoint(partial):
    test = A.full_label_testset(0, 2, SMALL)
    entries = [e for es in partial.values() for e in es] + test
    seeds = [e["seed"] for e in entries]
    assert len(set(seeds)) == len(seeds)
    images = [e["image"] for e in entries]
    for i in range(len(images)):
        for j in range(i):
            assert not np.array_equal(images[i], images[j])
    for e in test:
        assert e["annotated"] == (1, 2, 3, 4) and e["dataset"] == "test"
        assert set(np.unique(e["label"])) == set(range(5))
    # a dataset does not depend on which other datasets are asked for
    kidney = A.partial_label_datasets(0, 1, SMALL, organs=("kidney",))
    np.testing.assert_array_equal(kidney["kidney"][0]["image"], partial["kidney"][0]["image"])


def test_multi_organ_datasets():
    out = A.partial_label_datasets(5, 1, SMALL, organs=(("spleen", "liver"), "pancreas"))
    assert list(out) == ["liver+spleen", "pancreas"]
    entry = out["liver+spleen"][0]
    assert entry["annotated"] == (1, 3)
    assert set(np.unique(entry["label"])) == {0, 1, 3}


def test_validation_errors():
    with pytest.raises(ValueError, match="shape"):
        A.abdomen_phantom(0, (4, 64, 64))
    with pytest.raises(ValueError, match="spacing"):
        A.abdomen_phantom(0, SMALL, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="organs"):
        A.partial_label_datasets(0, 1, SMALL, organs=("liver", "heart"))
    with pytest.raises(ValueError, match="organs"):
        A.partial_label_datasets(0, 1, SMALL, organs=("liver", "liver"))
    with pytest.raises(ValueError, match="organs"):
        A.partial_label_datasets(0, 1, SMALL, organs=())
    with pytest.raises(ValueError, match="n_per_dataset"):
        A.partial_label_datasets(0, -1, SMALL)
    with pytest.raises(ValueError, match="seed"):
        A.full_label_testset("a", 1, SMALL)
    with pytest.raises(ValueError, match="n: "):
        A.full_label_testset(0, 1.5, SMALL)


def test_figure_writes_png(tmp_path):
    out = A.save_figure(tmp_path / "abdomen.png", seeds=(1,), shape=(16, 32, 32))
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
