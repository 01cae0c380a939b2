"""Checkpoints (medjax/train/checkpoint.py): exact round trip, retention, crash safety, device counts."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.train.checkpoint import CheckpointManager, abstract_state, restore_state
from medjax.train.state import TrainState
from tests.conftest import fake_devices_env

REPO = pathlib.Path(__file__).resolve().parents[2]
TOY = pathlib.Path(__file__).parent / "toy_experiments"
ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"dense": {"kernel": jax.random.normal(k1, (3, 2)), "bias": jnp.zeros(2)}}
    state = TrainState.create(
        apply_fn=None, params=params, tx=optax.adam(1e-2), rng=jax.random.PRNGKey(seed + 1)
    )
    grads = jax.tree.map(lambda p: jax.random.normal(k2, p.shape), params)
    return state.apply_gradients(grads)  # non-trivial opt_state and step


def _assert_trees_equal(a, b):
    # same leaf paths and bit-identical leaves (static fields such as tx may be other objects)
    pa, la = zip(*jax.tree_util.tree_flatten_with_path(a)[0], strict=True)
    pb, lb = zip(*jax.tree_util.tree_flatten_with_path(b)[0], strict=True)
    assert [jax.tree_util.keystr(k) for k in pa] == [jax.tree_util.keystr(k) for k in pb]
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_round_trip_is_exact(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path / "ckpt") as m:
        assert m.save(5, state, data={"index": 5}, config={"lr": 0.1}, loop={"best": "inf"})
        assert not m.save(5, state)  # an existing step is never overwritten
        m.wait_until_finished()
        r = m.restore(abstract_state(state, ONE))
    assert (r.step, r.data, r.config, r.loop) == (5, {"index": 5}, {"lr": 0.1}, {"best": "inf"})
    assert isinstance(r.state, TrainState) and r.state.tx is state.tx
    _assert_trees_equal(r.state, state)
    assert r.state.rng.dtype == jnp.uint32


def test_restore_state_helper_reads_workdir(tmp_path):
    state = _state(3)
    with CheckpointManager(tmp_path / "checkpoints") as m:
        m.save(1, _state(1))
        m.save(2, state)
    ab = abstract_state(lambda: _state(0), ONE)  # built abstractly from an init function
    restored, step = restore_state(tmp_path, ab)
    assert step == 2
    _assert_trees_equal(restored, state)
    first, step = restore_state(tmp_path, ab, step=1)
    assert step == 1
    _assert_trees_equal(first, _state(1))
    with pytest.raises(FileNotFoundError):
        restore_state(tmp_path / "nowhere", ab)


def test_async_save_is_not_disturbed_by_donation(tmp_path):
    state = _state()
    expected = jax.device_get(state)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    m = CheckpointManager(tmp_path, async_save=True)
    m.save(1, state)
    state = bump(state)  # the saved buffers may be reused right after save() returns
    state = bump(state)
    m.close()
    m = CheckpointManager(tmp_path)
    _assert_trees_equal(m.restore(abstract_state(expected, ONE)).state, expected)
    m.close()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keeps_latest_n_plus_best(tmp_path, mode):
    values = {1: 5.0, 2: 1.0, 3: 4.0, 4: 9.0, 5: 7.0, 6: 3.0}
    best = min(values, key=values.get) if mode == "min" else max(values, key=values.get)
    state = {"w": jnp.ones(3)}
    m = CheckpointManager(tmp_path, max_to_keep=2, best_metric="val_loss", best_mode=mode)
    for step, v in values.items():
        m.save(step, state, metrics={"val_loss": v, "other": -v})
    m.save(7, state)  # a checkpoint without validation metrics is kept only while recent
    m.save(8, state, metrics={"val_loss": float("nan")})  # NaN ranks worst
    m.wait_until_finished()
    assert m.best_step() == best
    assert m.all_steps() == sorted({best, 7, 8})
    m.close()
    on_disk = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert on_disk == sorted({best, 7, 8})


def test_without_metric_keeps_latest_n(tmp_path):
    m = CheckpointManager(tmp_path, max_to_keep=3)
    for step in range(1, 7):
        m.save(step, {"w": jnp.full(2, step)})
    m.close()
    assert CheckpointManager(tmp_path).all_steps() == [4, 5, 6]


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="best_mode: expected 'min' or 'max', got 'up'"):
        CheckpointManager(tmp_path, best_mode="up")
    with pytest.raises(ValueError, match="max_to_keep: expected an int >= 1, got 0"):
        CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        CheckpointManager(tmp_path).restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


_HANG_IN_SAVE = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from medjax.train.checkpoint import CheckpointManager

    def hang(orig):
        async def finalize(self, *args, **kwargs):
            if getattr(self, "_final_path", None) is not None and self._final_path.name == "2":
                print("FINALIZING", flush=True)  # step 2 is written to its tmp dir, not renamed
                time.sleep(120)
            return await orig(self, *args, **kwargs)
        return finalize

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        cls.finalize = hang(cls.finalize)
    # max_to_keep=1: step 1 must not be deleted before step 2 is committed
    m = CheckpointManager(sys.argv[1], async_save=True, max_to_keep=1)
    m.save(1, {"w": jnp.arange(6.0)}, data={"index": 1})
    m.wait_until_finished()
    print("SAVED1", flush=True)
    m.save(2, {"w": 2 * jnp.arange(6.0)}, data={"index": 2})
    print("STARTED2", flush=True)
    m.wait_until_finished()
    print("FINISHED2", flush=True)
    """
)


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_IN_SAVE, str(ckpt)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == "FINALIZING":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=600)
    assert seen[-1] == "FINALIZING" and "FINISHED2" not in seen, seen
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith("2")]
    assert leftovers and all("tmp" in n for n in leftovers), leftovers  # killed mid-save

    m = CheckpointManager(ckpt)
    assert m.all_steps() == [1]
    r = m.restore({"w": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=ONE)})
    np.testing.assert_array_equal(np.asarray(r.state["w"]), np.arange(6.0))
    assert r.data == {"index": 1}
    # the run can go on: step 2 is saved again and the leftover tmp dir is gone
    m.save(2, {"w": 3 * jnp.arange(6.0)})
    m.close()
    assert sorted(p.name for p in ckpt.iterdir() if p.name[0].isdigit()) == ["1", "2"]


_OTHER_DEVICE_COUNT = textwrap.dedent(
    """
    import os, sys
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import jax, numpy as np
    from medjax.train import fit, load_config, load_experiment, make_mesh, replicated
    from medjax.train.checkpoint import abstract_state, restore_state

    toy, tmp = sys.argv[1:3]
    assert jax.device_count() == 8
    cfg = load_config("toy", None, ["num_steps=3", "checkpoint_every=3"], directory=toy)
    exp = load_experiment("toy", directory=toy).build(cfg)

    def dump(state, out):
        kernel = state.params["kernel"]
        assert len(kernel.sharding.device_set) == 8 and kernel.sharding.is_fully_replicated
        np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(state)])

    # a checkpoint written on 1 device, restored onto 8
    ab = abstract_state(exp.init_state, replicated(make_mesh()), jax.random.PRNGKey(cfg.seed))
    state, step = restore_state(tmp + "/one", ab)
    assert step == 3, step
    dump(state, tmp + "/restored_on_8.npz")
    # data-parallel training on 8 devices writes a checkpoint
    state, _ = fit(exp, cfg, tmp + "/eight", interactive=False)
    dump(state, tmp + "/trained_on_8.npz")
    """
)


def test_restore_onto_a_different_device_count(tmp_path):
    from medjax.train import fit, load_config, load_experiment, make_mesh, replicated

    cfg = load_config("toy", None, ["num_steps=3", "checkpoint_every=3"], directory=TOY)
    exp = load_experiment("toy", directory=TOY).build(cfg)
    one, _ = fit(exp, cfg, tmp_path / "one", interactive=False)

    env = fake_devices_env(8)
    res = subprocess.run(
        [sys.executable, "-c", _OTHER_DEVICE_COUNT, str(TOY), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]

    # written on 1 device -> restored onto 8: params, Adam moments, lr scale, rng, step all exact
    got = np.load(tmp_path / "restored_on_8.npz")
    leaves = jax.tree.leaves(one)
    assert len(got.files) == len(leaves) and int(one.step) == 3
    for i, x in enumerate(leaves):
        np.testing.assert_array_equal(got[f"arr_{i}"], np.asarray(x))

    # written on 8 devices -> restored onto 1
    eight = np.load(tmp_path / "trained_on_8.npz")
    ab = abstract_state(exp.init_state, replicated(make_mesh()), jax.random.PRNGKey(cfg.seed))
    back, step = restore_state(tmp_path / "eight", ab)
    assert step == 3
    for i, x in enumerate(jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), eight[f"arr_{i}"])
    # the 8-way sharded batch trains like one device, up to float summation order
    np.testing.assert_allclose(
        np.asarray(back.params["kernel"]), np.asarray(one.params["kernel"]), rtol=1e-5
    )
    # and training resumes from it on 1 device
    cfg6 = load_config("toy", None, ["num_steps=6", "checkpoint_every=3"], directory=TOY)
    exp6 = load_experiment("toy", directory=TOY).build(cfg6)
    _, summary = fit(exp6, cfg6, tmp_path / "eight", interactive=False)
    assert (summary["start_step"], summary["step"]) == (3, 6)
