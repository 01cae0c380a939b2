"""experiments/focusnet2021: a tiny end-to-end run through the ``medjax`` command (three stages,
eval, predict to NIfTI and NRRD), resume inside the adversarial stage, every stage's step on 8
devices / 1 device / pmap, the bad inputs of the issue as one-line errors, and the PDDCA path on
tiny fake NRRD folders."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import medjax.nn.conv
from medjax.cli import main
from medjax.data.datasets import PDDCA_STRUCTURES
from medjax.data.io import load_image, save_image
from medjax.data.synthetic_headneck import headneck_phantom
from tests.conftest import fake_devices_env

# 16 x 32 x 32 phantoms at 8 x 5 x 5 mm, 8 x 16 x 16 training crops, 8^3 SOS crops, widths 4 (2 for
# the autoencoder), 2 steps per stage, batches of 8 (the 8-device check runs this config too), a
# checkpoint after every step (the resume test cuts the run at any of them).
SHAPE, SPACING = (16, 32, 32), (8.0, 5.0, 5.0)
TINY = [
    f"--config.synthetic.shape={SHAPE}",
    f"--config.synthetic.spacing={SPACING}",
    "--config.batch_size=8",
    "--config.synthetic.num_train=8",
    "--config.synthetic.num_test=2",
    "--config.train_crop=(8,16,16)",
    "--config.crop_size=(8,8,8)",
    "--config.eval.window=8",
    "--config.eval.stride=4",
    "--config.model.features=(4,4,4)",
    "--config.model.aspp_features=(4,4)",
    "--config.model.sos_features=(4,4,4,4)",
    "--config.model.sos_aspp_features=(4,4)",
    "--config.ae.latent=4",
    "--config.ae.features=(2,2,2,2)",
    "--config.ae.decoder_features=(2,2,2)",
    "--config.heatmap.sigma=(1.0,1.0,1.0)",
    "--config.optim.snet_warmup_steps=1",
    "--config.stages.snet.num_steps=2",
    "--config.stages.ae.num_steps=2",
    "--config.stages.sos_warmup.num_steps=2",
    "--config.stages.sos.num_steps=2",
    "--config.num_steps=8",
    "--config.log_every=1",
    "--config.checkpoint_every=1",
]
PDDCA = [
    "--config.data=pddca",
    f"--config.pddca.spacing={SPACING}",
    "--config.pddca.inplane=(32,32)",
]
WORKER = pathlib.Path(__file__).with_name("_focusnet2021_worker.py")


@pytest.fixture(scope="module", autouse=True)
def fast_compile(tmp_path_factory):
    """XLA's cheap pipeline, XLA's convolution and a compilation cache shared by this module's runs
    (the same networks are compiled once); the previous settings are restored afterwards."""
    from jax._src import compilation_cache

    names = (
        "jax_disable_most_optimizations",
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n, None) for n in names}
    old["jax_disable_most_optimizations"] = False
    conv = medjax.nn.conv.enabled
    cache = tmp_path_factory.mktemp("xla_cache")
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    medjax.nn.conv.enabled = False
    yield cache
    medjax.nn.conv.enabled = conv
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The 8-device check runs in a subprocess from the start, beside the other tests."""
    env = fake_devices_env(8)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    out = tmp_path_factory.mktemp("worker") / "out.json"
    overrides = [a[len("--config.") :] for a in TINY]
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), *overrides],
            stdout=f,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module", autouse=True)
def _start_worker(worker):
    """Start the worker before the first test of this module."""
    return worker


def _ct_file(path, image, spacing, origin=(10.0, -20.0, 5.0)):
    """A phantom ``(D, H, W)`` as a CT file in HU, stored (x, y, z) = (W, H, D) with the patient's
    left, posterior and superior directions (PDDCA's LPS layout); returns the RAS affine."""
    sd, sh, sw = spacing
    affine = np.diag([-sw, -sh, sd, 1.0])
    affine[:3, 3] = origin
    hu = np.asarray(image)[..., 0] * 1000.0 - 100.0 if image.ndim == 4 else image * 1000.0 - 100.0
    save_image(path, np.transpose(hu, (2, 1, 0)).astype(np.float32), affine=affine)
    return affine


def _pddca_folder(root, seeds, *, empty=None, slices=None):
    """A PDDCA folder of phantoms: ``CASE/img.nrrd`` + ``CASE/structures/<Organ>.nrrd``."""
    for case, seed in seeds.items():
        s = headneck_phantom(seed, SHAPE, spacing=SPACING)
        image, label = s["image"], s["label"]
        if slices and case in slices:
            image, label = image[: slices[case]], label[: slices[case]]
        d = root / case / "structures"
        d.mkdir(parents=True)
        affine = _ct_file(root / case / "img.nrrd", image, SPACING)
        for k, name in enumerate(PDDCA_STRUCTURES):
            mask = label == k + 1
            if empty == (case, name):
                mask = np.zeros_like(mask)
            elif not mask.any():
                continue
            save_image(
                d / f"{name}.nrrd", np.transpose(mask, (2, 1, 0)).astype(np.uint8), affine=affine
            )
    return root


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny three-stage run; its evaluation and prediction use a heatmap threshold of 1.0, above
    every sigmoid peak (so no organ is refined, the case the output must state)."""
    work = tmp_path_factory.mktemp("run") / "w"
    args = ["train", "focusnet2021", "--variant", "quick", "--workdir", str(work), *TINY]
    assert main(args + ["--config.eval.heatmap_threshold=1.0"]) == 0
    return work


def _load(work):
    from medjax.train import load_experiment
    from medjax.train.config import config_from_json
    from medjax.train.workdir import restore_for_eval

    config = config_from_json(json.loads((work / "config.json").read_text()))
    return restore_for_eval(load_experiment("focusnet2021"), config, work)


def test_train_eval_predict_through_the_cli(trained, tmp_path, capsys):
    work = trained
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    stages = ["snet_sol"] * 2 + ["shape_ae"] * 2 + ["sos_warmup"] * 2 + ["sos_adversarial"] * 2
    assert [r["stage"] for r in records] == stages
    assert {"focal", "tversky", "heatmap_mse"} <= set(records[0])
    assert {"recon_mse", "recon_dice", "recon_soft_dice_loss"} <= set(records[2])
    assert {"focal", "tversky", "crop_hit"} <= set(records[4]) and "gen/shape" not in records[4]
    assert {"gen/seg", "gen/shape", "critic/recon_mse", "critic/code_mse"} <= set(records[6])
    assert all(np.isfinite(r["loss"]) for r in records)

    # eval: no heatmap peak above 1.0, so FocusNetV2 is S-Net, and the report says so
    code, out, _ = _run(["eval", "focusnet2021", "--workdir", str(work)], capsys)
    assert code == 0
    res = json.loads((work / "results.json").read_text())
    for m in ("snet", "focusnet"):
        for name in PDDCA_STRUCTURES:
            assert f"{m}_dice_{name}" in res and f"{m}_hd95_{name}" in res
    for key in (
        "small_organ_dice_snet",
        "small_organ_dice_focusnet",
        "large_organ_dice_snet",
        "large_organ_dice_focusnet",
    ):
        assert key in res and 0.0 <= res[key] <= 1.0, key
    assert res["small_organ_dice_focusnet"] == res["small_organ_dice_snet"]
    assert len(res["not_refined"]) == 2 * 3 and all(res[f"refined_{n}"] == 0.0 for n in ("Chiasm",))
    assert "refinement skipped (no heatmap peak above the threshold): 6 organ(s)" in out
    assert "| OpticNerve_L (small) |" in out and (work / "results.md").is_file()
    # the means are those of the per-case values
    per = res["per_case"]
    assert res["large_organ_dice_snet"] == pytest.approx(np.nanmean(per["large_snet"]))
    assert {
        "contours_case0.png",
        "heatmaps_case0.png",
        "crops_case0.png",
        "dice_per_organ.png",
    } <= set(res["figures"])

    # with a threshold of 0 every organ is refined: the crops override S-Net there
    code, out, _ = _run(
        ["eval", "focusnet2021", "--workdir", str(work), "--config.eval.heatmap_threshold=0.0"],
        capsys,
    )
    res0 = json.loads((work / "results.json").read_text())
    assert code == 0 and res0["not_refined"] == [] and res0["refined_Chiasm"] == 1.0
    assert "refinement skipped (no heatmap peak above the threshold): 0 organ(s)" in out

    # predict a NIfTI and an NRRD CT (HU): the label maps have the input's grid and affine, and
    # equal what the experiment computes on the same phantom (one preprocessing both ways)
    s = headneck_phantom(7, SHAPE, spacing=SPACING)
    nii, nrrd = tmp_path / "ct.nii.gz", tmp_path / "ct.nrrd"
    affine = _ct_file(nii, s["image"], SPACING)
    _ct_file(nrrd, s["image"], SPACING)
    code, out, _ = _run(
        ["predict", "--workdir", str(work), str(nii), str(nrrd), "--out", str(tmp_path / "p")],
        capsys,
    )
    assert code == 0
    printed = [line for line in out.splitlines() if line.endswith((".nii.gz", ".nrrd"))]
    assert [pathlib.Path(p).name for p in printed] == ["ct_seg.nii.gz", "ct_seg.nrrd"]
    assert out.count("no refinement (S-Net's label kept)") == 2 * 3
    info = json.loads((tmp_path / "p" / "predict.json").read_text())
    assert info["small_organs"][str(nii)]["Chiasm"]["refined"] is False
    assert [pathlib.Path(p).name for p in info["outputs"][str(nrrd)]] == ["ct_seg.nrrd"]
    ex, state, _ = _load(work)
    task = type(ex)
    prepared, _ = sys.modules[task.__module__].prepare_volume(load_image(nii), SPACING, SHAPE[1:])
    np.testing.assert_allclose(prepared.image[..., 0], s["image"], atol=1e-5)  # the same volume
    labels = ex.infer(state, prepared.image)["focusnet"].argmax(-1)
    expected = np.transpose(labels, (2, 1, 0))  # back to the file's (x, y, z) = (W, H, D)
    for name in ("ct_seg.nii.gz", "ct_seg.nrrd"):
        seg = load_image(tmp_path / "p" / name, is_label=True)
        assert seg.array.shape == SHAPE[::-1]
        np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(seg.array, expected)


def test_resume_inside_the_adversarial_stage(trained, tmp_path, capsys):
    """A run killed after step 7 (inside the adversarial stage, steps 7-8) and resumed with the same
    command: the same state and metrics as the run that went through. The killed run is a copy of
    the full run without its last checkpoint. (Resuming at a stage boundary is the engine's own
    test, tests/train/test_stages.py.)"""
    import shutil

    from medjax.train.transfer import load_workdir_state

    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["6", "7", "8"]
    cut = tmp_path / "cut"
    shutil.copytree(trained, cut)
    shutil.rmtree(cut / "checkpoints" / "8")
    code, _, err = _run(["train", "focusnet2021", "--workdir", str(cut)], capsys)
    # the engine's progress lines (``resuming ... from step 7``) go to stderr
    assert code == 0 and f"resuming {cut.resolve()} from step 7" in err, err[-2000:]
    full, resumed = load_workdir_state(trained), load_workdir_state(cut)
    assert jax.tree.structure(full) == jax.tree.structure(resumed)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (cut / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()


def test_every_stage_agrees_on_8_devices_1_device_and_pmap(worker, trained):
    """The four stages chained on an 8-device mesh and under pmap (8 devices, one sample each, the
    BatchNorms synchronised) give the 1-device run's losses (metrics.jsonl) and parameters."""
    from medjax.train.transfer import load_workdir_state

    proc, path = worker
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    out = json.loads(path.read_text())
    assert out["devices"] == 8 and out["batch"] == 8
    one = [
        json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()
    ]
    final = load_workdir_state(trained)
    assert len(one) == 8 and len(set(one)) == 8  # every step trains
    c = json.loads((trained / "config.json").read_text())
    st, opt = c["stages"], c["optim"]
    sos_steps = st["sos_warmup"]["num_steps"] + st["sos"]["num_steps"]
    drift = {  # the most Adam can move a parameter in this run: sum of its rates over its steps
        "sos": opt["sos_lr"] * sos_steps,
        "ae": opt["ae_pretrain_lr"] * st["ae"]["num_steps"] + opt["ae_lr"] * st["sos"]["num_steps"],
    }
    for mode in ("mesh", "pmap"):
        losses, params = out[mode]
        np.testing.assert_allclose(losses, one, rtol=1e-4, atol=1e-5, err_msg=mode)
        assert set(params) == {"snet", "sos", "ae"}
        for name, got in params.items():
            ref = {
                jax.tree_util.keystr(path): np.asarray(a)
                for path, a in jax.tree_util.tree_leaves_with_path(final[name]["params"])
            }
            assert sorted(got) == sorted(ref), (mode, name)
            for key, b in ref.items():
                a = np.asarray(got[key])
                assert a.shape == b.shape, (mode, name, key)
                # A convolution's bias feeding a BatchNorm has no gradient but rounding noise,
                # which Adam (sos, ae) turns into steps of up to its learning rate either way:
                # two runs may differ by twice the sum of those rates over the network's steps.
                noise = name != "snet" and key.endswith("['bias']") and "bn" not in key
                atol = 2 * drift[name] if noise else 1e-4
                np.testing.assert_allclose(
                    a, b, rtol=1e-3, atol=atol, err_msg=f"{mode} {name} {key}"
                )


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from medjax.train import load_experiment

    task = load_experiment("focusnet2021").task_module
    s = headneck_phantom(3, SHAPE, spacing=SPACING)
    image, label = s["image"], s["label"]
    presence = np.ones(9, np.int32)
    counts = np.bincount(label.ravel(), minlength=10)[1:]
    presence[counts == 0] = 0
    assert presence[2] == 1  # the mandible is drawn
    wrong = presence.copy()
    wrong[2] = 0
    with pytest.raises(ValueError, match="marks Mandible .* as not annotated, but its label map"):
        task.make_case("c1", image, label, wrong, SPACING, min_shape=(8, 16, 16))
    with pytest.raises(ValueError, match=r"its volume \(16, 32, 32\) .* smaller than the crop"):
        task.make_case("c1", image, label, presence, SPACING, min_shape=(8, 64, 64))

    # through the command: a PDDCA case with an empty structure file (annotated, no voxel) ...
    base = ["train", "focusnet2021", "--variant", "quick", *TINY, *PDDCA]
    root = _pddca_folder(
        tmp_path / "a", {"0522c0001": 1, "0522c0555": 2}, empty=("0522c0001", "Mandible")
    )
    code, _, err = _run(
        base + ["--workdir", str(tmp_path / "wa"), f"--config.data_dir={root}"], capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert (
        "case 0522c0001: its presence mask marks Mandible as annotated, but its label map has no voxel"
        in err
    )
    # ... and a volume smaller than the crop (4 slices, the crop needs 8)
    root = _pddca_folder(tmp_path / "b", {"0522c0001": 1, "0522c0555": 2}, slices={"0522c0001": 4})
    code, _, err = _run(
        base + ["--workdir", str(tmp_path / "wb"), f"--config.data_dir={root}"], capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert (
        "case 0522c0001: its volume (4, 32, 32) (D, H, W) is smaller than the crop (8, 16, 16)"
        in err
    )
    # a stage that this configuration cannot train
    code, _, err = _run(
        ["train", "focusnet2021", "--workdir", str(tmp_path / "wc"), "--config.model.kind=snet"],
        capsys,
    )
    assert code == 2 and "config.stages.ae.num_steps: expected 0" in err and err.count("\n") == 1


def test_pddca_folder_train_eval_predict(tmp_path, capsys):
    """Fake PDDCA NRRD folders: the original's test id goes to the test split, the rest trains;
    predict writes NRRD for an NRRD input. S-Net alone (the reading of the folder is the same for
    every stage; the three stages are tested on phantoms above)."""
    root = _pddca_folder(tmp_path / "pddca", {"0522c0001": 11, "0522c0002": 12, "0522c0555": 13})
    work = tmp_path / "w"
    args = ["train", "focusnet2021", "--variant", "quick", "--workdir", str(work), *TINY, *PDDCA]
    args += [
        f"--config.data_dir={root}",
        "--config.eval.surface=False",
        "--config.eval.figures=False",
        "--config.model.kind=snet",
        "--config.stages.ae.num_steps=0",
        "--config.stages.sos_warmup.num_steps=0",
        "--config.stages.sos.num_steps=0",
        "--config.num_steps=2",
    ]
    assert _run(args, capsys)[0] == 0
    code, _, _ = _run(["eval", "focusnet2021", "--workdir", str(work)], capsys)
    res = json.loads((work / "results.json").read_text())
    assert code == 0 and res["data"] == "pddca" and res["num_test_cases"] == 1
    assert res["per_case"]["snet"][0]["id"] == "0522c0555"
    ct = root / "0522c0555" / "img.nrrd"
    code, out, _ = _run(
        ["predict", "--workdir", str(work), str(ct), "--out", str(tmp_path / "p")], capsys
    )
    assert code == 0
    seg = load_image(tmp_path / "p" / "img_seg.nrrd", is_label=True)
    ref = load_image(ct)
    assert seg.array.shape == ref.spatial_shape
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)


def test_configs():
    from medjax.train import load_experiment

    spec = load_experiment("focusnet2021")
    assert set(spec.variants) == {"quick", "paper"}
    paper = spec.get_config("paper")
    assert tuple(paper.train_crop) == (40, 192, 192) and tuple(paper.crop_size) == (8, 64, 64)
    assert tuple(paper.model.features) == (32, 48, 64) and paper.ae.latent == 512
    assert (paper.eval.window, paper.eval.stride, paper.eval.heatmap_threshold) == (40, 20, 0.6)
    assert paper.optim.snet_lr == 0.1 and paper.optim.sol_lr == 4e-4 and paper.optim.sos_lr == 2e-4
    rows = spec.config_module.compare_rows("quick")
    assert list(rows) == ["snet", "focusnet", "no_shape", "truth_centre"]
    for variant in ("quick", "paper"):
        c = spec.get_config(variant)
        stages = ("snet", "ae", "sos_warmup", "sos")
        assert c.num_steps == sum(c.stages[s].num_steps for s in stages)
    with pytest.raises(ValueError, match="variant"):
        spec.get_config("huge")
