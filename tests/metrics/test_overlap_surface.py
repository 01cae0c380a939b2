"""Dice, confusion matrix, Hausdorff and surface distances: hand-computed cases and MONAI parity."""

import warnings

import numpy as np
import pytest
from scipy import ndimage

from medjax import metrics
from tests.conftest import require_reference


def _blobs(rng, shape, num_classes, sigma=1.5):
    """Smooth random label maps (B, *S): argmax of blurred noise, so classes form blobs."""
    noise = rng.normal(size=shape + (num_classes,))
    for c in range(num_classes):
        for b in range(shape[0]):
            noise[b, ..., c] = ndimage.gaussian_filter(noise[b, ..., c], sigma)
    return noise.argmax(-1).astype(np.int32)


def _nchw(labels, num_classes):
    import torch

    oh = np.eye(num_classes, dtype=np.float32)[labels]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(oh, -1, 1)))


def test_dice_hand_computed():
    pred = np.array([[[1, 1, 0], [2, 0, 0]]], np.int32)
    target = np.array([[[1, 0, 0], [2, 2, 0]]], np.int32)
    # class 1: |P|=2 |T|=1 inter=1 -> 2/3 ; class 2: |P|=1 |T|=2 inter=1 -> 2/3; class 0: 3,3,2 -> 2/3
    got = np.asarray(metrics.dice(pred, target, num_classes=4, include_background=True))
    np.testing.assert_allclose(got[0, :3], [2 / 3, 2 / 3, 2 / 3], rtol=1e-6)
    assert np.isnan(got[0, 3])  # class 3 absent from the target
    got = np.asarray(metrics.dice(pred, target, num_classes=4, ignore_empty=False))
    assert got.shape == (1, 3)
    np.testing.assert_allclose(got[0], [2 / 3, 2 / 3, 1.0], rtol=1e-6)  # both empty -> 1
    pred2 = pred.copy()
    pred2[0, 0, 2] = 3
    got = np.asarray(metrics.dice(pred2, target, num_classes=4, ignore_empty=False))
    assert got[0, 2] == 0.0  # empty target, non-empty prediction -> 0


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("ignore_empty", [True, False])
def test_dice_matches_monai(include_background, ignore_empty):
    torch = require_reference("torch")
    monai = require_reference("monai")
    rng = np.random.default_rng(0)
    pred = _blobs(rng, (3, 10, 9, 8), 4)
    target = _blobs(rng, (3, 10, 9, 8), 4)
    target[0][target[0] == 3] = 0  # empty ground truth for class 3 in sample 0
    pred[1][pred[1] == 2] = 1
    target[1][target[1] == 2] = 1  # both empty for class 2 in sample 1
    ref = monai.metrics.DiceMetric(
        include_background=include_background, reduction="none", ignore_empty=ignore_empty
    )
    with torch.no_grad():
        want = ref(_nchw(pred, 4), _nchw(target, 4)).numpy()
    got = np.asarray(
        metrics.dice(
            pred,
            target,
            num_classes=4,
            include_background=include_background,
            ignore_empty=ignore_empty,
        )
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)


def test_confusion_matrix_loop_and_dice_consistency():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=(2, 5, 4))
    target = rng.integers(0, 3, size=(2, 5, 4))
    want = np.zeros((3, 3), np.int64)
    for idx in np.ndindex(pred.shape):
        want[target[idx], pred[idx]] += 1
    cm = np.asarray(metrics.confusion_matrix(pred, target, num_classes=3))
    np.testing.assert_array_equal(cm, want)
    # Dice from the pooled confusion matrix equals Dice of the batch viewed as one sample
    d = np.asarray(
        metrics.dice(
            pred.reshape(1, -1), target.reshape(1, -1), num_classes=3, include_background=True
        )
    )[0]
    tp = np.diag(cm)
    np.testing.assert_allclose(d, 2 * tp / (cm.sum(0) + cm.sum(1)), rtol=1e-6)


def test_hausdorff_hand_computed():
    pred = np.zeros((1, 7, 8), np.int32)
    target = np.zeros((1, 7, 8), np.int32)
    pred[0, 2, 2] = 1
    target[0, 2, 5] = 1
    hd = metrics.hausdorff_distance(pred, target, num_classes=2, percentile=None)
    assert hd.shape == (1, 1)
    assert hd[0, 0] == pytest.approx(3.0)
    hd = metrics.hausdorff_distance(pred, target, num_classes=2, spacing=(1.0, 2.0))
    assert hd[0, 0] == pytest.approx(6.0)
    asd = metrics.surface_distance(pred, target, num_classes=2, spacing=(1.0, 2.0))
    assert asd[0, 0] == pytest.approx(6.0)
    # a 3-voxel bar vs a single voxel: directed distances P->T {0, 1, 2}, T->P {0}
    pred[0] = 0
    pred[0, 4, 3:6] = 1
    target[0] = 0
    target[0, 4, 3] = 1
    assert metrics.hausdorff_distance(pred, target, num_classes=2, percentile=None)[0, 0] == 2.0
    # 50th percentile of {0, 1, 2} is 1; of {0} is 0
    assert metrics.hausdorff_distance(pred, target, num_classes=2, percentile=50)[0, 0] == 1.0
    # ASSD: mean of {0, 1, 2, 0} = 0.75; directed P->T mean = 1
    assert metrics.surface_distance(pred, target, num_classes=2)[0, 0] == pytest.approx(0.75)
    assert metrics.surface_distance(pred, target, num_classes=2, symmetric=False)[0, 0] == 1.0


def test_surface_metrics_empty_conventions():
    pred = np.zeros((1, 6, 6), np.int32)
    target = np.zeros((1, 6, 6), np.int32)
    target[0, 1:3, 1:3] = 1
    # one mask empty: inf for max-HD and ASSD, NaN for HD95 (MONAI's torch.quantile of infs)
    assert np.isnan(metrics.hausdorff_distance(pred, target, num_classes=2)[0, 0])
    assert np.isinf(metrics.hausdorff_distance(pred, target, num_classes=2, percentile=None)[0, 0])
    assert np.isinf(metrics.surface_distance(target, pred, num_classes=2)[0, 0])
    assert np.isnan(metrics.hausdorff_distance(pred, pred, num_classes=2)[0, 0])
    assert np.isnan(metrics.surface_distance(pred, pred, num_classes=2)[0, 0])


@pytest.mark.parametrize(
    "shape,spacing,include_background",
    [
        ((2, 14, 12), None, False),
        ((2, 12, 11, 9), (0.8, 1.5, 2.5), False),
        ((2, 10, 9, 8), [[1.0, 1.0, 3.0], [0.5, 2.0, 1.0]], True),
    ],
)
def test_surface_metrics_match_monai(shape, spacing, include_background):
    require_reference("torch")
    monai = require_reference("monai")
    rng = np.random.default_rng(len(shape))
    pred = _blobs(rng, shape, 3)
    target = _blobs(rng, shape, 3)
    target[0][target[0] == 2] = 0  # class 2 empty in target of sample 0 -> inf
    pred[1][pred[1] == 2] = 1
    target[1][target[1] == 2] = 1  # class 2 empty in both in sample 1 -> NaN
    yp, yt = _nchw(pred, 3), _nchw(target, 3)
    kw = {} if spacing is None else {"spacing": spacing}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd_ref = monai.metrics.HausdorffDistanceMetric(
            include_background=include_background, percentile=95, reduction="none"
        )(yp, yt, **kw).numpy()
        asd_ref = monai.metrics.SurfaceDistanceMetric(
            include_background=include_background, symmetric=True, reduction="none"
        )(yp, yt, **kw).numpy()
        hd_max_ref = monai.metrics.HausdorffDistanceMetric(
            include_background=include_background, reduction="none"
        )(yp, yt, **kw).numpy()
    args = dict(num_classes=3, spacing=spacing, include_background=include_background)
    hd = metrics.hausdorff_distance(pred, target, percentile=95, **args)
    hd_max = metrics.hausdorff_distance(pred, target, percentile=None, **args)
    asd = metrics.surface_distance(pred, target, **args)
    assert np.isnan(hd_ref).any() and np.isinf(hd_max_ref).any()  # the edge cases are exercised
    np.testing.assert_allclose(hd, hd_ref, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(hd_max, hd_max_ref, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(asd, asd_ref, rtol=1e-5, equal_nan=True)


def test_validation_errors():
    a = np.zeros((1, 4, 4), np.int32)
    for fn in (metrics.dice, metrics.hausdorff_distance, metrics.surface_distance):
        with pytest.raises(ValueError, match="target"):
            fn(a, a[:, :3], num_classes=2)
        with pytest.raises(ValueError, match="pred"):
            fn(np.full_like(a, 2), a, num_classes=2)
        with pytest.raises(ValueError, match="target"):
            fn(a, np.full_like(a, -1), num_classes=2)
        with pytest.raises(ValueError, match="pred"):
            fn(np.full((1, 4, 4), np.nan), a, num_classes=2)
        with pytest.raises(ValueError, match="pred"):
            fn(np.zeros(4, np.int32), np.zeros(4, np.int32), num_classes=2)
        with pytest.raises(ValueError, match="num_classes"):
            fn(a, a, num_classes=0)
    with pytest.raises(ValueError, match="pred"):
        metrics.confusion_matrix(np.full((1, 2), 0.5), np.zeros((1, 2)), num_classes=2)
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff_distance(a, a, num_classes=2, spacing=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.surface_distance(a, a, num_classes=2, spacing=-1.0)
    with pytest.raises(ValueError, match="percentile"):
        metrics.hausdorff_distance(a, a, num_classes=2, percentile=101)


def test_dice_under_jit_matches_eager():
    import jax

    rng = np.random.default_rng(5)
    pred = rng.integers(0, 3, size=(2, 6, 5))
    target = rng.integers(0, 3, size=(2, 6, 5))
    eager = np.asarray(metrics.dice(pred, target, num_classes=3))
    jitted = jax.jit(lambda p, t: metrics.dice(p, t, num_classes=3))(pred, target)
    np.testing.assert_array_equal(np.asarray(jitted), eager)
