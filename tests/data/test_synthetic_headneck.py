"""Tests for the synthetic head & neck CT phantom (medjax.data.synthetic_headneck)."""

import numpy as np
import pytest
from scipy import ndimage

from medjax.data import _phantom as ph
from medjax.data import synthetic_headneck as H
from medjax.data.datasets import PDDCA_STRUCTURES

SHAPE = (32, 96, 96)
SMALL = (16, 40, 40)


@pytest.fixture(scope="module")
def phantom():
    return H.headneck_phantom(3, SHAPE)


@pytest.fixture(scope="module")
def other():
    return H.headneck_phantom(4, SHAPE)


def _hu(image):
    return image * 1000.0 - 100.0


def test_shapes_dtypes_and_labels(phantom):
    assert H.HEADNECK_STRUCTURES == PDDCA_STRUCTURES
    assert phantom["image"].shape == SHAPE and phantom["image"].dtype == np.float32
    assert phantom["label"].shape == SHAPE and phantom["label"].dtype == np.int32
    assert phantom["presence"].shape == (9,) and phantom["presence"].dtype == np.int32
    assert (phantom["presence"] == 1).all()
    assert set(np.unique(phantom["label"])) == set(range(10))
    assert np.isfinite(phantom["image"]).all()
    np.testing.assert_allclose(phantom["spacing"], (4.0, 2.5, 2.5))
    hu = _hu(phantom["image"])
    assert np.percentile(hu, 1) < -900  # air around the head
    assert np.median(hu[phantom["label"] == 3]) > 700  # the mandible is bone


def test_determinism_and_seed_dependence(phantom, other):
    again = H.headneck_phantom(3, SHAPE)
    for k in ("image", "label", "presence"):
        np.testing.assert_array_equal(again[k], phantom[k])
    assert not np.array_equal(other["label"], phantom["label"])
    assert np.abs(other["image"] - phantom["image"]).mean() > 0.02


@pytest.mark.parametrize("which", ["phantom", "other"])
def test_left_organs_on_the_left(which, request):
    label = request.getfixturevalue(which)["label"]
    mid = (SHAPE[2] - 1) / 2.0
    for left, right in ((4, 5), (6, 7), (8, 9)):
        xl = np.argwhere(label == left)[:, 2].mean()
        xr = np.argwhere(label == right)[:, 2].mean()
        assert xl > mid > xr, (left, xl, xr)

    # midline organs sit between their paired neighbours
    def x(k):
        return np.argwhere(label == k)[:, 2].mean()

    assert abs(x(2) - (x(4) + x(5)) / 2) < 2.0
    assert abs(x(1) - (x(6) + x(7)) / 2) < 4.0
    # superior-inferior order: chiasm above the parotids, above the submandibular glands
    z = {k: np.argwhere(label == k)[:, 0].mean() for k in (2, 6, 8, 3)}
    assert z[2] > z[6] > z[8]


def test_tiny_and_large_organ_volumes(phantom):
    counts = np.bincount(phantom["label"].ravel(), minlength=10)[1:].astype(float)
    large = counts[np.array(H.LARGE_ORGANS) - 1].mean()
    small = counts[np.array(H.SMALL_ORGANS) - 1].mean()
    # documented: mean large / mean tiny ~40x (26-51x over seeds 0-49), mandible/chiasm ~180x
    assert 25.0 < large / small < 70.0
    assert counts[2] / counts[1] > 80.0
    volume_cm3 = counts * np.prod(phantom["spacing"]) / 1000.0
    assert 40.0 < volume_cm3[2] < 110.0  # mandible
    assert 0.1 < volume_cm3[1] < 1.0  # chiasm
    # optic nerves are thin tubes, a couple of voxels across: an in-plane 3x3 erosion removes them
    for nerve in (4, 5):
        mask = phantom["label"] == nerve
        eroded = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))
        assert eroded.sum() <= 0.1 * mask.sum()


def test_low_soft_tissue_contrast(phantom):
    p = H._draw_subject(np.random.default_rng(3))
    axes = ph.axes_mm(SHAPE, (4.0, 2.5, 2.5), signs=(1.0, -1.0, 1.0))
    tissue, label = H._anatomy(p, axes)
    np.testing.assert_array_equal(label, phantom["label"])
    hu = _hu(phantom["image"])

    def mean(mask):
        return float(hu[ndimage.binary_erosion(mask)].mean())

    muscle, brain = mean(tissue == H._MUSCLE), mean(tissue == H._BRAIN)
    for organ in (6, 7, 8, 9):  # glands vs muscle: a few tens of HU
        assert abs(mean(label == organ) - muscle) < 60.0
    assert abs(mean(label == 1) - brain) < 25.0  # brainstem vs brain
    noise = hu[ndimage.binary_erosion(tissue == H._MUSCLE, iterations=2)].std()
    assert 8.0 < noise < 40.0  # noise comparable to the soft-tissue contrast
    assert mean(tissue == H._FAT) < -50.0 and mean(tissue == H._BONE) > 500.0


def test_unannotated_organs_stay_in_the_image(phantom):
    partial = H.headneck_phantom(3, SHAPE, unannotated=("Chiasm", "Parotid_L"))
    np.testing.assert_array_equal(partial["image"], phantom["image"])
    assert partial["presence"].tolist() == [1, 0, 1, 1, 1, 0, 1, 1, 1]
    assert not np.isin(partial["label"], (2, 6)).any()
    keep = ~np.isin(phantom["label"], (2, 6))
    np.testing.assert_array_equal(partial["label"][keep], phantom["label"][keep])
    assert (partial["label"][~keep] == 0).all()

    by_id = H.headneck_phantom(3, SMALL, unannotated=(2, 6))
    assert by_id["presence"].tolist() == partial["presence"].tolist()
    none = H.headneck_phantom(3, SMALL, unannotated_prob=1.0)
    assert (none["presence"] == 0).all() and (none["label"] == 0).all()
    draws = np.stack(
        [H.headneck_phantom(s, SMALL, unannotated_prob=0.3)["presence"] for s in range(6)]
    )
    assert 0.5 < draws.mean() < 0.9  # ~70% annotated
    again = H.headneck_phantom(2, SMALL, unannotated_prob=0.3)["presence"]
    np.testing.assert_array_equal(again, draws[2])  # the draw depends on the seed only


def test_validation_errors():
    with pytest.raises(ValueError, match="shape"):
        H.headneck_phantom(0, (8, 96, 96))
    with pytest.raises(ValueError, match="shape"):
        H.headneck_phantom(0, (32, 96))
    with pytest.raises(ValueError, match="spacing"):
        H.headneck_phantom(0, SMALL, spacing=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unannotated_prob"):
        H.headneck_phantom(0, SMALL, unannotated_prob=1.5)
    with pytest.raises(ValueError, match="unannotated"):
        H.headneck_phantom(0, SMALL, unannotated=("Lens_L",))
    with pytest.raises(ValueError, match="unannotated"):
        H.headneck_phantom(0, SMALL, unannotated=(10,))


def test_figure_writes_png(tmp_path):
    out = H.save_figure(tmp_path / "headneck.png", seeds=(1,), shape=SMALL)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
