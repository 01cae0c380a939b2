"""In-context tasks: synthetic generators, in-task / task augmentation, folder adapter."""

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medjax.data import tasks as T


def test_generators_split_families_and_are_deterministic():
    train = T.synthetic_tasks(30, split="train", seed=0)
    held = T.synthetic_tasks(15, split="heldout", seed=0)
    assert {t.family[0] for t in train} <= set(T.TRAIN_SHAPES)
    assert {t.family[1] for t in train} <= set(T.TRAIN_STYLES)
    assert {t.family[0] for t in held} <= set(T.HELDOUT_SHAPES)
    assert {t.family[1] for t in held} <= set(T.HELDOUT_STYLES)
    assert not set(T.TRAIN_SHAPES) & set(T.HELDOUT_SHAPES)
    assert not set(T.TRAIN_STYLES) & set(T.HELDOUT_STYLES)
    assert len({t.family for t in train}) >= 4 and len({t.family for t in held}) >= 2
    # each (generator, label) pair is one task
    for t in train[:5]:
        assert 1 <= t.label <= t.gen["num_labels"]
    a = train[3].sample(np.random.default_rng(5), 2, (32, 32))
    b = train[3].sample(np.random.default_rng(5), 2, (32, 32))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_task_samples_are_valid(split):
    rng = np.random.default_rng(0)
    for t in T.synthetic_tasks(6, split=split, seed=1)[::2]:
        images, labels = t.sample(rng, 3, (32, 40))
        assert images.shape == labels.shape == (3, 32, 40, 1)
        assert images.dtype == np.float32 and labels.dtype == np.float32
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert set(np.unique(labels)) <= {0.0, 1.0}
        assert labels.mean(axis=(1, 2, 3)).min() >= 0.005  # the task's label is present


def test_task_is_consistent_in_appearance():
    # within a flat-style generator, foreground intensity sits at the same mean in every subject
    tasks = [t for t in T.synthetic_tasks(40, split="train", seed=2) if t.family[1] == "flat"]
    t = tasks[0]
    t.gen["noise"], t.gen["bias"], t.gen["blur"] = 0.0, 0.0, 0.0
    images, labels = t.sample(np.random.default_rng(1), 4, (48, 48))
    # undo the per-image min-max: compare the ranks of fg/bg means instead of raw values
    fg_higher = [
        images[i][labels[i] > 0].mean() > images[i][labels[i] == 0].mean() for i in range(4)
    ]
    assert len(set(fg_higher)) == 1


def test_sample_episode_shapes():
    tasks = T.synthetic_tasks(4, split="train", seed=3)
    ep = T.sample_episode(tasks, np.random.default_rng(0), support_size=3, size=(32, 32))
    assert ep["query"].shape == ep["query_label"].shape == (32, 32, 1)
    assert ep["support_images"].shape == ep["support_labels"].shape == (3, 32, 32, 1)
    assert 0 <= int(ep["task"]) < len(tasks)
    with pytest.raises(ValueError, match="support_size"):
        T.sample_episode(tasks, np.random.default_rng(0), support_size=0)


def test_sobel_boundary_matches_scipy():
    rng = np.random.default_rng(0)
    lab = (ndimage.gaussian_filter(rng.standard_normal((2, 24, 20)), 3) > 0).astype(np.float32)
    out = np.asarray(T.sobel_boundary(lab[..., None]))[..., 0]
    for i in range(2):
        gx = ndimage.sobel(lab[i], axis=0, mode="constant")
        gy = ndimage.sobel(lab[i], axis=1, mode="constant")
        ref = (np.hypot(gx, gy) > 0).astype(np.float32)
        np.testing.assert_array_equal(out[i], ref)
    interior = ndimage.binary_erosion(lab, np.ones((1, 3, 3)), border_value=0)
    assert out.sum() > 0 and not out[interior].any()  # a band around the edge, not the mask


def _task_batch(b=3, n=4, hw=16, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.random((b, 1, hw, hw, 1), dtype=np.float32)
    lab = (rng.random((b, 1, hw, hw, 1)) > 0.6).astype(np.float32)
    # every image of a task is the same, so an identical change keeps them identical
    return np.repeat(img, n, axis=1), np.repeat(lab, n, axis=1)


def test_task_augment_is_identical_within_a_task():
    img, lab = _task_batch()
    out_i, out_l = T.task_augment(
        jax.random.key(0), img, lab, {"flip": 0.5, "rot90": 0.5, "boundary": 0.5, "invert": 0.5}
    )
    out_i, out_l = np.asarray(out_i), np.asarray(out_l)
    for b in range(3):
        for k in range(1, 4):
            np.testing.assert_array_equal(out_i[b, k], out_i[b, 0])
            np.testing.assert_array_equal(out_l[b, k], out_l[b, 0])


def test_task_augment_closed_forms():
    img, lab = _task_batch()
    i1, l1 = T.task_augment(jax.random.key(1), img, lab, {"invert": 1.0})
    np.testing.assert_allclose(np.asarray(i1), 1.0 - img, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(l1), lab)
    i2, l2 = T.task_augment(jax.random.key(1), img, lab, {"flip": 1.0})
    np.testing.assert_array_equal(np.asarray(i2), img[:, :, ::-1, ::-1])
    np.testing.assert_array_equal(np.asarray(l2), lab[:, :, ::-1, ::-1])
    i3, l3 = T.task_augment(jax.random.key(1), img, lab, {"rot90": 1.0})
    np.testing.assert_array_equal(np.asarray(i3), np.rot90(img, k=-1, axes=(2, 3)))
    _, l4 = T.task_augment(jax.random.key(1), img, lab, {"boundary": 1.0})
    ref = T.sobel_boundary(lab.reshape(-1, 16, 16, 1)).reshape(lab.shape)
    np.testing.assert_array_equal(np.asarray(l4), np.asarray(ref))
    with pytest.raises(ValueError, match="probs"):
        T.task_augment(jax.random.key(1), img, lab, {"solarize": 1.0})
    with pytest.raises(ValueError, match="images"):
        T.task_augment(jax.random.key(1), img[:, 0], lab[:, 0])


def test_in_task_augment_is_independent_per_element():
    img, lab = _task_batch(b=1, n=6, hw=24)
    img, lab = img[0], lab[0]  # (N, H, W, 1), all equal
    out_i, out_l = T.in_task_augment(jax.random.key(3), img, lab)
    out_i, out_l = np.asarray(out_i), np.asarray(out_l)
    assert out_i.shape == img.shape and out_l.shape == lab.shape
    assert out_i.min() >= 0 and out_i.max() <= 1
    assert set(np.unique(out_l)) <= {0.0, 1.0}
    diffs = [np.abs(out_i[k] - out_i[0]).max() for k in range(1, 6)]
    assert min(diffs) > 1e-3  # every element got its own draw
    # identity configuration leaves the pairs unchanged
    same_i, same_l = T.in_task_augment(jax.random.key(3), img, lab, {}, sharpness=None)
    np.testing.assert_array_equal(np.asarray(same_i), img)
    np.testing.assert_array_equal(np.asarray(same_l), lab)


def test_sharpen_closed_form():
    img = jnp.asarray(np.random.default_rng(0).random((2, 12, 12, 1)), jnp.float32)
    out = T.sharpen(jax.random.key(0), img, amount=(0.7, 0.7), sigma=1.0)
    blur = ndimage.gaussian_filter(np.asarray(img), (0, 1.0, 1.0, 0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(img) + 0.7 * (np.asarray(img) - blur), atol=1e-5
    )


def _write_pair(folder, name, img, lab):
    (folder / "images").mkdir(exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), folder / "images" / name)
    nib.save(nib.Nifti1Image(lab.astype(np.int16), np.eye(4)), folder / "labels" / name)


def test_folder_tasks_3d_and_2d(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.random((20, 24, 16)).astype(np.float32) * 100 + 50
    lab = np.zeros(vol.shape, np.int16)
    lab[4:12, 6:14, 3:9] = 1
    lab[14:18, 2:20, 10:14] = 2
    _write_pair(tmp_path, "a.nii.gz", vol, lab)
    tasks = T.folder_tasks(tmp_path, size=32, axes=(0, 2))
    assert sorted(tasks) == ["axis0_label1", "axis0_label2", "axis2_label1", "axis2_label2"]
    t = tasks["axis2_label1"]
    assert t.images.shape == t.labels.shape == (1, 32, 32, 1)
    assert t.images.min() == 0.0 and t.images.max() == pytest.approx(1.0)
    # slice with the largest label-1 area along axis 2 is one of 3..8 (all equal): argmax -> 3
    ref_img = ndimage.zoom(vol[:, :, 3], (32 / 20, 32 / 24), order=1, grid_mode=False)
    ref_img = (ref_img - ref_img.min()) / (ref_img.max() - ref_img.min())
    np.testing.assert_allclose(t.images[0, ..., 0], ref_img, atol=1e-4)
    ref_lab = (
        ndimage.zoom(
            (lab[:, :, 3] == 1).astype(np.float64), (32 / 20, 32 / 24), order=1, grid_mode=False
        )
        >= 0.5
    )
    np.testing.assert_array_equal(t.labels[0, ..., 0], ref_lab.astype(np.float32))

    # 2D files: one task per label value, several subjects per task
    f2 = tmp_path / "two_d"
    f2.mkdir()
    for i in range(3):
        lab2 = np.zeros((16, 16), np.int16)
        lab2[2 + i : 9 + i, 3:10] = 1
        _write_pair(f2, f"s{i}.nii.gz", rng.random((16, 16)), lab2)
    tasks2 = T.folder_tasks(f2, size=16)
    assert list(tasks2) == ["label1"] and tasks2["label1"].images.shape == (3, 16, 16, 1)
    si, sl2 = T.support_set(tasks2["label1"], np.random.default_rng(0), support_size=2, exclude=[1])
    assert si.shape == (2, 16, 16, 1)
    used = {int(np.argmax([np.array_equal(s, x) for x in tasks2["label1"].images])) for s in si}
    assert used == {0, 2}  # no replacement, query excluded
    with pytest.raises(ValueError, match="folder"):
        T.folder_tasks(tmp_path / "missing")
