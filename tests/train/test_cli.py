"""The ``medjax`` command (medjax/cli.py) on the toy experiment."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from medjax.cli import main
from medjax.train import load_config, load_experiment, make_mesh, replicated
from medjax.train.checkpoint import abstract_state, restore_state

REPO = pathlib.Path(__file__).resolve().parents[2]
TOY = pathlib.Path(__file__).parent / "toy_experiments"


def _cli(*args):
    env = {**os.environ, "MEDJAX_EXPERIMENTS_DIR": str(TOY)}
    return subprocess.run(
        [sys.executable, "-m", "medjax.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _error_cases(tmp):
    other = tmp / "other_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"experiment": "unet"}))
    return [
        (["train", "nope", "--workdir", tmp / "w"], "unknown experiment 'nope'", "available: toy"),
        (
            ["train", "toy", "--workdir", tmp / "w", "--config.num_step=3"],
            "unknown config key 'num_step'",
            "did you mean: num_steps",
        ),
        (
            ["train", "toy", "--workdir", tmp / "w", "--config.num_steps", "abc"],
            "expected an int",
            "",
        ),
        (
            ["train", "toy", "--workdir", tmp / "w", "--variant", "huge"],
            "variant: expected one of",
            "",
        ),
        (["eval", "toy", "--workdir", tmp / "missing"], "expected an existing work directory", ""),
        (
            ["predict", "--workdir", tmp / "missing", tmp / "x.nii.gz", "--out", tmp / "o"],
            "expected an existing work directory",
            "",
        ),
        (["train", "toy", "--workdir", other], "holds experiment 'unet', not 'toy'", ""),
    ]


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    for args, needle, needle2 in _error_cases(tmp_path):
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, (args, res.stderr)
        assert lines[0].startswith("medjax: error: ") and needle in lines[0] and needle2 in lines[0]
        assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "w").exists()  # nothing is created for a rejected command


def test_list_shows_variants_and_descriptions():
    res = _cli("list")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "toy  [quick, long]  Toy linear regression used by the engine tests "
        "(tiny, deterministic, seconds on a CPU)."
    ]


def _restored(workdir):
    cfg = load_config("toy", None, directory=TOY)
    exp = load_experiment("toy", directory=TOY).build(cfg)
    ab = abstract_state(exp.init_state, replicated(make_mesh()), jax.random.PRNGKey(cfg.seed))
    return restore_state(workdir, ab)


def test_train_resume_eval_predict(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDJAX_EXPERIMENTS_DIR", str(TOY))
    wd = tmp_path / "run"
    rc = main(
        [
            "train",
            "toy",
            "--workdir",
            str(wd),
            "--config.num_steps",
            "4",
            "--config.optimizer.learning_rate=0.1",
            "--config.val_values=(1.0, 2.0)",
            "--config.log_every=2",
        ]
    )
    assert rc == 0
    saved = json.loads((wd / "config.json").read_text())
    assert saved["num_steps"] == 4 and isinstance(saved["num_steps"], int)
    assert saved["optimizer"]["learning_rate"] == 0.1
    assert saved["val_values"] == [1.0, 2.0]
    assert (saved["experiment"], saved["variant"]) == ("toy", None)

    # rerunning the same command resumes (here with more steps)
    rc = main(
        ["train", "toy", "--workdir", str(wd), "--config.num_steps=6", "--config.log_every=2"]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert f"resuming {wd.resolve()} from step 4" in err
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]

    # eval: latest checkpoint -> experiment.evaluate -> results.json
    capsys.readouterr()
    assert main(["eval", "toy", "--workdir", str(wd)]) == 0
    results = json.loads((wd / "results.json").read_text())
    state, step = _restored(wd)
    assert results["checkpoint_step"] == step == 6 and results["step"] == 6
    params = jax.device_get(state.params)
    rng = np.random.default_rng([7, 0])  # the toy's validation batch, regenerated
    w_true = np.random.default_rng(1007).normal(size=(4, 1))
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x @ w_true).astype(np.float32)
    ref = np.mean((x @ np.asarray(params["kernel"]) + np.asarray(params["bias"]) - y) ** 2)
    np.testing.assert_allclose(results["val_loss"], ref, rtol=1e-5)
    # the default report: a markdown table of the scalar results, printed and saved as results.md
    out = capsys.readouterr().out
    row = f"| val_loss | {results['val_loss']:.4g} |"
    assert row in out and row in (wd / "results.md").read_text()
    assert f"checkpoint:  {wd / 'checkpoints'} (step 6)" in out

    # predict: the experiment comes from the workdir's config.json; outputs keep the affine
    affine = np.array([[2.0, 0, 0, -10], [0, 3.0, 0, 5], [0, 0, 4.0, 1], [0, 0, 0, 1]])
    vol = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    src = tmp_path / "case1.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(src))
    capsys.readouterr()
    assert main(["predict", "--workdir", str(wd), str(src), "--out", str(tmp_path / "out")]) == 0
    out = pathlib.Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == tmp_path / "out" / "case1_pred.nii.gz"
    img = nib.load(str(out))
    np.testing.assert_array_equal(img.affine, affine)
    w = float(np.asarray(params["kernel"]).sum())
    b = float(np.asarray(params["bias"])[0])
    np.testing.assert_allclose(np.asarray(img.dataobj), vol * w + b, rtol=1e-5, atol=1e-5)


def test_eval_without_checkpoints_and_predict_missing_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDJAX_EXPERIMENTS_DIR", str(TOY))
    (tmp_path / "empty").mkdir()
    assert main(["eval", "toy", "--workdir", str(tmp_path / "empty")]) == 2
    assert "expected a work directory with checkpoints" in capsys.readouterr().err
    assert main(["list", "--config.seed=1"]) == 2
    assert "list: --config overrides are not accepted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "toy", "--workdir", str(tmp_path / "w"), "--bogus"])
    assert e.value.code == 2


def test_two_process_training_then_resume_on_one(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MEDJAX_EXPERIMENTS_DIR": str(TOY)}
    wd = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "medjax.cli", "train", "toy", "--workdir", str(wd)]
            + ["--coordinator_address", f"localhost:{port}", "--num_processes", "2"]
            + ["--process_id", str(i), "--config.num_steps=4", "--config.log_every=2"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900)[0])
        finally:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "step 4/4" in outs[0] and "step 4/4" not in outs[1]  # only process 0 reports
    logged = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]  # written once, by process 0

    # each process fed half of every batch: the losses match a single-process run
    monkeypatch.setenv("MEDJAX_EXPERIMENTS_DIR", str(TOY))
    single = tmp_path / "single"
    assert (
        main(
            [
                "train",
                "toy",
                "--workdir",
                str(single),
                "--config.num_steps=4",
                "--config.log_every=2",
            ]
        )
        == 0
    )
    ref = {r["step"]: r["loss"] for r in map(json.loads, (single / "metrics.jsonl").open())}
    for r in logged:
        np.testing.assert_allclose(r["loss"], ref[r["step"]], rtol=1e-5)

    # the 2-process checkpoint resumes in one process
    assert (
        main(["train", "toy", "--workdir", str(wd), "--config.num_steps=6", "--config.log_every=2"])
        == 0
    )
    assert [json.loads(line)["step"] for line in (wd / "metrics.jsonl").open()] == [2, 4, 6]
