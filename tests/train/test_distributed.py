"""A 2-process jax.distributed run on localhost CPU (gloo) matches a single process."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np

from medjax.train.mesh import make_mesh, replicate, shard_batch
from medjax.train.steps import compile_step
from tests.conftest import REPO, fake_devices_env
from tests.train import _tiny_model as T


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _single_process():
    mesh = make_mesh(jax.devices()[:1])
    state = replicate(T.init_state(), mesh)
    step = compile_step(T.make_step(), mesh)
    losses = []
    for i in range(T.NUM_STEPS):
        state, m = step(state, shard_batch(T.data(i), mesh))
        losses.append(float(m["loss"]))
    return losses, T.to_numpy({"params": state.params, "model_state": state.model_state})


def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    env = fake_devices_env(2)
    for k in ("MEDJAX_COORDINATOR", "MEDJAX_NUM_PROCESSES", "MEDJAX_PROCESS_ID"):
        env.pop(k, None)
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.train._distributed_worker",
                str(i),
                "2",
                str(port),
                str(outs[i]),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=900)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-4000:]

    ref_losses, ref_tree = _single_process()
    assert ref_losses[-1] < ref_losses[0]
    for out in outs:
        res = json.loads(out.read_text())
        assert res["process_count"] == 2
        assert res["device_count"] == 4 and res["local_device_count"] == 2
        np.testing.assert_allclose(res["losses"], ref_losses, rtol=1e-5)
        la, ta = jax.tree_util.tree_flatten(res["tree"])
        lb, tb = jax.tree_util.tree_flatten(jax.tree_util.tree_map(lambda a: a.tolist(), ref_tree))
        assert ta == tb
        for a, b in zip(la, lb, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
