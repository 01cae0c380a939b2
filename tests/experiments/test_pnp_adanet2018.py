"""experiments/pnp_adanet2018: the four-stage pipeline end to end, the MM-WHS folder, bad inputs.

One tiny run through the ``medjax`` command (source, warm-up, adaptation and supervised stages;
eval; predict on a scan of another size); an MM-WHS folder written here, read in the real layout
(labels mapped to AA/LA/LV/Myo, the heart ROI cut from the label, target training volumes read
without their label); and the one-line errors a user can cause.
"""

import json
import os
import pathlib

import jax
import nibabel as nib
import numpy as np
import pytest

import medjax.nn.conv
from medjax.cli import main
from medjax.data import datasets
from medjax.train.config import load_config
from medjax.train.experiment import load_experiment

STAGES = {"source": 3, "warmup": 1, "adapt": 2, "supervised": 2}
TINY = [
    f"--config.num_steps={sum(STAGES.values())}",
    *(f"--config.stages.{k}.num_steps={v}" for k, v in STAGES.items()),
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.synthetic.shape=(6,32,32)",
    "--config.synthetic.num_source_train=2",
    "--config.synthetic.num_target_train=2",
    "--config.synthetic.num_test=2",
    "--config.model.features=2",
    "--config.critic.features=4",
    "--config.batch_size=2",
    "--config.adapt.batch_size=2",
    "--config.adapt.n_critic=2",
    "--config.adapt.warmup_n_critic=2",
]


@pytest.fixture(autouse=True)
def xla_conv(monkeypatch):
    """XLA's convolution (the CPU lowerings compile more slowly; same arithmetic)."""
    monkeypatch.setattr(medjax.nn.conv, "enabled", False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The four stages through the CLI, a checkpoint after every step and the last four kept
    (steps 5-8: inside the adaptation stage, steps 5-6, and the supervised stage, 7-8)."""
    medjax.nn.conv.enabled, conv = False, medjax.nn.conv.enabled
    work = tmp_path_factory.mktemp("pnp") / "run"
    args = [a for a in TINY if not a.startswith("--config.checkpoint_every")]
    args += ["--config.checkpoint_every=1", "--config.keep_checkpoints=4"]
    try:
        assert main(["train", "pnp_adanet2018", "--workdir", str(work), *args]) == 0
    finally:
        medjax.nn.conv.enabled = conv
    return work


def test_train_eval_predict(trained, tmp_path):
    work = trained
    stages = [json.loads(line).get("stage") for line in (work / "metrics.jsonl").open()]
    assert [s for s in dict.fromkeys(stages) if s] == list(STAGES)
    assert main(["eval", "pnp_adanet2018", "--workdir", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["settings"] == ["no_adaptation", "adapted", "supervised"]
    assert res["num_target_cases"] == 2 and res["num_source_cases"] == 2
    for setting in res["settings"]:
        per = [np.mean([res[f"target_dice_{setting}_{c}"] for c in ("AA", "LA", "LV", "Myo")])]
        assert np.isclose(res[f"target_dice_{setting}"], per[0])
        assert 0.0 <= res[f"target_dice_{setting}"] <= 1.0
    gain = res["target_dice_adapted"] - res["target_dice_no_adaptation"]
    assert np.isclose(res["target_gain_adapted"]["mean"], gain, atol=1e-6)
    assert "| target | PnP-AdaNet |" in (work / "results.md").read_text()
    assert {"target_dice.png", "wasserstein.png"} <= set(res["figures"])

    # predict: a CT scan of another size keeps its affine; labels in 0..4
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    scan = np.random.default_rng(0).normal(size=(40, 5, 36)).astype(np.float32)
    nib.save(nib.Nifti1Image(scan, affine), str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "pred"
    assert (
        main(["predict", "--workdir", str(work), str(tmp_path / "ct.nii.gz"), "--out", str(out)])
        == 0
    )
    seg = nib.load(str(out / "ct_seg.nii.gz"))
    assert seg.shape == scan.shape and np.allclose(seg.affine, affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= set(range(5))
    assert json.loads((out / "predict.json").read_text())["setting"] == "adapted"


def test_resume_inside_the_adaptation_stage(trained, tmp_path, capsys):
    """A run killed after step 5 (one step into the adaptation stage, steps 5-6: the DAM already
    warm-started from the source segmenter and trained one step, the critic's n_critic updates
    done) and resumed with the same command gives the uninterrupted run's state, bit for bit, and
    its metrics. The killed run is a copy of the full run without checkpoints 6-8."""
    import shutil

    from medjax.train.transfer import load_workdir_state

    assert sorted(int(p.name) for p in (trained / "checkpoints").iterdir()) == [5, 6, 7, 8]
    cut = tmp_path / "cut"
    shutil.copytree(trained, cut)
    for step in (6, 7, 8):
        shutil.rmtree(cut / "checkpoints" / str(step))
    assert main(["train", "pnp_adanet2018", "--workdir", str(cut)]) == 0
    err = capsys.readouterr().err
    assert f"resuming {cut.resolve()} from step 5" in err, err[-2000:]
    full, resumed = load_workdir_state(trained), load_workdir_state(cut)
    assert jax.tree.structure(full) == jax.tree.structure(resumed)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (cut / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()


def _write_case(root, name, shape, with_label=True, seed=0):
    """An MM-WHS-like case: an ellipsoid 'heart' of the raw label values 205/420/500/820."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(z**2 + y**2 + x**2)
    label = np.zeros(shape, np.int16)
    label[r < 0.6] = 205
    label[r < 0.45] = 500
    label[(r < 0.45) & (x > 0.2)] = 420
    label[(r < 0.3) & (y > 0.1)] = 820
    label[(r > 0.7) & (r < 0.75)] = 600  # RV: not a PnP-AdaNet structure (background)
    image = (label > 0) * 300.0 + rng.normal(0, 20, shape)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(root / f"{name}_image.nii.gz"))
    if with_label:
        nib.save(nib.Nifti1Image(label, affine), str(root / f"{name}_label.nii.gz"))
    return label


def _mmwhs_config(root, *extra):
    return load_config(
        "pnp_adanet2018",
        "quick",
        ["data=mmwhs", f"data_dir={root}", "mmwhs.roi=(16,16)", "mmwhs.test_fraction=0.5", *extra],
    )


def test_mmwhs_folder_in_its_layout(tmp_path):
    root = tmp_path / "mmwhs"
    (root / "mr").mkdir(parents=True)
    (root / "ct").mkdir()
    raw = {}
    for i in (1, 2):
        raw[f"mr_train_100{i}"] = _write_case(root / "mr", f"mr_train_100{i}", (24, 20, 22), seed=i)
        raw[f"ct_train_100{i}"] = _write_case(
            root / "ct", f"ct_train_100{i}", (26, 24, 20), seed=9 + i
        )
    task = load_experiment("pnp_adanet2018").task_module
    vols = task.make_volumes(_mmwhs_config(root))
    assert len(vols.source_train) == len(vols.source_test) == 1
    assert len(vols.target_train) == len(vols.target_test) == 1
    image, label = vols.volume(vols.source_test[0], True)
    # the ROI is cut around the label: every structure voxel of the raw label survives the crop
    raw_label = raw[vols.source_test[0]["id"]]
    mapped = np.vectorize(datasets.PNP_ADANET_LABEL_MAP.get)(raw_label)
    assert image.shape[1:] == (16, 16) and label.shape == image.shape
    for c in range(1, 5):
        assert (label == c).sum() == (mapped == c).sum()
    assert abs(float(image.mean())) < 1.0  # normalised
    # a target training volume is read without its label (the file may even be absent)
    (root / "ct" / f"{vols.target_train[0]['id']}_label.nii.gz").unlink()
    vols = task.make_volumes(_mmwhs_config(root))
    image, label = vols.volume(vols.target_train[0], False)
    assert label is None and image.shape[1:] == (16, 16)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(
            [
                "train",
                "pnp_adanet2018",
                "--workdir",
                str(tmp_path / "w"),
                *TINY,
                "--config.data=mmwhs",
                f"--config.data_dir={empty}",
            ]
        )
        == 2
    )
    assert "no MM-WHS images" in capsys.readouterr().err
    root = tmp_path / "mr_only"
    root.mkdir()
    for i in (1, 2):
        _write_case(root, f"mr_train_100{i}", (12, 20, 20), seed=i)
    with pytest.raises(ValueError, match="target .CT. folder is empty"):
        load_experiment("pnp_adanet2018").task_module.make_volumes(_mmwhs_config(root))
    with pytest.raises(ValueError, match="multiples of 8"):
        load_experiment("pnp_adanet2018").task_module.check_shape(
            (4, 30, 32), "config.synthetic.shape"
        )
    assert (
        main(
            [
                "train",
                "pnp_adanet2018",
                "--workdir",
                str(tmp_path / "w2"),
                *TINY,
                "--config.num_steps=3",
            ]
        )
        == 2
    )
    assert "num_steps" in capsys.readouterr().err


def _source_only(steps):
    """TINY with the source stage alone, ``steps`` long."""
    rest = [
        a
        for a in TINY
        if not a.startswith(("--config.num_steps", "--config.stages.", "--config.checkpoint_every"))
    ]
    stages = {"source": steps, "warmup": 0, "adapt": 0, "supervised": 0}
    return [
        *rest,
        f"--config.num_steps={steps}",
        *(f"--config.stages.{k}.num_steps={v}" for k, v in stages.items()),
        "--config.checkpoint_every=1",
    ]


def test_warm_start_from_another_experiment_is_refused_before_building(tmp_path, capsys):
    other = tmp_path / "zoo_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"experiment": "medicalzoo"}))
    args = [a for a in TINY if not a.startswith("--config.stages.source")]
    args = [a for a in args if not a.startswith("--config.num_steps")]
    work = tmp_path / "w"
    code = main(
        [
            "train",
            "pnp_adanet2018",
            "--workdir",
            str(work),
            *args,
            "--config.stages.source.num_steps=0",
            f"--config.num_steps={sum(STAGES.values()) - STAGES['source']}",
            f"--config.source_workdir={other}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{other} holds a run of experiment 'medicalzoo', expected 'pnp_adanet2018'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (work / "checkpoints").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """The learning rate turns infinite after two steps (x 1e39 every 2 steps): the engine's guard
    stops at step 3 with one line naming checkpoint 2, which is still there and finite."""
    from medjax.cli import EXIT_FAILED
    from medjax.train.transfer import load_workdir_state

    work = tmp_path / "w"
    args = [
        *_source_only(4),
        "--config.optimizer.schedule.every=2",
        "--config.optimizer.schedule.factor=1e39",
    ]
    assert main(["train", "pnp_adanet2018", "--workdir", str(work), *args]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "at step 3 (last good checkpoint: step 2 " in err, err
    tree = load_workdir_state(work, experiment="pnp_adanet2018")
    assert int(np.asarray(tree["seg"]["step"])) == 2
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree["seg"]["params"])]
    assert leaves and all(np.isfinite(x).all() for x in leaves)


# The source stage (the segmenter's step, which the supervised stage shares) and the adaptation
# stage (the WGAN step, which the warm-up shares with another critic count), batches of 8 (one slice
# per device), no dropout (under pmap a device draws its own masks, so only the deterministic network
# can agree with one device), no mask critic: each step compiles three times in the worker (1 device,
# the mesh, pmap), the suite's most expensive compilations.
MESH = [
    a
    for a in TINY
    if not a.startswith(("--config.num_steps", "--config.stages.", "--config.batch_size"))
    and not a.startswith("--config.adapt.batch_size")
] + [
    "--config.num_steps=4",
    "--config.stages.source.num_steps=2",
    "--config.stages.warmup.num_steps=0",
    "--config.stages.adapt.num_steps=2",
    "--config.stages.supervised.num_steps=0",
    "--config.critic.mask_weight=0.0",
    "--config.batch_size=8",
    "--config.adapt.batch_size=8",
    "--config.synthetic.shape=(8,32,32)",
    "--config.model.dropout=0.0",
    "--config.critic.dropout=0.0",
]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MEDJAX_SLOW_TESTS") != "1",
    reason="about 5 min on 2 cores (each PnP-AdaNet step compiles for 1 device, 8 and pmap), more "
    "than the suite's budget allows; run with MEDJAX_SLOW_TESTS=1",
)
def test_source_and_adaptation_steps_agree_on_8_devices_1_device_and_pmap(tmp_path):
    """The source and adaptation stages chained (the DAM's warm start between them) on an 8-device
    mesh and under pmap (BatchNorm statistics and the pooled losses synchronised over the devices)
    give the 1-device run's losses and parameters."""
    import subprocess
    import sys

    from tests.conftest import fake_devices_env

    env = fake_devices_env(8)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    worker = pathlib.Path(__file__).with_name("_pnp_adanet2018_worker.py")
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        proc = subprocess.run(
            [sys.executable, str(worker), *(a[len("--config.") :] for a in MESH)],
            stdout=f,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            timeout=1800,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 8
    assert res["stages"] == ["source", "adapt"]
    one_losses, one_params = res["one"]
    assert len(one_losses) == 4 and len(set(one_losses)) == 4  # every step trains
    assert set(one_params) == {"seg", "dam", "critic", "sup"}
    # The critics see the segmenter's argmax map, a step function of the logits (a voxel whose two
    # best classes tie to rounding may flip with the order of a sum), and a WGAN critic's score is
    # a small difference of large terms: with the four stages, the adversarial losses differed by
    # up to 4e-4 (mesh) and 5e-3 (pmap) on a loss of 0.09 (measured), and the critic's and DAM's
    # parameters by up to 3e-4, where the segmenters' steps agreed to 1e-7. A missing BatchNorm
    # synchronisation or a per-device loss changes them by far more (the source stage's pooled
    # Dice, unsynchronised, differed by 6e-3 at its first step).
    adversarial = [2, 3]
    smooth = [0, 1]
    for mode in ("mesh", "pmap"):
        losses, params = np.asarray(res[mode][0]), res[mode][1]
        ref = np.asarray(one_losses)
        np.testing.assert_allclose(losses[smooth], ref[smooth], rtol=1e-4, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(
            losses[adversarial], ref[adversarial], rtol=0.1, atol=1e-4, err_msg=mode
        )
        for name, ref_params in one_params.items():
            assert sorted(params[name]) == sorted(ref_params), (mode, name)
            atol = 1e-3 if name in ("dam", "critic") else 1e-4
            for key, b in ref_params.items():
                np.testing.assert_allclose(
                    np.asarray(params[name][key]),
                    np.asarray(b),
                    rtol=1e-2 if name in ("dam", "critic") else 1e-3,
                    atol=atol,
                    err_msg=f"{mode} {name} {key}",
                )
