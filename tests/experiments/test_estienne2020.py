"""experiments/estienne2020: tiny end-to-end runs through the ``medjax`` command (train, eval, predict)."""

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medjax.cli import main
from medjax.data import synthetic
from medjax.nn.blocks import fast_init
from medjax.train.experiment import load_experiment

# A 3-level network on 16^3 volumes keeps every run to seconds; the layout is the paper's otherwise.
TINY = [
    "--config.num_steps=3",
    "--config.log_every=1",
    "--config.checkpoint_every=3",
    "--config.synthetic.shape=(16,16,16)",
    "--config.synthetic.num_train=4",
    "--config.synthetic.num_test_pairs=2",
    "--config.model.f=4",
    "--config.model.multipliers=(1,2,4)",
    "--config.model.enc_convs=(1,2,2)",
    "--config.model.dec_convs=(2,1)",
]
NO_EXTRA_DEFORMATION = [
    "--config.synthetic.rotation=0.0",
    "--config.synthetic.scale=0.0",
    "--config.synthetic.translation=0.0",
    "--config.synthetic.elastic=0.0",
]


def _affine(seed):
    """A non-trivial voxel -> world affine (anisotropic spacing, a flip, a translation)."""
    a = np.diag([1.5, -1.0, 2.0, 1.0])
    a[:3, 3] = [10.0 + seed, -20.0, 5.5]
    return a


def _write_nifti(path, array, affine, sform_code=2):
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.set_sform(affine, code=sform_code)
    nib.save(img, str(path))
    return path


def _dice_after_with_scipy(work):
    """Per test pair: mean Dice over fixed structures of the moving labels warped by SciPy."""
    import jax
    from scipy import ndimage

    from medjax.train import load_experiment
    from medjax.train.checkpoint import abstract_state, restore_state
    from medjax.train.config import config_from_json
    from medjax.train.mesh import make_mesh, replicated

    config = config_from_json(json.loads((work / "config.json").read_text()))
    ex = load_experiment("estienne2020").build(config)
    abstract = abstract_state(ex.init_state, replicated(make_mesh()), jax.random.PRNGKey(0))
    state, _ = restore_state(work, abstract)
    out = []
    for pair in ex.data.test_pairs():
        disp = ex.forward(state, pair["moving"][None], pair["fixed"][None])["displacement"][0]
        am, af = pair["anatomy_moving"], pair["anatomy_fixed"]
        coords = np.indices(am.shape) + np.moveaxis(disp, -1, 0)
        warped = ndimage.map_coordinates(am, coords, order=0, mode="nearest")
        d = []
        for c in range(1, 8):
            a, b = warped == c, af == c
            if b.any():
                d.append(2 * np.sum(a & b) / (a.sum() + b.sum()))
        out.append(np.mean(d))
    return out


def test_synthetic_train_eval_predict(tmp_path, capsys):
    work = tmp_path / "run"
    args = ["train", "estienne2020", "--variant", "quick", "--workdir", str(work), *TINY]
    assert main(args + NO_EXTRA_DEFORMATION) == 0
    capsys.readouterr()
    assert main(["eval", "estienne2020", "--workdir", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["experiment"] == "estienne2020" and res["checkpoint_step"] == 3
    assert res["num_test_pairs"] == 2
    # eval prints the before/after table (also saved as results.md) and where everything is
    printed = capsys.readouterr().out
    row = f"| anatomical Dice | {res['anatomical_dice_before']:.3f} ± "
    assert row in printed and row in (work / "results.md").read_text()
    assert (
        f"{res['anatomical_dice_after']:.3f} ± {res['anatomical_dice_after_std']:.3f} |" in printed
    )
    assert str(work / "figures") in printed and str(work / "checkpoints") in printed
    keys = [
        "anatomical_dice_before",
        "anatomical_dice_after",
        "dice_near_tumour_after",
        "dice_far_tumour_after",
        "tumour_dice_ncr",
        "tumour_dice_ed",
        "tumour_dice_et",
        "tumour_dice_whole",
        "image_mse_before",
        "image_mse_after",
        "folding_percent",
        "jacobian_std",
    ]
    for k in keys:
        assert k in res and f"{k}_std" in res, k
    for k in ("anatomical_dice_before", "anatomical_dice_after", "image_mse_after"):
        assert math.isfinite(res[k]), (k, res[k])
    assert 0.0 <= res["anatomical_dice_after"] <= 1.0
    assert 0.0 <= res["folding_percent"] <= 100.0
    # Identity Dice "before" recomputed independently (NumPy) from the same test pairs.
    s = [synthetic.brain_phantom(1234 + 200_000 + i, (16, 16, 16)) for i in range(4)]
    ref = []
    for m, f in ((s[0], s[1]), (s[2], s[3])):
        d = []
        for c in range(1, 8):
            a, b = m["anatomy"] == c, f["anatomy"] == c
            if b.any():
                d.append(2 * np.sum(a & b) / (a.sum() + b.sum()))
        ref.append(np.mean(d))
    np.testing.assert_allclose(res["anatomical_dice_before"], np.mean(ref), rtol=1e-5)
    # "after" recomputed from the checkpoint's displacements with SciPy nearest-neighbour sampling
    after = _dice_after_with_scipy(work)
    np.testing.assert_allclose(res["per_pair"]["anatomical_dice_after"], after, rtol=1e-5)
    assert {
        "registration_pair0.png",
        "deformation_pair0.png",
        "tumour_moving_pair0.png",
        "tumour_fixed_pair0.png",
    } <= set(res["figures"])

    # test-time refinement as an evaluation option: reported beside the network's numbers
    capsys.readouterr()
    assert (
        main(["eval", "estienne2020", "--workdir", str(work), "--config.eval.refine_steps=5"]) == 0
    )
    ref = json.loads((work / "results.json").read_text())
    assert "5-step refinement" in capsys.readouterr().out
    assert ref["refine_objective_after"] <= ref["refine_objective_before"]
    for k in (
        "anatomical_dice_refined",
        "image_mse_refined",
        "folding_percent_refined",
        "refine_s",
    ):
        assert k in ref and math.isfinite(ref[k]), k
    assert ref["anatomical_dice_after"] == res["anatomical_dice_after"]  # the network is unchanged

    # predict on a NIfTI pair whose size is not a multiple of 4 (padded inside, cropped back)
    shape = (15, 16, 14)
    sub_m = synthetic.brain_phantom(7, shape)
    sub_f = synthetic.brain_phantom(8, shape)
    mov = _write_nifti(tmp_path / "moving.nii.gz", sub_m["image"], _affine(0))
    fix = _write_nifti(tmp_path / "fixed.nii.gz", sub_f["image"], _affine(1), sform_code=4)
    out = tmp_path / "pred"
    capsys.readouterr()
    assert main(["predict", "--workdir", str(work), str(mov), str(fix), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    expect = {
        "displacement.nii.gz": ((*shape, 3), _affine(1)),
        "warped.nii.gz": ((*shape, 4), _affine(1)),
        # the two scans' grids differ (by 1 mm): the moving scan is resampled onto the fixed
        # grid first, so every output lies on the fixed grid
        "seg_moving.nii.gz": (shape, _affine(1)),
        "seg_fixed.nii.gz": (shape, _affine(1)),
        "warped_seg.nii.gz": (shape, _affine(1)),
    }
    assert sorted(pathlib.Path(p).name for p in printed) == sorted(expect)
    for name, (shp, aff) in expect.items():
        img = nib.load(str(out / name))
        assert img.shape == shp, name
        np.testing.assert_allclose(img.affine, aff, atol=1e-5, err_msg=name)
        # the fixed input's header travels too (its sform code 4 = MNI)
        assert int(img.header["sform_code"]) == 4, name
    assert json.loads((out / "predict.json").read_text())["moving_resampled_onto_fixed_grid"]
    seg = np.asarray(nib.load(str(out / "seg_fixed.nii.gz")).dataobj)
    assert seg.min() >= 0 and seg.max() <= 3
    disp = np.asarray(nib.load(str(out / "displacement.nii.gz")).dataobj)
    assert np.all(np.isfinite(disp))

    # predict preprocesses exactly as training does: the raw test pair 0 written as NIfTI gives
    # the displacement that the evaluation computed from the training pipeline's arrays
    import jax

    from medjax.train import load_experiment
    from medjax.train.checkpoint import abstract_state, restore_state
    from medjax.train.config import config_from_json
    from medjax.train.mesh import make_mesh, replicated

    config = config_from_json(json.loads((work / "config.json").read_text()))
    ex = load_experiment("estienne2020").build(config)
    state, _ = restore_state(
        work, abstract_state(ex.init_state, replicated(make_mesh()), jax.random.PRNGKey(0))
    )
    pair = next(ex.data.test_pairs())
    expected = ex.forward(state, pair["moving"][None], pair["fixed"][None])["displacement"][0]
    raw = [synthetic.brain_phantom(1234 + 200_000 + i, (16, 16, 16))["image"] for i in (0, 1)]
    paths = [_write_nifti(tmp_path / f"raw{i}.nii.gz", raw[i], np.eye(4)) for i in (0, 1)]
    assert (
        main(["predict", "--workdir", str(work), *map(str, paths), "--out", str(tmp_path / "p2")])
        == 0
    )
    got = np.asarray(nib.load(str(tmp_path / "p2" / "displacement.nii.gz")).dataobj)
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # wrong inputs are refused with one line naming them (exit code 2)
    capsys.readouterr()
    assert main(["predict", "--workdir", str(work), str(mov), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("medjax: error: inputs: expected [moving, fixed]") and err.count("\n") == 1
    )


def _oasis_folder(root, n=6, shape=(16, 16, 16)):
    """An OASIS-style folder (neurite-oasis names): T1 image + anatomical labels, no tumour."""
    for i in range(n):
        d = root / f"OASIS_OAS1_{i + 1:04d}_MR1"
        d.mkdir(parents=True)
        s = synthetic.brain_phantom(500 + i, shape, tumour=False, modalities=("t1",))
        aff = _affine(i)
        _write_nifti(d / "aligned_norm.nii.gz", s["image"][..., 0], aff)
        _write_nifti(d / "aligned_seg35.nii.gz", s["anatomy"].astype(np.int16), aff)
        _write_nifti(d / "aligned_seg4.nii.gz", np.minimum(s["anatomy"], 4).astype(np.int16), aff)
    return root


def test_oasis_folder_registration_only(tmp_path):
    data = _oasis_folder(tmp_path / "oasis")
    work = tmp_path / "run"
    args = [
        "train",
        "estienne2020",
        "--variant",
        "quick",
        "--workdir",
        str(work),
        *TINY,
        "--config.num_steps=2",
        "--config.checkpoint_every=2",
        "--config.data=oasis",
        f"--config.data_dir={data}",
        "--config.oasis_crop=(16,16,16)",
    ]
    assert main(args) == 0
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert all(r["seg"] == 0.0 for r in logged)  # segmentation loss off
    assert main(["eval", "estienne2020", "--workdir", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["data"] == "oasis" and res["num_test_pairs"] >= 1
    for k in ("anatomical_dice_before", "anatomical_dice_after"):
        assert math.isfinite(res[k]) and 0.0 < res[k] <= 1.0, (k, res[k])
    assert "tumour_dice_whole" not in res  # no tumour labels in OASIS
    # predict needs no training folder: the model is restored without reading the data
    pair = [data / "OASIS_OAS1_0001_MR1" / "aligned_norm.nii.gz", data / "OASIS_OAS1_0002_MR1"]
    pair[1] = pair[1] / "aligned_norm.nii.gz"
    moved = tmp_path / "pair"
    moved.mkdir()
    for k, p in enumerate(pair):
        pair[k] = p.rename(moved / f"{k}.nii.gz")
    shutil.rmtree(data)
    out = tmp_path / "pred"
    assert main(["predict", "--workdir", str(work), *map(str, pair), "--out", str(out)]) == 0
    assert (out / "displacement.nii.gz").is_file() and (out / "warped.nii.gz").is_file()


def test_parameters_do_not_depend_on_the_initialisation_size():
    """init_state initialises at the smallest valid size: the same parameters as at the data's."""
    spec = load_experiment("estienne2020")
    for kind in ("joint", "voxelmorph", "segonly"):
        ex = spec.build(_config(f"model.kind={kind}", "synthetic.shape=(32,32,32)"))
        small = ex.init_state(jax.random.PRNGKey(3))
        shape = ex.data.shape
        x = jnp.zeros((1, *shape, ex.n_modalities), jnp.float32)
        args = (x,) if kind == "segonly" else (x, x)
        big = fast_init(ex.model, jax.random.PRNGKey(3), *args)  # as init_state, at 32^3
        assert shape == (32, 32, 32)
        flat = jax.tree_util.tree_leaves_with_path(big["params"])
        got = dict(jax.tree_util.tree_leaves_with_path(small.params))
        assert len(flat) == len(got) > 10, kind
        for path, value in flat:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=kind)


def test_subject_deformation_closed_forms():
    from medjax import metrics
    from medjax.train import load_experiment

    task = load_experiment("estienne2020").task_module
    shape = (16, 16, 16)
    zero = task.subject_deformation(3, shape, (0.0, 0.0, 0.0, 0.0, 4.0))
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)
    # a pure translation: the same vector everywhere, each component within +-2 voxels
    shift = task.subject_deformation(3, shape, (0.0, 0.0, 2.0, 0.0, 4.0))
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0, 0, 0], shift.shape), atol=1e-5)
    assert np.all(np.abs(shift[0, 0, 0]) <= 2.0) and np.any(np.abs(shift[0, 0, 0]) > 0.01)
    # a pure rotation about the centre: affine (zero second differences), volume preserving
    rot = task.subject_deformation(4, shape, (10.0, 0.0, 0.0, 0.0, 4.0))
    for ax in range(3):
        np.testing.assert_allclose(np.diff(rot, n=2, axis=ax), 0.0, atol=1e-4)
    det = np.asarray(metrics.jacobian_determinant(rot[None]))[0]
    np.testing.assert_allclose(det[2:-2, 2:-2, 2:-2], 1.0, atol=1e-4)
    assert np.abs(rot).max() > 0.1
    # deterministic in the seed, different across seeds
    again = task.subject_deformation(4, shape, (10.0, 0.05, 1.0, 1.0, 4.0))
    np.testing.assert_array_equal(
        again, task.subject_deformation(4, shape, (10.0, 0.05, 1.0, 1.0, 4.0))
    )
    assert not np.allclose(again, task.subject_deformation(5, shape, (10.0, 0.05, 1.0, 1.0, 4.0)))


def test_config_variants_and_validation():
    from medjax.train import load_config, load_experiment

    spec = load_experiment("estienne2020")
    assert set(spec.variants) == {"quick", "paper"}
    paper = spec.get_config("paper")
    assert tuple(paper.brats_crop) == (144, 208, 144) and paper.model.f == 8
    assert paper.optimizer.learning_rate == 2e-3 and paper.batch_size == 2
    assert dict(paper.reduce_on_plateau) == {"factor": 0.2, "patience": 30}
    assert dict(paper.early_stopping) == {"patience": 50}
    with pytest.raises(ValueError, match="variant"):
        spec.get_config("huge")
    cfg = load_config("estienne2020", "quick", ["model.kind=unet"])
    with pytest.raises(ValueError, match="config.model.kind"):
        spec.build(cfg)
    cfg = load_config("estienne2020", "quick", ["data=brats"])
    with pytest.raises(ValueError, match="config.data_dir"):
        _ = spec.build(cfg).data  # built on first use: predict needs no training folder
    # tumour labels 0..3 with a 2-class head: refused on the host, before the jitted loss
    cfg = load_config(
        "estienne2020",
        "quick",
        ["model.n_classes=2", "synthetic.shape=(16,16,16)", "synthetic.num_train=2"],
    )
    it = spec.build(cfg).train_iterator()
    try:
        with pytest.raises(ValueError, match=r"tumour_(moving|fixed): expected labels in \[0, 2\)"):
            next(it)
    finally:
        it.close()


def test_compare_baselines_table(tmp_path, capsys):
    """medjax compare on the baselines: VoxelMorph (d), segmentation only (e), the identity (f) and
    the per-pair optimisation reference (g); a rerun reuses the finished rows."""
    tiny = [a for a in TINY if not a.startswith("--config.model.")]
    tiny += ["--config.model.vxm_enc=(4,4,4,4)", "--config.model.vxm_dec=(4,4,4,4,4,4,4)"]
    tiny += ["--config.optimise.steps=40"]
    args = [
        "compare",
        "estienne2020",
        "--variant",
        "quick",
        "--workdir",
        str(tmp_path),
        "--only",
        "d,e,f,g",
        *tiny,
    ]
    assert main(args) == 0
    by_key = json.loads((tmp_path / "compare.json").read_text())
    assert list(by_key) == ["d_voxelmorph", "e_segonly", "f_identity", "g_optimise"]
    for key, res in by_key.items():  # compare.json holds each row's results.json
        assert res == json.loads((tmp_path / "quick" / key / "results.json").read_text())
    # the per-pair optimisation reference really registers (at 16^3 the labels are too coarse
    # for every pair's Dice to move, but the mean does and the image error falls by half)
    opt = by_key["g_optimise"]
    assert opt["anatomical_dice_after"] > opt["anatomical_dice_before"] + 0.02
    assert opt["image_mse_after"] < 0.5 * opt["image_mse_before"]
    ident = by_key["f_identity"]
    # no registration: the identity and the segmentation-only model leave the labels where they are
    for key in ("e_segonly", "f_identity"):
        r = by_key[key]
        assert r["anatomical_dice_after"] == pytest.approx(ident["anatomical_dice_before"])
        assert r["folding_percent"] == 0.0 and r["jacobian_std"] == 0.0
    assert "tumour_dice_whole" in by_key["e_segonly"] and "tumour_dice_whole" not in ident
    assert math.isfinite(by_key["d_voxelmorph"]["anatomical_dice_after"])
    md = (tmp_path / "compare.md").read_text()
    assert "| (d) VoxelMorph |" in md and "| (f) identity |" in md
    assert (tmp_path / "figures" / "compare_dice.png").is_file()
    # rerun: nothing is retrained or re-evaluated
    capsys.readouterr()
    assert main(args + ["--only", "f,g"]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") == 2 and "evaluating" not in out


def _brats_folder(root, n, shape=(16, 16, 16)):
    """A BraTS 2021-style folder of ``n`` synthetic cases (4 modalities + tumour labels)."""
    for i in range(n):
        case = f"BraTS2021_{i:05d}"
        d = root / case
        d.mkdir(parents=True)
        s = synthetic.brain_phantom(900 + i, shape)
        for c, mod in enumerate(("t1", "t1ce", "t2", "flair")):
            _write_nifti(d / f"{case}_{mod}.nii.gz", s["image"][..., c], np.eye(4))
        seg = np.asarray([0, 1, 2, 4])[s["tumour"]].astype(np.int16)
        _write_nifti(d / f"{case}_seg.nii.gz", seg, np.eye(4))
    return root


def _config(*overrides):
    from medjax.train import load_config

    tiny = [a[len("--config.") :] for a in TINY]
    return load_config("estienne2020", "quick", tiny + list(overrides))


def test_small_brats_folder_keeps_two_validation_subjects(tmp_path):
    """8 cases with validation on: two validation subjects (one pair), not one and a NaN loss."""
    from medjax.train import load_experiment

    task = load_experiment("estienne2020").task_module
    root = _brats_folder(tmp_path / "brats", 8)
    data = task.FolderData(
        _config("data=brats", f"data_dir={root}", "eval_every=100"), log=lambda s: None
    )
    assert len(data.val) == 2 and len(list(data.val_pairs())) == 1
    assert len(data.train) >= 2 and data.num_test_pairs >= 1
    with pytest.raises(ValueError, match="expected at least 6 brats subjects"):
        task.FolderData(
            _config("data=brats", f"data_dir={_brats_folder(tmp_path / 'b5', 5)}", "eval_every=100")
        )


def test_crop_follows_the_data_and_a_bad_crop_names_the_nearest_valid_one(tmp_path, capsys):
    from medjax.train import load_experiment

    task = load_experiment("estienne2020").task_module
    root = _oasis_folder(tmp_path / "oasis", n=5, shape=(15, 16, 14))
    lines = []
    data = task.FolderData(_config("data=oasis", f"data_dir={root}"), log=lines.append)
    assert data.shape == (16, 16, 16)  # the data's size rounded up to a multiple of 4
    assert any("aligned_seg35" in s for s in lines) and any("(15, 16, 14)" in s for s in lines)
    args = [
        "train",
        "estienne2020",
        "--workdir",
        str(tmp_path / "run"),
        *TINY,
        "--config.data=oasis",
        f"--config.data_dir={root}",
        "--config.oasis_crop=(18,16,16)",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nearest valid crop is (20, 16, 16)" in err and err.count("\n") == 1


def test_oasis_folder_with_only_seg4_labels(tmp_path):
    from medjax.train import load_experiment

    task = load_experiment("estienne2020").task_module
    root = _oasis_folder(tmp_path / "oasis", n=5)
    for p in root.glob("*/aligned_seg35.nii.gz"):
        p.unlink()
    lines = []
    data = task.FolderData(_config("data=oasis", f"data_dir={root}"), log=lines.append)
    assert data.n_anatomy == 5 and any("aligned_seg4" in s for s in lines)
    pair = next(data.test_pairs())
    assert pair["anatomy_fixed"].max() <= 4 and pair["anatomy_fixed"].max() > 0


def test_init_and_step_keys_differ_and_evaluation_passes_the_model_state():
    import jax

    from medjax.train import load_experiment

    ex = load_experiment("estienne2020").build(_config())
    rng = jax.random.PRNGKey(0)
    state = ex.init_state(rng)
    assert not np.array_equal(np.asarray(state.rng), np.asarray(rng))
    seen = {}

    def spy(variables, moving, fixed):
        seen.update(variables)
        return {"displacement": np.zeros(moving.shape[:-1] + (3,), np.float32), "warped": moving}

    ex._forward_jit = spy
    stats = {"layer": {"mean": np.zeros(3)}}
    ex.forward(
        state.replace(model_state={"batch_stats": stats}),
        np.zeros((1, 16, 16, 16, 4)),
        np.zeros((1, 16, 16, 16, 4)),
    )
    assert set(seen) == {"params", "batch_stats"}
    cfg = _config()
    assert "eval_batch_size" not in cfg and "num_workers" not in cfg  # read nowhere: removed


def test_predict_on_scans_of_different_grids(tmp_path, shared_data):
    """moving 21x26x22 at 4 mm (RAS) onto fixed 33x41x25 at 2 mm (LAS): outputs on the fixed grid."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    work = tmp_path / "identity"
    work.mkdir()
    cfg = _config("model.kind=identity", "synthetic.num_modalities=1")
    from medjax.train.config import config_to_json

    (work / "config.json").write_text(config_to_json(cfg))
    mov = shared_data / "monai" / "reoriented_anat_moved.nii"
    fix = shared_data / "monai" / "anatomical.nii"
    out = tmp_path / "pred"
    assert main(["predict", "--workdir", str(work), str(mov), str(fix), "--out", str(out)]) == 0
    fimg = nib.load(str(fix))
    for name in ("displacement.nii.gz", "warped.nii.gz"):
        img = nib.load(str(out / name))
        assert img.shape[:3] == (33, 41, 25), name
        np.testing.assert_allclose(img.affine, fimg.affine, atol=1e-5)
    info = json.loads((out / "predict.json").read_text())
    assert info["moving_resampled_onto_fixed_grid"] and info["grid"] == [33, 41, 25]
    # the identity model leaves the moving scan where the world-space resampling put it
    ref = resample_from_to(nib.load(str(mov)), fimg, order=1, mode="constant", cval=0.0)
    got = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    np.testing.assert_allclose(got, np.asarray(ref.dataobj), rtol=1e-4, atol=1e-2)
    assert (
        main(
            [
                "predict",
                "--workdir",
                str(work),
                str(mov),
                str(fix),
                "--out",
                str(out),
                "--refine",
                "3",
            ]
        )
        == 0
    )
    info = json.loads((out / "predict.json").read_text())
    assert (
        info["refine_steps"] == 3
        and info["refine_objective_after"] <= info["refine_objective_before"]
    )


def test_memory_error_names_the_fields_that_drive_the_step():
    from medjax.train import load_experiment
    from medjax.train.loop import _memory_fields

    cfg = _config("data=oasis", "oasis_crop=(160,176,208)")
    text = _memory_fields(load_experiment("estienne2020").build(cfg), cfg)
    assert "batch_size=2" in text and "oasis_crop=(160, 176, 208)" in text and "model.f=4" in text


def _real_brains_module():
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[2] / "experiments/estienne2020/real_brains.py"
    spec = importlib.util.spec_from_file_location("real_brains", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_brains_tissues_and_block_averages():
    rb = _real_brains_module()
    # FreeSurfer: 4/43 lateral ventricles and 24 CSF -> CSF; 3 cortex, 17 hippocampus -> grey;
    # 2/41 white matter, 16 brainstem -> white matter and the rest; 0 background
    seg = np.array([0, 4, 43, 24, 3, 17, 2, 41, 16])
    assert rb.tissues(seg).tolist() == [0, 1, 1, 1, 2, 2, 3, 3, 3]
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(5, 4, 4)).astype(np.float32)  # 5 -> cropped to 4
    lab = np.zeros((5, 4, 4), np.int64)
    lab[:2, :2, :2] = 2
    lab[0, 0, 0] = 1  # a minority voxel: the block keeps its majority
    image, labels = rb.downsample(vol, lab, 2)
    assert image.shape == labels.shape == (2, 2, 2)
    for i, j, k in np.ndindex(2, 2, 2):
        block = vol[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2]
        assert np.isclose(image[i, j, k], block.mean())
    assert labels[0, 0, 0] == 2 and labels[1, 1, 1] == 0


def test_real_brains_folder_and_held_out_evaluation(tmp_path, shared_data):
    """The folder from VoxelMorph's scan (8 mm here), then the held-out evaluation through the
    experiment's predict with the identity model: Dice after equals before, and before is the hand-computed
    mean tissue Dice of each pair."""
    rb = _real_brains_module()
    scan = shared_data / "voxelmorph" / "test_scan.npz"
    folders = rb.make_folder(tmp_path / "brains", scan, n=4, spacing=8, seed=3)
    assert [f.name for f in folders] == [f"OASIS_OAS1_000{k}_MR1" for k in range(1, 5)]
    imgs = [nib.load(str(f / "aligned_norm.nii.gz")) for f in folders]
    labs = [np.asarray(nib.load(str(f / "aligned_seg4.nii.gz")).dataobj) for f in folders]
    assert all(i.shape == (20, 24, 28) for i in imgs) and np.allclose(
        imgs[0].affine[:3, :3], 8 * np.eye(3)
    )
    assert set(np.unique(labs[0])) == {0, 1, 2, 3} and not np.array_equal(labs[0], labs[1])
    work = tmp_path / "identity"
    work.mkdir()
    from medjax.train.config import config_to_json

    cfg = _config("model.kind=identity", "synthetic.num_modalities=1")
    (work / "config.json").write_text(config_to_json(cfg))
    res = rb.evaluate_held_out(work, tmp_path / "brains", log=lambda s: None)
    assert res["pairs"] == [
        "OASIS_OAS1_0001_MR1 -> OASIS_OAS1_0002_MR1",
        "OASIS_OAS1_0003_MR1 -> OASIS_OAS1_0004_MR1",
    ]
    assert res["dice_after"] == pytest.approx(res["dice_before"], abs=1e-9)
    for k, (m, f) in enumerate(((labs[0], labs[1]), (labs[2], labs[3]))):
        hand = np.mean([2 * np.sum((m == c) & (f == c)) / (np.sum(m == c) + np.sum(f == c))
                        for c in (1, 2, 3) if (f == c).any()])  # fmt: skip
        assert res["dice_before"][k] == pytest.approx(hand)
    assert res["gain"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert json.loads((work / "held_out.json").read_text())["pairs"] == res["pairs"]
