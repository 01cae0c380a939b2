"""The training loop (medjax/train/loop.py) with a tiny toy experiment."""

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from medjax.train import fit, load_config, load_experiment, make_mesh, replicated
from medjax.train.checkpoint import CheckpointManager, abstract_state, restore_state
from medjax.train.config import ConfigError
from medjax.train.logging import read_metrics
from medjax.train.loop import NonFiniteLossError
from medjax.train.optim import get_lr_scale

REPO = pathlib.Path(__file__).resolve().parents[2]
TOY = pathlib.Path(__file__).parent / "toy_experiments"


def _run(workdir, *overrides, stream=None, interactive=False):
    cfg = load_config("toy", None, list(overrides), directory=TOY)
    exp = load_experiment("toy", directory=TOY).build(cfg)
    out = io.StringIO() if stream is None else stream
    return fit(exp, cfg, workdir, interactive=interactive, stream=out)


def _restore(workdir, step=None, **overrides):
    cfg = load_config("toy", None, directory=TOY)
    exp = load_experiment("toy", directory=TOY).build(cfg)
    ab = abstract_state(exp.init_state, replicated(make_mesh()), jax.random.PRNGKey(cfg.seed))
    return restore_state(workdir, ab, step=step)[0]


def _toy_batch(index, seed=0, batch=8, features=4, noise=0.1):
    """Batch ``index`` of the toy iterator, regenerated independently with NumPy."""
    w_true = np.random.default_rng(seed + 1000).normal(size=(features, 1))
    rng = np.random.default_rng([seed, index])
    x = rng.normal(size=(batch, features)).astype(np.float32)
    y = (x @ w_true + noise * rng.normal(size=(batch, 1))).astype(np.float32)
    return x, y


def _mse(params, x, y):
    pred = x.astype(np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(
        params["bias"], np.float64
    )
    return float(np.mean((pred - y) ** 2))


def test_interrupted_run_ends_bit_identical(tmp_path):
    common = [
        "checkpoint_every=4",
        "eval_every=2",
        "val_values=(3.0, 2.0, 2.5, 2.6, 2.7, 1.0)",
        "reduce_on_plateau={'factor': 0.5, 'patience': 0}",
    ]
    full, s_full = _run(tmp_path / "full", "num_steps=12", *common)
    _, s_half = _run(tmp_path / "split", "num_steps=6", *common)
    assert (s_half["step"], s_half["checkpoint_step"]) == (6, 6)
    resumed, s_res = _run(tmp_path / "split", "num_steps=12", *common)
    assert (s_res["start_step"], s_res["step"]) == (6, 12)

    a, b = jax.tree.leaves(full), jax.tree.leaves(resumed)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the plateau counters survived the interruption: 2.5, 2.6 and 2.7 each halved the lr
    assert get_lr_scale(full.opt_state) == get_lr_scale(resumed.opt_state) == 0.125
    la = read_metrics(tmp_path / "full" / "metrics.jsonl")
    lb = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert la == lb
    assert [r["step"] for r in la] == list(range(1, 13))


def test_interrupted_run_with_grain_pipeline_ends_bit_identical(tmp_path):
    # 64 shuffled records, 8 per batch: 12 steps cross an epoch; the data state is grain's
    full, _ = _run(tmp_path / "full", "num_steps=12", "pipeline=grain")
    _run(tmp_path / "split", "num_steps=5", "pipeline=grain")
    resumed, _ = _run(tmp_path / "split", "num_steps=12", "pipeline=grain")
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    la = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert la == read_metrics(tmp_path / "split" / "metrics.jsonl") and len(la) == 12
    m = CheckpointManager(tmp_path / "split" / "checkpoints")
    data = m.restore(abstract_state(full, replicated(make_mesh()))).data
    assert data["source"] == "default" and data["state"]["next_batch"] == 12
    m.close()


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a, _ = _run(tmp_path / "a", "num_steps=3")
    b, _ = _run(tmp_path / "b", "num_steps=3")
    c, _ = _run(tmp_path / "c", "num_steps=3", "seed=1")
    np.testing.assert_array_equal(np.asarray(a.params["kernel"]), np.asarray(b.params["kernel"]))
    assert not np.array_equal(np.asarray(a.params["kernel"]), np.asarray(c.params["kernel"]))


def test_metrics_jsonl_format_and_values(tmp_path):
    _, summary = _run(
        tmp_path,
        "num_steps=5",
        "log_every=2",
        "eval_every=2",
        "checkpoint_every=1",
        "keep_checkpoints=10",
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [r["step"] for r in records] == [2, 4, 5]  # every log_every steps and the last one
    for r in records:  # every record has step and loss; validation steps also val_*
        assert isinstance(r["step"], int) and np.isfinite(r["loss"])
        norms = {"grad_norm", "param_norm", "update_norm"}
        val = {"val_loss"} if r["step"] in (2, 4) else set()
        assert set(r) == {"step", "loss", "mae"} | norms | val
    # the loss logged at step 5 is the MSE of the step-4 parameters on batch index 4 (a window of 1)
    params4 = jax.device_get(_restore(tmp_path, step=4).params)
    np.testing.assert_allclose(records[-1]["loss"], _mse(params4, *_toy_batch(4)), rtol=1e-5)
    # the loss logged at step 4 is the mean over its window: steps 3 and 4 (batches 2 and 3)
    p2 = jax.device_get(_restore(tmp_path, step=2).params)
    p3 = jax.device_get(_restore(tmp_path, step=3).params)
    window = [_mse(p2, *_toy_batch(2)), _mse(p3, *_toy_batch(3))]
    np.testing.assert_allclose(records[1]["loss"], np.mean(window), rtol=1e-5)
    assert summary["metrics"]["loss"] == records[-1]["loss"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["experiment"], cfg["num_steps"], cfg["log_every"]) == ("toy", 5, 2)


@pytest.mark.parametrize(
    ("nan_at", "log_every", "last_good"),
    [(5, 3, 4), (4, 100, 2)],  # detected at a log step / at a checkpoint step
)
def test_nan_loss_stops_naming_the_step_and_keeps_last_good(tmp_path, nan_at, log_every, last_good):
    with pytest.raises(NonFiniteLossError) as e:
        _run(tmp_path, f"nan_at_step={nan_at}", f"log_every={log_every}", "checkpoint_every=2")
    msg = str(e.value)
    assert f"non-finite loss at step {nan_at} " in msg
    assert f"last good checkpoint: step {last_good}" in msg
    m = CheckpointManager(tmp_path / "checkpoints")
    assert m.latest_step() == last_good
    m.close()
    state = _restore(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["step"] < nan_at for r in logged)


def test_best_checkpoint_retention(tmp_path):
    _, summary = _run(
        tmp_path,
        "num_steps=6",
        "eval_every=1",
        "checkpoint_every=1",
        "keep_checkpoints=2",
        "val_values=(5.0, 1.0, 4.0, 6.0, 7.0, 8.0)",
    )
    assert summary["best_step"] == 2
    m = CheckpointManager(tmp_path / "checkpoints")
    assert m.all_steps() == [2, 5, 6]  # the best plus the latest two
    m.close()


def test_early_stopping_and_rerun_after_it(tmp_path):
    common = [
        "num_steps=10",
        "eval_every=1",
        "checkpoint_every=5",
        "val_values=(1.0, 2.0, 3.0, 4.0)",
        "early_stopping={'patience': 2}",
    ]
    _, summary = _run(tmp_path, *common)
    assert summary["stopped_early"] and summary["step"] == 3
    assert summary["checkpoint_step"] == 3
    _, again = _run(tmp_path, *common)
    assert again["stopped_early"] and again["step"] == 3 and again["start_step"] == 3


def test_plain_progress_lines(tmp_path):
    out = io.StringIO()
    _run(tmp_path, "num_steps=4", "log_every=2", stream=out)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("step ")]
    pattern = r"step {s}/4 \({p}%\) loss \S+ mae \S+ \| \S+ steps/s \| ETA \d+:\d\d:\d\d"
    assert re.fullmatch(pattern.format(s=2, p=50), lines[0]), lines
    assert re.fullmatch(pattern.format(s=4, p=100), lines[1]), lines
    assert "\r" not in out.getvalue()
    out = io.StringIO()
    _run(tmp_path, "num_steps=6", "log_every=2", stream=out)
    assert out.getvalue().splitlines()[0] == f"resuming {tmp_path.resolve()} from step 4"


def test_interactive_progress_bar(tmp_path):
    out = io.StringIO()
    _run(tmp_path, "num_steps=3", stream=out, interactive=True)
    text = out.getvalue()
    assert "\r" in text and "3/3" in text and "loss" in text
    assert not re.search(r"^step \d+/3", text, flags=re.M)


def test_ctrl_c_saves_and_resumes(tmp_path):
    env = {**os.environ, "MEDJAX_EXPERIMENTS_DIR": str(TOY)}
    cmd = [sys.executable, "-m", "medjax.cli", "train", "toy", "--workdir", str(tmp_path)]
    # num_steps=1000: the run cannot finish before the signal arrives, however slow the machine;
    # the resumed run is then three steps longer than where Ctrl-C stopped it.
    args = [
        "--config.num_steps=1000",
        "--config.sleep_per_batch=0.2",
        "--config.checkpoint_every=100",
    ]
    proc = subprocess.Popen(
        cmd + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.rstrip())
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    seen += rest.splitlines()
    assert proc.returncode == 130, seen
    assert not any("Traceback" in s for s in seen), seen
    stopped = [s for s in seen if s.startswith("stopped at step")]
    assert stopped, seen
    n = int(stopped[0].split()[3].rstrip(";"))
    assert 2 <= n < 1000
    m = CheckpointManager(tmp_path / "checkpoints")
    assert m.all_steps() == [n]
    m.close()
    _, summary = _run(tmp_path, f"num_steps={n + 3}", "checkpoint_every=100", "sleep_per_batch=0.2")
    assert (summary["start_step"], summary["step"]) == (n, n + 3)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, n + 4))


def test_sigkilled_run_resumes_bit_identical(tmp_path):
    """A run killed with SIGKILL between checkpoints resumes to the uninterrupted result.

    The loss draws from the step's random key (``step_noise``), so the key must be restored too.
    """
    common = ["num_steps=12", "checkpoint_every=3", "step_noise=0.5"]
    full, _ = _run(tmp_path / "full", *common)
    env = {**os.environ, "MEDJAX_EXPERIMENTS_DIR": str(TOY)}
    cmd = [sys.executable, "-m", "medjax.cli", "train", "toy", "--workdir", str(tmp_path / "cut")]
    # num_steps=1000: the run cannot end on its own before the kill, however slow the machine
    # or late its output; the resumed run goes back to the 12 steps (a length change resumes).
    cmd += [f"--config.{c}" for c in common] + ["--config.sleep_per_batch=0.3"]
    cmd += ["--config.num_steps=1000"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.rstrip())
            if line.startswith("step 8/"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, seen
    m = CheckpointManager(tmp_path / "cut" / "checkpoints")
    assert m.latest_step() in (3, 6), m.all_steps()  # killed between checkpoints
    m.close()
    resumed, summary = _run(tmp_path / "cut", *common, "sleep_per_batch=0.3")
    assert summary["start_step"] in (3, 6) and summary["step"] == 12
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(full.rng)), np.asarray(jax.random.key_data(resumed.rng))
    )
    la = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert la == read_metrics(tmp_path / "cut" / "metrics.jsonl") and len(la) == 12


def test_tensorboard_scalars_when_a_writer_is_importable(tmp_path, monkeypatch):
    import types

    calls = []

    class FakeWriter:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("tensorboardX")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    _run(tmp_path, "num_steps=2", "tensorboard=True", "eval_every=2")
    logged = read_metrics(tmp_path / "metrics.jsonl")
    expected = [("init", str(tmp_path.resolve() / "tensorboard"))]
    for r in logged:
        for k, v in r.items():
            if k != "step":
                expected.append((f"{'val' if k.startswith('val_') else 'train'}/{k}", v, r["step"]))
    assert calls == expected + [("close",)]


def test_nan_validation_metric_stops_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite validation val_loss at step 2 ") as e:
        _run(tmp_path, "eval_every=1", "checkpoint_every=1", "val_values=(1.0, 'nan')")
    assert "last good checkpoint: step 1" in str(e.value)


def test_resume_refuses_other_settings_and_keeps_the_saved_config(tmp_path):
    _run(tmp_path, "num_steps=3")
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate: 0.05 -> 0.01") as e:
        _run(tmp_path, "num_steps=6", "optimizer.learning_rate=0.01")
    assert "--config.resume_check=False" in str(e.value)
    assert (tmp_path / "config.json").read_text() == saved  # nothing saved is overwritten
    # more steps and other logging are fine; so is an explicit override of the check
    _, summary = _run(tmp_path, "num_steps=4", "log_every=2")
    assert (summary["start_step"], summary["step"]) == (3, 4)
    _, summary = _run(tmp_path, "num_steps=5", "optimizer.learning_rate=0.01", "resume_check=False")
    assert (summary["start_step"], summary["step"]) == (4, 5)


def test_tensorboard_purges_events_after_the_resumed_step(tmp_path, monkeypatch):
    """A resumed run asks the writer to hide events at and after its first new step."""
    import types

    inits = []

    class FakeWriter:
        def __init__(self, logdir, purge_step=None):
            inits.append(purge_step)

        def add_scalar(self, tag, value, step):
            pass

        def close(self):
            pass

    fake = types.ModuleType("tensorboardX")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    _run(tmp_path, "num_steps=3", "checkpoint_every=3", "tensorboard=True")
    _run(tmp_path, "num_steps=5", "checkpoint_every=3", "tensorboard=True")
    assert inits == [None, 4]


def test_an_iterator_without_get_state_is_refused(tmp_path, monkeypatch):
    cfg = load_config("toy", None, [], directory=TOY)
    exp = load_experiment("toy", directory=TOY).build(cfg)
    monkeypatch.setattr(exp, "train_iterator", lambda: iter([{"x": np.zeros((8, 4))}]))
    with pytest.raises(
        ValueError, match=r"train_iterator\(\): expected an iterator with get_state"
    ):
        fit(exp, cfg, tmp_path, stream=io.StringIO())


def test_a_step_that_cannot_fit_stops_before_the_first_step(tmp_path, monkeypatch):
    """XLA's memory analysis of the compiled step against the devices' memory (here 16 bytes)."""
    monkeypatch.setenv("MEDJAX_DEVICE_MEMORY_BYTES", "16")
    with pytest.raises(MemoryError, match=r"one training step needs .* but 16.0 B is available"):
        _run(tmp_path, "num_steps=3")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # not one step ran
    monkeypatch.setenv("MEDJAX_DEVICE_MEMORY_BYTES", str(2**30))
    _, summary = _run(tmp_path, "num_steps=3")
    assert summary["step"] == 3


def test_prepare_runs_first_and_its_error_stops_before_anything(tmp_path):
    """Experiment.prepare() is called before the state is initialised and before any progress
    line; an error there leaves no work directory behind."""
    cfg = load_config("toy", None, ["num_steps=2"], directory=TOY)
    exp = load_experiment("toy", directory=TOY).build(cfg)
    calls = []
    init = exp.init_state

    def prepare():
        calls.append("prepare")

    def init_state(rng):
        calls.append("init_state")
        return init(rng)

    exp.prepare, exp.init_state = prepare, init_state
    stream = io.StringIO()
    fit(exp, cfg, tmp_path / "ok", stream=stream, interactive=False)
    assert calls[0] == "prepare" and "init_state" in calls[1:]

    def bad():
        raise ValueError("config.data_dir: no such folder")

    exp.prepare, stream = bad, io.StringIO()
    with pytest.raises(ValueError, match="no such folder"):
        fit(exp, cfg, tmp_path / "bad", stream=stream, interactive=False)
    assert stream.getvalue() == "" and not (tmp_path / "bad").exists()
