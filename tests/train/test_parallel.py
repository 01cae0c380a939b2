"""8 fake CPU devices: jit over a mesh and pmap give the same BatchNorm training as 1 device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import REPO


def _assert_trees_close(a, b, rtol, atol, what):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, what
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


def test_mesh_and_pmap_match_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train._parallel_worker"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert res["devices"] == 8
    one_losses, one = res["one"]
    # training did something: the loss goes down and BN statistics moved
    assert one_losses[-1] < one_losses[0]
    for name in ("mesh", "pmap"):
        losses, tree = res[name]
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5, err_msg=name)
        _assert_trees_close(tree, one, rtol=1e-4, atol=1e-6, what=name)
