"""Dice / HD95 / ASSD on a real brain segmentation (VoxelMorph test scan) against MONAI."""

import warnings

import numpy as np

from medjax import metrics
from tests.conftest import require_reference


def test_real_segmentation_matches_monai(shared_data):
    torch = require_reference("torch")
    monai = require_reference("monai")
    seg = np.load(shared_data / "voxelmorph" / "test_scan.npz")["seg"][::4, ::4, ::4]
    ids = np.load(shared_data / "voxelmorph" / "labels.npz")["labels"]
    present = [i for i in ids if i != 0 and (seg == i).any()][:5]
    target = np.zeros(seg.shape, np.int32)
    for k, i in enumerate(present, start=1):
        target[seg == i] = k
    pred = np.roll(target, shift=(1, -1), axis=(0, 2))  # a plausible, imperfect prediction
    pred, target = pred[None], target[None]
    n = len(present) + 1
    spacing = (4.0, 4.0, 4.0)  # every 4th voxel of a 1 mm scan

    def nchw(x):
        return torch.from_numpy(np.moveaxis(np.eye(n, dtype=np.float32)[x], -1, 1).copy())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d_ref = monai.metrics.DiceMetric(include_background=False, reduction="none")(
            nchw(pred), nchw(target)
        ).numpy()
        hd_ref = monai.metrics.HausdorffDistanceMetric(percentile=95, reduction="none")(
            nchw(pred), nchw(target), spacing=spacing
        ).numpy()
        asd_ref = monai.metrics.SurfaceDistanceMetric(symmetric=True, reduction="none")(
            nchw(pred), nchw(target), spacing=spacing
        ).numpy()
    np.testing.assert_allclose(
        np.asarray(metrics.dice(pred, target, num_classes=n)), d_ref, rtol=1e-6
    )
    hd = metrics.hausdorff_distance(pred, target, num_classes=n, spacing=spacing)
    asd = metrics.surface_distance(pred, target, num_classes=n, spacing=spacing)
    np.testing.assert_allclose(hd, hd_ref, rtol=1e-5)
    np.testing.assert_allclose(asd, asd_ref, rtol=1e-5)
    assert np.all(np.isfinite(hd)) and np.all(hd >= 4.0)  # a 1-voxel shift is >= one 4 mm step
