"""experiments/medicalzoo: the zoo experiment end to end, every network's wiring, bad inputs, 8 devices.

One tiny run through the ``medjax`` command (train, eval, predict on a scan of another size); the
experiment's forward and loss traced (``jax.eval_shape``, nothing compiled) for one network of each
calling convention; the one-line errors a user can cause; and the training step on 8 fake devices,
on 1 and under pmap (a subprocess, ``_medicalzoo_parallel_worker``).
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import medjax.nn.conv
from medjax.cli import main
from medjax.train.config import load_config
from medjax.train.experiment import load_experiment
from tests.conftest import REPO, fake_devices_env, require_reference

TINY = [
    "--config.num_steps=2",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.synthetic.shape=(16,16,16)",
    "--config.synthetic.num_train=2",
    "--config.synthetic.num_test=2",
    "--config.crop=(8,8,8)",
    "--config.model.name=smallunet",
    "--config.model.kwargs={'features': 2, 'levels': 2}",
    "--config.augmentation=original",
]


@pytest.fixture(autouse=True)
def xla_conv(monkeypatch):
    """XLA's convolution (the CPU lowerings compile more slowly; same arithmetic)."""
    monkeypatch.setattr(medjax.nn.conv, "enabled", False)


def _experiment(*overrides):
    return load_experiment("medicalzoo").build(load_config("medicalzoo", "quick", list(overrides)))


def test_train_eval_predict_any_size(tmp_path, capsys):
    work = tmp_path / "run"
    assert main(["train", "medicalzoo", "--workdir", str(work), *TINY]) == 0
    assert main(["eval", "medicalzoo", "--workdir", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["num_cases"] == 2 and res["classes"] == ["background", "CSF", "GM", "WM"]
    per = res["per_case"]
    for name in ("CSF", "GM", "WM"):
        assert np.isclose(res[f"dice_{name}"], np.nanmean([c[f"dice_{name}"] for c in per]))
    dice = [np.nanmean([c[f"dice_{n}"] for n in ("CSF", "GM", "WM")]) for c in per]
    assert np.isclose(res["mean_dice"], np.mean(dice))
    assert res["step_s"] > 0 and res["step_memory_mib"] > 0 and res["parameters"] > 0
    assert res["figures"] == ["segmentation_axial.png", "segmentation_sagittal.png"]
    assert "| mean |" in (work / "results.md").read_text()

    # predict: a 2-channel scan of another size (smaller than a window on one axis) keeps its affine
    affine = np.diag([1.2, -0.9, 2.0, 1.0])
    affine[:3, 3] = [4.0, 30.0, -7.5]
    scan = np.random.default_rng(0).random((19, 7, 12, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(scan, affine), str(tmp_path / "scan.nii.gz"))
    out = tmp_path / "pred"
    assert (
        main(["predict", "--workdir", str(work), str(tmp_path / "scan.nii.gz"), "--out", str(out)])
        == 0
    )
    seg = nib.load(str(out / "scan_seg.nii.gz"))
    assert seg.shape == (19, 7, 12) and np.allclose(seg.affine, affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}

    # a scan with the wrong channel count: one line naming the file and the channels expected
    nib.save(nib.Nifti1Image(scan[..., 0], affine), str(tmp_path / "t1.nii.gz"))
    capsys.readouterr()
    assert (
        main(["predict", "--workdir", str(work), str(tmp_path / "t1.nii.gz"), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "t1.nii.gz: expected a 3D volume with 2 channel(s) (t1, t2" in err


@pytest.mark.parametrize(
    "name, crop, outputs",
    [
        ("hyperdensenet_2mod", 8, {"logits"}),  # unpadded convs: input reflect-padded by 9
        ("densevoxelnet", 8, {"logits", "aux"}),
        ("resnet3dvae", 16, {"logits", "recon", "mu", "logvar"}),
        ("unet", 16, {"logits"}),  # 2D, slice by slice
    ],
)
def test_every_calling_convention_traces(name, crop, outputs):
    ex = _experiment(
        f"model.name={name}", f"crop=({crop},{crop},{crop})", "synthetic.shape=(32,32,32)"
    )
    state = jax.eval_shape(ex.init_state, jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((2, crop, crop, crop, 2), jnp.float32)
    batch = {"image": x, "label": jax.ShapeDtypeStruct((2, crop, crop, crop), jnp.int32)}
    captured = {}

    def loss(params, model_state, batch):
        out, _ = ex.apply(
            {"params": params, **model_state},
            batch["image"],
            train=True,
            rngs={"dropout": jax.random.key(0), "vae": jax.random.key(1)},
        )
        captured.update(out)
        return ex._loss_fn(params, model_state, batch, jax.random.key(2), {})

    value, (metrics, new_state) = jax.eval_shape(loss, state.params, state.model_state, batch)
    assert set(captured) == outputs and captured["logits"].shape == (2, crop, crop, crop, 4)
    assert value.shape == () and "seg_loss" in metrics
    assert jax.tree.structure(new_state) == jax.tree.structure(state.model_state)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["model.name=hyperdensenet"],
            "hyperdensenet takes 3 input channels, but the data has 2; use hyperdensenet_2mod",
        ),
        (
            ["model.name=vnet", "crop=(24,24,24)"],
            r"vnet needs sizes that are multiples of 16 .* nearest valid crop is \(32, 32, 32\)",
        ),
        (["crop=(64,64,64)"], r"config.crop: \(64, 64, 64\) is larger than the synthetic volumes"),
        (["model.name=resnet3dvae", "eval.roi=(48,48,48)"], "built for its input size"),
        (["model.name=covidnet"], "config.model.name: expected a MedicalZoo network"),
        (["loss.name=focal"], "config.loss.name: expected one of"),
    ],
)
def test_bad_settings_are_one_line_value_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        ex = _experiment(*overrides)
        ex.model, ex.roi  # noqa: B018 (built on first use; init_state uses both)


def _decathlon(root, labels_in_file):
    """A 2-case Decathlon folder (2 modalities, labels 0-3 declared) with ``labels_in_file``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(2):
        img = rng.random((12, 12, 12, 2)).astype(np.float32)
        lab = rng.choice(labels_in_file, size=(12, 12, 12)).astype(np.int16)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "imagesTr" / f"c_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / f"c_{i}.nii.gz"))
        training.append({"image": f"./imagesTr/c_{i}.nii.gz", "label": f"./labelsTr/c_{i}.nii.gz"})
    js = {
        "labels": {"0": "background", "1": "a", "2": "b", "3": "c"},
        "modality": {"0": "T1", "1": "T2"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(js))
    return root


def test_folder_crop_larger_than_a_volume_and_labels_outside_the_classes(tmp_path):
    root = _decathlon(tmp_path / "ok", [0, 1, 2, 3])
    ex = _experiment(
        "data=decathlon", f"data_dir={root}", "crop=(16,16,16)", "model.name=highresnet"
    )
    with pytest.raises(
        ValueError,
        match=r"config.crop: \(16, 16, 16\) is larger than the volume c_\d of shape \(12, 12, 12\)",
    ):
        ex.sample(ex.data.train[0], np.random.default_rng(0))
    bad = _decathlon(tmp_path / "bad", [0, 1, 7])
    ex = _experiment("data=decathlon", f"data_dir={bad}", "crop=(8,8,8)", "model.name=highresnet")
    with pytest.raises(
        ValueError, match=r"c_\d.nii.gz: label value\(s\) \[7\] not in the label map"
    ):
        ex.sample(ex.data.train[0], np.random.default_rng(0))


def test_pretrained_checkpoint_imports_and_a_mismatch_names_the_key(tmp_path):
    torch = require_reference("torch")
    from tests.models.test_highresnet import _torch_highresnet

    tmod = _torch_highresnet(2, 4)
    torch.save(tmod.state_dict(), tmp_path / "ok.pt")
    ex = _experiment(
        "model.name=HIGHRESNET", "crop=(8,8,8)", f"model.pretrained={tmp_path / 'ok.pt'}"
    )
    state = ex.init_state(jax.random.PRNGKey(0))
    w = tmod.state_dict()["conv_init.conv1.weight"].numpy()
    kernel = state.params["conv_init_conv1"]["kernel"]  # torch OIDHW -> DHWIO
    np.testing.assert_array_equal(kernel, np.transpose(w, (2, 3, 4, 1, 0)))
    torch.save(_torch_highresnet(2, 3).state_dict(), tmp_path / "three.pt")
    ex = _experiment(
        "model.name=highresnet", "crop=(8,8,8)", f"model.pretrained={tmp_path / 'three.pt'}"
    )
    with pytest.raises(
        ValueError,
        match=r"config.model.pretrained .*three.pt.*conv_out.2.conv_dil.2.weight has shape \(3, 80, 1, 1, 1\).*expects \(1, 1, 1, 80, 4\)",
    ):
        ex.init_state(jax.random.PRNGKey(0))


def test_step_on_8_devices_equals_1_device_and_pmap():
    env = fake_devices_env(8)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.experiments._medicalzoo_parallel_worker"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert res["devices"] == 8
    one_losses, one = res["one"]
    assert one_losses[-1] < one_losses[0]
    for name in ("mesh", "pmap"):
        losses, tree = res[name]
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name
            )
