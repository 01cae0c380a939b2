"""Tests for the synthetic cardiac MR/CT phantom (medjax.data.synthetic_cardiac)."""

import numpy as np
import pytest
from scipy import ndimage

from medjax.data import _phantom as ph
from medjax.data import synthetic_cardiac as C
from medjax.data.datasets import PNP_ADANET_CLASSES

SHAPE = (16, 64, 64)


@pytest.fixture(scope="module")
def mr():
    return C.cardiac_phantom(3, SHAPE)


@pytest.fixture(scope="module")
def ct():
    return C.cardiac_phantom(3, SHAPE, modality="ct")


def _dice(pred, target, classes):
    return np.array(
        [
            2.0
            * ((pred == c) & (target == c)).sum()
            / max((pred == c).sum() + (target == c).sum(), 1)
            for c in classes
        ]
    )


def test_shapes_dtypes_and_labels(mr, ct):
    assert C.CARDIAC_CLASSES == PNP_ADANET_CLASSES
    for out, modality in ((mr, "mr"), (ct, "ct")):
        assert out["image"].shape == SHAPE and out["image"].dtype == np.float32
        assert out["label"].shape == SHAPE and out["label"].dtype == np.int32
        assert np.isfinite(out["image"]).all()
        assert set(np.unique(out["label"])) == set(range(len(C.CARDIAC_CLASSES)))
        assert out["modality"] == modality
        np.testing.assert_allclose(out["spacing"], np.array(C.FOV_MM) / SHAPE)
    assert (mr["image"] >= 0).all()
    # CT is (HU + 100) / 1000: air at about -0.9, contrast-enhanced blood well above water
    assert np.percentile(ct["image"], 1) < -0.8
    assert 0.25 < np.median(ct["image"][ct["label"] == 3]) < 0.6


def test_determinism_and_seed_dependence(mr, ct):
    again = C.cardiac_phantom(3, SHAPE)
    np.testing.assert_array_equal(again["image"], mr["image"])
    np.testing.assert_array_equal(again["label"], mr["label"])
    other = C.cardiac_phantom(4, SHAPE)
    assert not np.array_equal(other["label"], mr["label"])
    assert np.abs(other["image"] - mr["image"]).mean() > 0.02


def test_same_anatomy_different_appearance(mr, ct):
    np.testing.assert_array_equal(mr["label"], ct["label"])
    assert np.corrcoef(mr["image"].ravel(), ct["image"].ravel())[0, 1] < 0.9
    # the tissue -> intensity map is not monotonic: the order of tissues changes
    p = C._draw_subject(np.random.default_rng(3))
    spacing = ph.check_spacing(None, SHAPE, C.FOV_MM)
    axes = ph.axes_mm(SHAPE, spacing, signs=(1.0, -1.0, 1.0))
    tissue, _ = C._anatomy(p, axes)
    means = {}
    for out in (mr, ct):
        means[out["modality"]] = {
            t: out["image"][tissue == i].mean()
            for i, t in enumerate(C._TISSUES)
            if (tissue == i).any()
        }
    m, c = means["mr"], means["ct"]
    assert m["fat"] > m["muscle"] and c["fat"] < c["muscle"]
    assert m["fat"] > m["myocardium"] and c["fat"] < c["myocardium"]
    assert m["blood"] > m["bone"] and c["blood"] < c["bone"]
    assert m["lung"] < m["myocardium"] and c["lung"] < c["fat"]
    # MR has a bias field and smooth texture: the LV blood pool is far less uniform than on CT
    lv = mr["label"] == 3

    def cv(img):
        return img[lv].std() / abs(img[lv].mean())

    assert cv(mr["image"]) > 2.0 * cv(ct["image"])


@pytest.mark.parametrize("seed", [0, 7])
def test_myocardium_surrounds_the_lv(seed):
    label = C.cardiac_phantom(seed, SHAPE)["label"]
    lv, myo = label == 3, label == 4
    ring = ndimage.binary_dilation(lv) & ~lv
    assert (myo[ring]).mean() > 0.7  # open only at the valve plane
    # the left atrium and the aorta sit at the base, touching the LV or its wall
    base = ndimage.binary_dilation(lv | myo, iterations=2)
    assert (base & (label == 2)).any() and (base & (label == 1)).any()
    # the myocardium is a few voxels thick: dilating the LV by 4 voxels covers most of it
    assert (ndimage.binary_dilation(lv, iterations=4) & myo).sum() > 0.8 * myo.sum()


def test_same_subject_at_any_resolution():
    spacing = np.array(C.FOV_MM) / (15, 63, 63)
    large = C.cardiac_phantom(5, (15, 63, 63), spacing=spacing)
    small = C.cardiac_phantom(5, (8, 32, 32), spacing=2 * spacing)
    agree = (large["label"][::2, ::2, ::2] == small["label"]).mean()
    assert agree > 0.99


def test_domain_shift_breaks_an_mr_trained_classifier():
    """A per-voxel Bayes classifier (position atlas x intensity histogram) fit on MR fails on CT."""
    bins = np.linspace(-3.0, 4.0, 57)

    def zscore(img):  # the paper's per-domain normalisation: clip the top 2%, z-score
        img = np.minimum(img, np.percentile(img, 98))
        return (img - img.mean()) / img.std()

    def bins_of(img):
        return np.clip(np.digitize(zscore(img), bins) - 1, 0, len(bins) - 2)

    train = C.cardiac_dataset(0, 5, SHAPE, modality="mr")
    onehot = np.eye(5, dtype=np.float32)
    atlas = sum(onehot[t["label"]] for t in train) / len(train)
    atlas = np.log(ndimage.gaussian_filter(atlas, (1.0, 2.0, 2.0, 0.0)) + 1e-3)
    hist = np.ones((len(bins) - 1, 5))
    for t in train:
        np.add.at(hist, (bins_of(t["image"]), t["label"]), 1.0)
    loglik = np.log(hist / hist.sum(0, keepdims=True))

    dice = {}
    for modality in C.CARDIAC_MODALITIES:
        test = C.cardiac_dataset(1, 4, SHAPE, modality=modality)
        pred = [np.argmax(atlas + loglik[bins_of(t["image"])], -1) for t in test]
        dice[modality] = np.mean(
            [_dice(p, t["label"], range(1, 5)) for p, t in zip(pred, test, strict=True)], 0
        )
    # measured: MR AA/LA/LV/Myo 0.60/0.62/0.84/0.72 (mean 0.70); CT 0.00/0.14/0.87/0.00 (0.25).
    # The LV survives (blood is the brightest soft tissue in both); the myocardium, whose
    # contrast against fat and muscle inverts, and the aorta do not.
    assert dice["mr"].mean() > 0.6 and dice["mr"].min() > 0.5
    assert dice["ct"].mean() < dice["mr"].mean() - 0.25
    assert dice["ct"][3] < 0.1  # the myocardium's contrast inverts against fat and muscle


def test_dataset_pairing():
    a = C.cardiac_dataset(2, 2, (8, 32, 32), modality="mr")
    b = C.cardiac_dataset(2, 2, (8, 32, 32), modality="ct")
    assert len(a) == 2 and a[0]["seed"] != b[0]["seed"]
    assert not np.array_equal(a[0]["label"], b[0]["label"])  # unpaired: different subjects
    pa = C.cardiac_dataset(2, 2, (8, 32, 32), modality="mr", paired=True)
    pb = C.cardiac_dataset(2, 2, (8, 32, 32), modality="ct", paired=True)
    np.testing.assert_array_equal(pa[1]["label"], pb[1]["label"])
    again = C.cardiac_phantom(a[1]["seed"], (8, 32, 32))
    np.testing.assert_array_equal(again["image"], a[1]["image"])
    assert C.cardiac_dataset(2, 0) == []


def test_validation_errors():
    with pytest.raises(ValueError, match="shape"):
        C.cardiac_phantom(0, (2, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        C.cardiac_phantom(0, (16, 64))
    with pytest.raises(ValueError, match="modality"):
        C.cardiac_phantom(0, SHAPE, modality="pet")
    with pytest.raises(ValueError, match="spacing"):
        C.cardiac_phantom(0, SHAPE, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="n: "):
        C.cardiac_dataset(0, -1)
    with pytest.raises(ValueError, match="modality"):
        C.cardiac_dataset(0, 1, modality="MR")
    with pytest.raises(ValueError, match="seed"):
        C.cardiac_dataset(-1, 1)


def test_figure_writes_png(tmp_path):
    out = C.save_figure(tmp_path / "cardiac.png", seeds=(1,), shape=(8, 32, 32))
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
