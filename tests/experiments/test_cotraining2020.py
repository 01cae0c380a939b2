"""experiments/cotraining2020: tiny end-to-end runs through the ``medjax`` command (synthetic data and
fake Decathlon/KiTS folders), one co-training step against a hand-written reference, the 8-device
check of every stage's step, and the bad inputs of partially labelled folders."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
import pytest

from medjax.cli import main
from medjax.data import synthetic_abdomen as abdomen
from medjax.train import load_config, load_experiment
from medjax.train.ema import EmaParamsState, get_ema_params
from tests.conftest import REPO, fake_devices_env

NAME = "cotraining2020"
# 2 datasets (a two-organ one), 8 x 24 x 24 phantoms, a 1-level U-Net of width 2, 2 + 2 steps
TINY = {
    "synthetic.shape": "(8,24,24)",
    "synthetic.num_train": "2",
    "synthetic.num_val": "1",
    "synthetic.num_test": "2",
    "synthetic.datasets": "(liver+pancreas,kidney)",
    "model.features": "2",
    "model.levels": "1",
    "model.norm": "batch",  # the BatchNorm statistics and their teacher policy are exercised
    "stages.single_organ.num_steps": "2",
    "stages.main.num_steps": "2",
    "num_steps": "4",
    "batch_size": "4",
    "log_every": "1",
    "checkpoint_every": "4",
    "prefetch_threads": "0",
    "eval.slice_batch": "8",
}


def _args(**over):
    items = {**TINY, **over}
    return [f"--config.{k}={v}" for k, v in items.items()]


def _config(**over):
    return load_config(NAME, "quick", [f"{k}={v}" for k, v in {**TINY, **over}.items()])


def _affine(seed):
    """Anisotropic voxels, a flipped axis and a translation."""
    a = np.diag([1.5, -1.25, 4.0, 1.0])
    a[:3, 3] = [10.0 + seed, -20.0, 5.5]
    return a


def _nii(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def _phantom_nifti(seed, shape=(8, 24, 24)):
    """A phantom as NIfTI arrays: HU image and labels (x, y, z) = the phantom's (H, W, Z)."""
    s = abdomen.abdomen_phantom(seed, shape)
    hu = s["image"] * 1000.0 - 100.0
    return np.moveaxis(hu, 0, 2), np.moveaxis(s["label"], 0, 2)


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A tiny co-training run (single-organ stage + co-training stage) trained and evaluated."""
    work = tmp_path_factory.mktemp("cot") / "run"
    assert main(["train", NAME, "--variant", "quick", "--workdir", str(work), *_args()]) == 0
    assert main(["eval", NAME, "--workdir", str(work)]) == 0
    return work


def test_cli_train_eval_predict_synthetic(synthetic_run, tmp_path, capsys):
    work = synthetic_run
    res = json.loads((work / "results.json").read_text())
    assert res["method"] == "cotraining" and res["checkpoint_step"] == 4
    # the unified classes: the organs some dataset annotates (no spleen dataset: no spleen class)
    assert res["classes"] == ["background", "liver", "kidney", "pancreas"]
    assert res["datasets"] == ["liver+pancreas", "kidney"]
    assert res["num_test_cases"] == 2 and res["inference_model"] in ("ema_a", "ema_b")
    for key in ("mean_dice", "dice_liver", "dice_kidney", "dice_pancreas"):
        assert math.isfinite(res[key]) and 0.0 <= res[key] <= 1.0, key
        assert f"{key}_std" in res
    assert set(res["candidates"]) == {"ema_a", "ema_b", "student_a", "student_b"}
    chosen = res["candidates"][res["inference_model"]]
    assert chosen["val_mean_dice"] >= max(
        c["val_mean_dice"] for c in res["candidates"].values() if c["val_mean_dice"] is not None
    )
    assert {"prediction.png", "soft_weight.png", "disagreement.png"} <= set(res["figures"])
    # metrics.jsonl: both stages, the ramped soft weight and both networks' disagreement
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in logged] == ["single_organ"] * 2 + ["cotraining"] * 2
    co = logged[2:]
    expected = [0.1 * (2 / (1 + math.exp(-10 * p)) - 1) for p in (0.0, 0.5)]
    np.testing.assert_allclose([r["weight"] for r in co], expected, rtol=1e-5, atol=1e-7)
    assert all(0.0 <= r["a/disagreement"] <= 1.0 and "b/disagreement" in r for r in co)
    assert all(r["a/region_fraction"] > 0.5 for r in co)  # most of a partial label is uncertain

    # predict: a NIfTI CT in HU with an anisotropic, flipped affine -> the multi-organ label map
    hu, _ = _phantom_nifti((2020, 0, 0))  # = test subject 0 of the synthetic test set
    src = _nii(tmp_path / "ct.nii.gz", hu.astype(np.float32), _affine(3))
    out = tmp_path / "pred"
    capsys.readouterr()
    assert main(["predict", "--workdir", str(work), str(src), "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in written] == ["ct_seg.nii.gz"]
    img = nib.load(str(out / "ct_seg.nii.gz"))
    assert img.shape == hu.shape
    np.testing.assert_allclose(img.affine, _affine(3), atol=1e-5)
    seg = np.asarray(img.dataobj)
    labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == res["classes"] and labels["model"] == res["inference_model"]
    # the label map is what the evaluation predicted for that test subject (same preprocessing)
    from medjax.train.config import config_from_json
    from medjax.train.workdir import restore_for_eval

    spec = load_experiment(NAME)
    ex, state, _ = restore_for_eval(spec, config_from_json(work / "config.json"), work)
    name, model, _ = ex.select(state)
    probs = ex.predict_volume(model, ex.data.test[0]["image"])
    np.testing.assert_array_equal(seg, np.moveaxis(np.argmax(probs, -1), 0, 2))
    assert seg.max() < len(res["classes"])


def test_compare_table_and_figures(synthetic_run, tmp_path):
    """compare_table/compare_figures over rows shaped like medjax compare's (one run, relabelled)."""
    import shutil

    res = json.loads((synthetic_run / "results.json").read_text())
    ex = load_experiment(NAME).build(_config())
    rows = {}
    for key in ("separate", "cotraining"):
        row_dir = tmp_path / "quick" / key
        shutil.copytree(synthetic_run / "figures", row_dir / "figures")
        shutil.copy(synthetic_run / "metrics.jsonl", row_dir / "metrics.jsonl")
        rows[key] = {**res, "row": key, "label": key, "variant": "quick", "train_wall_s": 1.0}
    rows["separate"]["per_case"] = [
        {**c, "dice_liver": c["dice_liver"] - 0.1} for c in res["per_case"]
    ]
    table = ex.compare_table(rows)
    assert "| separate |" in table and "| cotraining |" in table
    assert "+0.100 [+0.100, +0.100] (2/2)" in table  # co-training minus separate, liver
    paths = ex.compare_figures(rows, tmp_path)
    assert {p.name for p in paths} == {
        "compare_dice.png",
        "compare_predictions.png",
        "compare_soft_weight.png",
        "compare_disagreement.png",
    }


# ---------------------------------------------------------------------- fake Decathlon / KiTS folders


def _msd(root, labels, cases, organ_values, *, seed, tumour=0):
    """A Decathlon folder of phantom CTs whose labels keep only ``organ_values`` {phantom id: value}."""
    training = []
    for k, case in enumerate(cases):
        hu, lab = _phantom_nifti((seed, k))
        raw = np.zeros(lab.shape, np.int16)
        for organ, value in organ_values.items():
            raw[lab == organ] = value
        if tumour:  # a "cancer" part of the organ, merged into it by name
            raw[(raw > 0) & (np.arange(raw.shape[0])[:, None, None] < 8)] = tumour
        _nii(root / "imagesTr" / f"{case}.nii.gz", hu.astype(np.float32), _affine(k))
        _nii(root / "labelsTr" / f"{case}.nii.gz", raw, _affine(k))
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    js = {"name": root.name, "modality": {"0": "CT"}, "labels": labels, "training": training}
    (root / "dataset.json").write_text(json.dumps(js) if isinstance(labels, dict) else labels)
    return root


def _kits(root, n, *, seed):
    for k in range(n):
        hu, lab = _phantom_nifti((seed, k))
        raw = np.where(lab == 2, 1, 0).astype(np.int16)
        raw[(lab == 2) & (np.arange(lab.shape[0])[:, None, None] < 10)] = 2  # a "tumor" part
        _nii(root / f"case_{k:05d}" / "imaging.nii.gz", hu.astype(np.float32), _affine(k))
        _nii(root / f"case_{k:05d}" / "segmentation.nii.gz", raw, _affine(k))
    return root


@pytest.fixture
def folders(tmp_path):
    liver = _msd(
        tmp_path / "Task03_Liver",
        {"0": "background", "1": "liver", "2": "cancer"},
        ["liver_0", "liver_1", "liver_2"],
        {1: 1},
        seed=31,
        tumour=2,
    )
    spleen = _msd(  # organ value 7: values differ across datasets, names unify them
        tmp_path / "Task09_Spleen",
        {"0": "background", "7": "Spleen "},
        ["spleen_0", "spleen_1", "spleen_2"],
        {3: 7},
        seed=32,
    )
    kits = _kits(tmp_path / "kits19", 3, seed=33)
    return [liver, spleen, kits]


def test_cli_on_decathlon_and_kits_folders(folders, tmp_path, capsys):
    """The single-organ models of three folders (the separate baseline; the co-training stage runs
    on the synthetic data above) trained, evaluated and predicting through the command."""
    work = tmp_path / "run"
    dirs = ",".join(str(d) for d in folders)
    args = _args(**{"msd.size": "16", "method": "separate", "num_steps": "2"})
    args += ["--config.data=msd", f"--config.data_dirs={dirs}"]
    assert main(["train", NAME, "--variant", "quick", "--workdir", str(work), *args]) == 0
    assert main(["eval", NAME, "--workdir", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["classes"] == ["background", "liver", "spleen", "kidney"]
    assert res["datasets"] == ["Task03_Liver", "Task09_Spleen", "kits19"]
    assert res["method"] == "separate" and res["inference_model"] == "separate"
    # held-out cases per dataset (1 each), scored on the organs their dataset annotates
    assert res["num_test_cases"] == 3
    by_case = {c["id"].split("/")[0]: c for c in res["per_case"]}
    assert set(by_case) == set(res["datasets"])
    assert "dice_spleen" not in by_case["Task03_Liver"]  # the liver dataset labels no spleen
    assert math.isfinite(by_case["Task03_Liver"]["dice_liver"])
    assert math.isfinite(res["mean_dice"])
    # predict on a case: the label map on the input's grid and affine (resampled 24 -> 16 -> 24)
    src = folders[1] / "imagesTr" / "spleen_0.nii.gz"
    capsys.readouterr()
    assert main(["predict", "--workdir", str(work), str(src), "--out", str(tmp_path / "p")]) == 0
    img = nib.load(str(tmp_path / "p" / "spleen_0_seg.nii.gz"))
    assert img.shape == nib.load(str(src)).shape
    np.testing.assert_allclose(img.affine, _affine(0), atol=1e-5)
    assert np.asarray(img.dataobj).max() <= 3


def _cli_error(capsys, args):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("medjax: error: ") and err.count("\n") == 1, err
    return err


def test_bad_folders_give_one_line_errors_naming_dataset_file_and_problem(
    folders, tmp_path, capsys
):
    liver, spleen, kits = folders
    runs = iter(range(100))

    def base():  # a fresh work directory each time (a used one continues its saved config)
        work = tmp_path / f"w{next(runs)}"
        return ["train", NAME, "--workdir", str(work), *_args(), "--config.data=msd"]

    def run(dirs):
        return _cli_error(capsys, [*base(), f"--config.data_dirs={','.join(map(str, dirs))}"])

    js = liver / "dataset.json"
    good = js.read_text()
    # one name twice
    js.write_text(good.replace('"2": "cancer"', '"2": "liver"'))
    err = run([liver, spleen])
    assert str(js) in err and "Task03_Liver" in err and "'liver' is given twice" in err
    # a label value that is not an integer
    js.write_text(good.replace('"2": "cancer"', '"two": "cancer"'))
    err = run([liver, spleen])
    assert str(js) in err and "Task03_Liver" in err and "not a non-negative integer" in err
    js.write_text(good)
    # a dataset that annotates no organ
    sj = spleen / "dataset.json"
    sgood = sj.read_text()
    sj.write_text(sgood.replace('"7": "Spleen "', '"7": "background"').replace(
        '"0": "background", ', ""))  # fmt: skip
    err = run([liver, spleen])
    assert str(sj) in err and "Task09_Spleen" in err and "annotates no organ" in err
    sj.write_text(sgood)
    # a label volume with a value its dataset.json does not name
    lab = spleen / "labelsTr" / "spleen_1.nii.gz"
    arr = np.asarray(nib.load(str(lab)).dataobj).copy()
    arr[0, 0, 0] = 5
    _nii(lab, arr, _affine(1))
    err = run([liver, spleen, kits])
    assert str(lab) in err and "dataset Task09_Spleen" in err and "[5]" in err
    # no folder given
    err = _cli_error(capsys, base())
    assert "config.data_dirs" in err


def test_region_masks_and_their_errors():
    task = load_experiment(NAME).task_module
    label = jnp.asarray([[[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]])  # (1, 2, 6)
    class_mask = jnp.asarray([[False, True, False]])  # a liver-only dataset: background uncertain
    pseudo = jnp.asarray([[[0, 1, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0]]])
    region = np.asarray(task.uncertain_region(label, class_mask, pseudo))
    np.testing.assert_array_equal(region, np.asarray(label) == 0)
    # dilated pseudo-label regions: uncertain voxels within 1 voxel of the pseudo organ at (0, 5)
    near = np.asarray(task.dilated_pseudo_region(label, class_mask, pseudo, dilation=1))
    expected = np.zeros((1, 2, 6), bool)
    expected[0, :, 4:6] = True
    np.testing.assert_array_equal(near, expected)
    # a fully labelled dataset has no uncertain voxel
    full = jnp.ones((1, 3), bool)
    assert not np.asarray(task.uncertain_region(label, full, pseudo)).any()
    # a region function of the wrong shape is refused when the step is traced, naming the problem
    ex = load_experiment(NAME).Experiment(_config(), region=lambda y, a, p: y[..., :-1] == 0)
    state = ex.init_state(jax.random.PRNGKey(0))
    it = ex.train_iterator()
    batch = next(it)
    it.close()
    with pytest.raises(
        ValueError, match=r"region mask region=<lambda>: expected .* shape \(4, 24, 24\)"
    ):
        jax.eval_shape(ex.steps["cotraining"], state, batch)


def test_merged_labels_ground_truth_wins_and_missing_organs_are_filled():
    task = load_experiment(NAME).task_module
    # organ scores of 3 organs on 4 voxels; the sample's dataset annotates organ 1
    scores = jnp.asarray([[[0.0, 0.9, 0.2, 0.1], [0.0, 0.2, 0.7, 0.8], [0.0, 0.1, 0.3, 0.2],
                           [0.0, 0.6, 0.1, 0.55]]])  # fmt: skip
    eligible = jnp.asarray([[False, False, True, True]])
    probs = np.asarray(task.merge_scores(scores, eligible))
    np.testing.assert_allclose(probs[0, :, 0], [0.8, 0.2, 0.7, 0.45])  # 1 - best eligible organ
    np.testing.assert_array_equal(np.argmax(probs, -1)[0], [0, 3, 0, 3])  # organ 1 never pseudo


def test_config_variants_rows_and_step_counts():
    spec = load_experiment(NAME)
    assert set(spec.variants) == {"quick", "paper"}
    rows = spec.config_module.compare_rows("quick")
    assert list(rows) == [
        "separate",
        "naive",
        "self_training",
        "cotraining_no_ema",
        "cotraining",
        "full_labels",
    ]
    quick = spec.get_config("quick")
    n1, n2 = quick.stages.single_organ.num_steps, quick.stages.main.num_steps
    steps = {
        k: int(next(o for o in v[1] if o.startswith("num_steps="))[10:]) for k, v in rows.items()
    }
    assert steps == {
        "separate": n1,
        "naive": n2,
        "self_training": n1 + n2,
        "cotraining_no_ema": n1 + n2,
        "cotraining": n1 + n2,
        "full_labels": n2,
    }
    assert "ema.decay=0.0" in rows["cotraining_no_ema"][1]
    paper = spec.get_config("paper")
    assert paper.ema.decay == 0.999 and paper.soft.weight == 0.1 and paper.batch_size == 24
    assert paper.context == 0 and paper.msd.size == 352
    with pytest.raises(ValueError, match=r"config.num_steps: method 'naive' runs 2 steps"):
        spec.build(_config(method="naive"))
    with pytest.raises(ValueError, match="config.soft.region"):
        spec.build(_config(**{"soft.region": "everywhere"}))


# ------------------------------------------------------------------------- one step, by hand


def _find(tree, cls):
    return [
        x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)
    ]


def test_one_cotraining_step_matches_a_hand_written_reference():
    """The second co-training step (non-zero soft weight, teachers != students, Adam moments
    non-zero) updates both networks, both EMA teachers, both optimiser states and both BatchNorm
    statistics as the method written out by hand: merged labels, each network taught by the
    other's EMA on the uncertain voxels, Adam and the Mean Teacher EMA."""
    from medjax.losses import focal_loss, soft_dice_loss
    from medjax.train.mesh import make_mesh
    from medjax.train.steps import compile_step

    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    ex = load_experiment(NAME).build(_config())  # TINY: the step the CLI run compiled
    it = ex.train_iterator()
    batches = [next(it), next(it)]
    it.close()
    step = compile_step(ex.steps["cotraining"], make_mesh())  # as the engine jits it
    state, _ = step(ex.init_state(jax.random.PRNGKey(0)), batches[0])
    state = jax.device_get(state)  # kept: the next call donates its input
    new, metrics = step(state, batches[1])

    net, batch = ex.net, batches[1]
    x, y, cm = (np.asarray(batch[k]) for k in ("image", "label", "class_mask"))
    organ = state["organ"]
    # 1. pseudo-labels: each single-organ model (eval mode) over background + its own organs
    annotated = ex.layout.annotated
    scores, counts = 0.0, np.zeros(ex.num_classes)
    for k in range(len(annotated)):
        v = {"params": organ.params[f"m{k}"],
             "batch_stats": organ.model_state["batch_stats"][f"m{k}"]}  # fmt: skip
        allowed, organs = annotated[k].copy(), annotated[k].copy()
        allowed[0], organs[0] = True, False
        logits = jnp.where(allowed, net.apply(v, x, train=False), -jnp.inf)
        scores = scores + np.asarray(jax.nn.softmax(logits, -1)) * organs
        counts += organs
    scores = scores / np.maximum(counts, 1)
    s = scores[..., 1:] * (~cm[:, None, None, 1:])  # only organs the sample's dataset misses
    pseudo = np.where(s.max(-1) > 0.5, 1 + s.argmax(-1), 0)
    target = np.where(y > 0, y, pseudo)  # the ground truth wins
    region = ~cm[np.arange(len(y))[:, None, None], y]  # background of a partial label
    ramp = 0.1 * (2 / (1 + np.exp(-10 * 0.5)) - 1)  # sigmoid ramp at co-training step 1 of 2

    @jax.jit
    def grads(params, stats, teacher):
        def loss(params):
            logits, upd = net.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    mutable=["batch_stats"])  # fmt: skip
            hard = focal_loss(logits, target) + soft_dice_loss(
                logits, target, reduction="batch", include_background=False
            )
            t = jax.nn.softmax(net.apply(teacher, x, train=False), -1)
            ce = -jnp.sum(t * jax.nn.log_softmax(logits, -1), -1)
            soft = jnp.sum(ce * region) / jnp.sum(region)  # over the batch's uncertain voxels
            return hard + ramp * soft, (upd["batch_stats"], soft)

        return jax.grad(loss, has_aux=True)(params)

    def close(a, b, rtol=1e-4, atol=2e-6):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)

    for me, other in (("a", "b"), ("b", "a")):
        st, ot = state[me], state[other]
        # the teacher: the OTHER network's EMA parameters, with its running statistics
        teacher = {"params": get_ema_params(ot.opt_state), **ot.model_state}
        g, (stats, soft) = grads(st.params, st.model_state["batch_stats"], teacher)
        np.testing.assert_allclose(float(metrics[f"{me}/soft"]), float(soft), rtol=1e-4)
        (adam,) = _find(st.opt_state, optax.ScaleByAdamState)
        mu = jax.tree.map(lambda m, gg: b1 * m + (1 - b1) * gg, adam.mu, g)
        nu = jax.tree.map(lambda v, gg: b2 * v + (1 - b2) * gg**2, adam.nu, g)
        want = jax.tree.map(
            lambda p, m, v: p - lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps),
            st.params, mu, nu,
        )  # fmt: skip
        got = new[me]
        close(got.params, want)
        (adam2,) = _find(got.opt_state, optax.ScaleByAdamState)
        close(adam2.mu, mu, atol=1e-9)
        close(adam2.nu, nu, rtol=1e-3, atol=1e-12)
        assert int(adam2.count) == 2 and int(got.step) == 2
        # the network's own EMA teacher: Mean Teacher decay min(0.99, 1 - 1/3) at the second update
        ema = jax.tree.map(lambda e, p: 2 / 3 * e + 1 / 3 * p, get_ema_params(st.opt_state), want)
        close(get_ema_params(got.opt_state), ema)
        assert int(_find(got.opt_state, EmaParamsState)[0].count) == 2
        close(got.model_state["batch_stats"], stats, rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, new["organ"].params, organ.params)  # frozen
    np.testing.assert_allclose(float(metrics["weight"]), ramp, rtol=1e-5)


# ------------------------------------------------------------------------------ data parallel


def _trees_close(a, b, what, rtol=2e-4, atol=2e-6):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, what
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


def test_every_stage_step_on_8_devices_1_device_and_pmap():
    env = fake_devices_env(8)  # keeps the suite's fast-compilation flags
    proc = subprocess.run(
        [sys.executable, "-m", "tests.experiments._cotraining2020_worker"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert res["devices"] == 8
    for stage in ("single_organ", "cotraining", "self_training", "naive"):
        one_logged, one = res[stage]["one"]
        for mode in ("mesh", "pmap"):
            logged, tree = res[stage][mode]
            for a, b in zip(logged, one_logged, strict=True):
                assert a.keys() == b.keys(), (stage, mode)
                for k in a:
                    np.testing.assert_allclose(
                        a[k], b[k], rtol=2e-4, atol=2e-6, err_msg=f"{stage}/{mode}/{k}"
                    )
            _trees_close(tree, one, f"{stage}/{mode}")
        # the step trained: parameters and BatchNorm statistics moved from the initial state
        init = res[stage]["init"]
        trained = [k for k in one if k in init and not np.allclose(
            np.asarray(jax.tree.leaves(one[k]["params"])[0]),
            np.asarray(jax.tree.leaves(init[k]["params"])[0]))]  # fmt: skip
        assert trained, stage
    cot = res["cotraining"]["one"][1]
    assert {"a", "b", "organ"} == set(cot)
    assert res["cotraining"]["one"][0][-1]["weight"] > 0.0
