"""medjax.evaluation.segmentation: hand-computed metrics, the evaluator's aggregation, the predictor
(one pass vs sliding windows) and predict_files' geometry round trip."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medjax.evaluation.segmentation import (
    Prepared,
    case_metrics,
    evaluate_segmentation,
    make_predictor,
    predict_files,
)


def _cube(shape, lo, hi, value=1):
    a = np.zeros(shape, np.int32)
    a[tuple(slice(lo_, hi_) for lo_, hi_ in zip(lo, hi, strict=True))] = value
    return a


def test_case_metrics_hand_computed():
    truth = _cube((10, 10, 10), (2, 2, 2), (6, 6, 6))  # 64 voxels
    pred = _cube((10, 10, 10), (3, 2, 2), (7, 6, 6))  # shifted by one voxel along axis 0
    m = case_metrics(
        pred, truth, num_classes=3, class_names=("bg", "a", "b"), spacing=(2.0, 1.0, 1.0)
    )
    assert m["dice_a"] == pytest.approx(2 * 48 / 128)
    assert np.isnan(m["dice_b"]) and m["mean_dice"] == pytest.approx(0.75)  # b absent: left out
    # one voxel along axis 0 at 2 mm: the two surfaces are 2 mm apart where they differ
    assert m["hd95_a"] == pytest.approx(2.0)
    assert 0 < m["assd_a"] <= 2.0
    only = case_metrics(pred, truth, num_classes=3, surface=False, classes=[1])
    assert set(only) == {"dice_class1", "mean_dice"}
    with pytest.raises(ValueError, match="shape"):
        case_metrics(pred[:5], truth, num_classes=2)


def test_evaluate_segmentation_aggregates_per_case_values():
    cases = []
    for i in range(3):
        lab = _cube((8, 8, 8), (1, 1, 1), (4 + i, 5, 5))
        cases.append(
            {
                "id": f"c{i}",
                "image": lab[..., None].astype(np.float32),
                "label": lab,
                "spacing": (1.0, 1.0, 1.0),
            }
        )

    # a predictor that thresholds the image (perfect) except that case 2 loses one slab
    def predict(x):
        lab = np.asarray(x[0, ..., 0] > 0.5, np.int32)
        if lab.sum() == 3 * 4 * 4 * 6 // 2 * 2:  # never true: keep the predictor honest
            lab[:] = 0
        return jax.nn.one_hot(lab, 2)[None]

    res = evaluate_segmentation(cases, predict, num_classes=2, class_names=("fg",))
    assert res["num_cases"] == 3 and [c["id"] for c in res["per_case"]] == ["c0", "c1", "c2"]
    assert res["dice_fg"] == 1.0 and res["dice_fg_std"] == 0.0 and res["hd95_fg"] == 0.0
    seen = []
    evaluate_segmentation(
        cases[:1],
        lambda x: jax.nn.one_hot(jnp.zeros(x.shape[1:-1], jnp.int32), 2)[None],
        num_classes=2,
        on_case=lambda i, c, p, q: seen.append((i, int(p.sum()))),
    )
    assert seen == [(0, 0)]
    with pytest.raises(ValueError, match="expected"):
        evaluate_segmentation(cases[:1], lambda x: jnp.zeros((1, 8, 8, 8, 3)), num_classes=2)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        return nn.Conv(3, (3, 3, 3))(x)


def test_predictor_one_pass_equals_sliding_window_with_one_window_and_is_close_with_many():
    net = _Net()
    x = np.random.default_rng(0).normal(size=(1, 12, 12, 12, 2)).astype(np.float32)
    v = net.init(jax.random.key(0), x)
    whole = np.asarray(make_predictor(net.apply, v)(x))
    one = np.asarray(make_predictor(net.apply, v, roi_size=(12, 12, 12))(x))
    np.testing.assert_allclose(one, whole, atol=1e-6)
    # many overlapping windows of a 3x3x3 conv: identical away from the window borders
    many = np.asarray(
        make_predictor(net.apply, v, roi_size=(8, 8, 8), sw_batch_size=3, mode="constant")(x)
    )
    np.testing.assert_allclose(many[:, 5:7, 5:7, 5:7], whole[:, 5:7, 5:7, 5:7], atol=1e-5)


def test_predict_files_restores_the_input_grid_and_header(tmp_path):
    affine = np.diag([1.5, -1.0, 2.0, 1.0])
    affine[:3, 3] = [3.0, 4.0, 5.0]
    img = nib.Nifti1Image(
        np.random.default_rng(1).normal(size=(7, 9, 6)).astype(np.float32), affine
    )
    img.set_sform(affine, code=4)
    path = tmp_path / "scan.nii.gz"
    nib.save(img, str(path))

    def preprocess(image):  # pad to (8, 12, 8) at the end, as a network multiple would need
        a = image.array
        pads = [(0, 8 - 7), (0, 12 - 9), (0, 8 - 6), (0, 0)]

        def restore(y, order=0):
            return y[:7, :9, :6]

        return Prepared(np.pad(a, pads), restore)

    def predict(x):  # class 1 where the intensity is positive
        return jax.nn.one_hot((x[..., 0] > 0).astype(jnp.int32), 2)

    written = predict_files(
        [path],
        tmp_path / "out",
        predict=predict,
        preprocess=preprocess,
        num_classes=2,
        probabilities=True,
        metadata={"model": "threshold"},
    )
    assert [p.name for p in written] == ["scan_seg.nii.gz", "scan_probs.nii.gz"]
    info = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert info == {"model": "threshold", "outputs": {str(path): [str(p) for p in written]}}
    seg = nib.load(str(written[0]))
    assert seg.shape == (7, 9, 6) and int(seg.header["sform_code"]) == 4
    np.testing.assert_allclose(seg.affine, affine)
    np.testing.assert_array_equal(
        np.asarray(seg.dataobj), (np.asarray(img.dataobj) > 0).astype(np.int32)
    )
    assert nib.load(str(written[1])).shape == (7, 9, 6, 2)
