"""Tests for the synthetic brain phantom (medjax.data.synthetic)."""

import numpy as np
import pytest

from medjax.data import synthetic as S
from medjax.ops import warp

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def phantom():
    return S.brain_phantom(3, SHAPE)


@pytest.fixture(scope="module")
def healthy():
    return S.brain_phantom(3, SHAPE, tumour=False)


def _dice_per_label(a, b, labels):
    out = []
    for lab in labels:
        x, y = a == lab, b == lab
        if x.sum() + y.sum():
            out.append(2.0 * (x & y).sum() / (x.sum() + y.sum()))
    return np.array(out)


def test_shapes_dtypes_and_label_sets(phantom):
    assert phantom["image"].shape == (*SHAPE, 4) and phantom["image"].dtype == np.float32
    assert phantom["anatomy"].shape == SHAPE and phantom["anatomy"].dtype == np.int32
    assert phantom["tumour"].shape == SHAPE and phantom["tumour"].dtype == np.int32
    assert phantom["modalities"] == S.MODALITIES
    assert set(np.unique(phantom["anatomy"])) == set(S.ANATOMY_LABELS)
    assert set(np.unique(phantom["tumour"])) == set(S.TUMOUR_LABELS)
    assert np.isfinite(phantom["image"]).all() and (phantom["image"] >= 0).all()
    # skull-stripped: exact zeros outside the head, signal inside the brain
    img, anat = phantom["image"], phantom["anatomy"]
    assert (img[anat == 0] == 0).mean() > 0.98
    assert (img[anat >= 2] > 0).all()
    # the tumour sits inside the brain, around its centre
    centre = phantom["tumour_centre"]
    idx = np.argwhere(phantom["tumour"] > 0)
    assert np.linalg.norm(idx.mean(0) - centre) < 0.5 * phantom["tumour_radius"][0]
    assert (anat[phantom["tumour"] > 0] > 0).all()


def test_determinism_and_seed_dependence(phantom):
    again = S.brain_phantom(3, SHAPE)
    for k in ("image", "anatomy", "tumour", "mass_effect", "tumour_centre"):
        np.testing.assert_array_equal(again[k], phantom[k])
    other = S.brain_phantom(4, SHAPE)
    assert not np.array_equal(other["anatomy"], phantom["anatomy"])
    assert np.abs(other["image"] - phantom["image"]).mean() > 0.05
    assert np.linalg.norm(other["tumour_centre"] - phantom["tumour_centre"]) > 1.0


def test_modality_subset_and_order(phantom):
    sub = S.brain_phantom(3, SHAPE, modalities=("flair", "t1"))
    np.testing.assert_array_equal(sub["image"][..., 0], phantom["image"][..., 3])
    np.testing.assert_array_equal(sub["image"][..., 1], phantom["image"][..., 0])
    np.testing.assert_array_equal(sub["anatomy"], phantom["anatomy"])


def test_resolution_independent_subject():
    small = S.brain_phantom(11, (24, 24, 24))
    large = S.brain_phantom(11, (47, 47, 47))
    # same normalised tumour centre: voxel coordinates scale with (n - 1)
    np.testing.assert_allclose(small["tumour_centre"] / 23, large["tumour_centre"] / 46, atol=1e-5)
    # the small anatomy matches a subsampling of the large one on most voxels
    agree = (small["anatomy"] == large["anatomy"][::2, ::2, ::2]).mean()
    assert agree > 0.85


@pytest.mark.parametrize("seed", [0, 5])
def test_modality_contrasts_look_like_brats(seed):
    ph = S.brain_phantom(seed, SHAPE)
    img, anat, tum = ph["image"], ph["anatomy"], ph["tumour"]
    healthy = tum == 0

    def mean(mask, mod):
        return img[..., S.MODALITIES.index(mod)][mask].mean()

    csf, gm, wm = (anat == 1) & healthy, (anat == 2) & healthy, (anat == 3) & healthy
    oedema, et, ncr = tum == 2, tum == 3, tum == 1
    # T1: WM > GM > CSF, tumour core hypo-intense
    assert mean(wm, "t1") > mean(gm, "t1") > mean(csf, "t1")
    assert mean(et | ncr, "t1") < mean(wm, "t1")
    # T1ce: enhancing rim bright, brighter than necrosis and WM
    assert mean(et, "t1ce") > mean(wm, "t1ce")
    if ncr.any():
        assert mean(et, "t1ce") > mean(ncr, "t1ce")
    # T2: CSF and oedema bright
    assert mean(csf, "t2") > mean(wm, "t2")
    assert mean(oedema, "t2") > mean(wm, "t2")
    # FLAIR: CSF dark, oedema bright
    assert mean(csf, "flair") < mean(wm, "flair") < mean(oedema, "flair")


def test_tumour_false_is_the_same_healthy_subject(healthy, phantom):
    assert (healthy["tumour"] == 0).all()
    assert np.isnan(healthy["tumour_centre"]).all()
    assert (healthy["mass_effect"] == 0).all()
    # far from the tumour the subject is unchanged
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    far = np.linalg.norm(grid - phantom["tumour_centre"], axis=-1) > 4 * phantom["core_radius"][0]
    assert (healthy["anatomy"][far] == phantom["anatomy"][far]).mean() > 0.98


def test_mass_effect_moves_tissue_radially():
    phantom = S.brain_phantom(4, SHAPE)
    healthy = S.brain_phantom(4, SHAPE, tumour=False)
    disp = phantom["mass_effect"]
    centre = phantom["tumour_centre"]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    rel = grid - centre
    dist = np.linalg.norm(rel, axis=-1)
    mag = np.linalg.norm(disp, axis=-1)
    core = phantom["core_radius"][0]
    # the output samples the healthy tissue closer to the centre: tissue was pushed outwards
    moving = mag > 1e-3
    assert moving.mean() > 0.5
    cos = (disp * rel).sum(-1)[moving] / (mag[moving] * dist[moving])
    assert (cos < -0.999).all()
    # volume-preserving push: the displacement is ~core radius at the core and decays outwards
    shell = (dist > 1.1 * core) & (dist < 1.5 * core)
    expected = dist - np.cbrt(np.clip(dist**3 - core**3, 0, None))
    np.testing.assert_allclose(mag[shell], expected[shell], rtol=1e-3, atol=1e-3)
    assert mag[dist > 3 * core].max() < 0.05 * core * 3
    # the anatomy with tumour is the healthy anatomy warped by the mass effect
    moved = np.asarray(warp(healthy["anatomy"][None, ..., None], disp[None], order=0)[0, ..., 0])
    brain = (moved > 0) | (phantom["anatomy"] > 0)
    assert (moved == phantom["anatomy"])[brain].mean() > 0.9
    # the healthy tissue at the centre now fills the core, and the other tissue was pushed out:
    # what lay within (R^3 - r^3)^(1/3) of the centre now lies within R
    centre_label = healthy["anatomy"][tuple(np.round(centre).astype(int))]
    assert (phantom["anatomy"][dist < 0.9 * core] == centre_label).all()
    for f in (2.0, 2.5, 3.0):
        radius = f * core
        n_tumour = ((phantom["anatomy"] != centre_label) & (dist < radius)).sum()
        n_healthy = ((healthy["anatomy"] != centre_label) & (dist < radius)).sum()
        inner = np.cbrt(radius**3 - core**3)
        n_pushed = ((healthy["anatomy"] != centre_label) & (dist < inner)).sum()
        assert n_tumour < n_healthy
        assert abs(n_tumour - n_pushed) <= 0.1 * n_pushed + 5


def test_pair_anatomy_overlap_is_partial():
    pair = S.phantom_pair(0, SHAPE)
    for side in ("moving", "fixed"):
        for k in ("image", "anatomy", "tumour", "tumour_centre", "mass_effect"):
            assert f"{side}_{k}" in pair
    labels = [k for k in S.ANATOMY_LABELS if k]
    dice = _dice_per_label(pair["moving_anatomy"], pair["fixed_anatomy"], labels)
    assert 0.3 < dice.mean() < 0.8, dice
    # a subject matches itself perfectly, so the gap is the registration task
    assert _dice_per_label(pair["moving_anatomy"], pair["moving_anatomy"], labels).min() == 1.0
    assert np.linalg.norm(pair["moving_tumour_centre"] - pair["fixed_tumour_centre"]) > 1.0
    no_tumour = S.phantom_pair(0, SHAPE, tumour_fixed=False)
    assert (no_tumour["fixed_tumour"] == 0).all() and (no_tumour["moving_tumour"] > 0).any()
    np.testing.assert_array_equal(no_tumour["moving_image"], pair["moving_image"])


def test_validation_errors():
    with pytest.raises(ValueError, match="shape"):
        S.brain_phantom(0, (16, 16))
    with pytest.raises(ValueError, match="modalities"):
        S.brain_phantom(0, (16, 16, 16), modalities=("t1", "dwi"))


def test_figure_script_writes_png(tmp_path):
    out = S.save_figure(tmp_path / "ph.png", seeds=(1,), shape=(20, 20, 20))
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
