"""8 fake CPU devices: jit over a mesh and pmap give the same BatchNorm training as 1 device."""

import json
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import REPO, fake_devices_env


def _assert_trees_close(a, b, rtol, atol, what):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, what
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


def _run_on_8_devices(module):
    env = fake_devices_env(8)
    proc = subprocess.run(
        [sys.executable, "-m", module],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_mesh_and_pmap_match_single_device():
    res = _run_on_8_devices("tests.train._parallel_worker")
    assert res["devices"] == 8
    one_losses, one = res["one"]
    # training did something: the loss goes down and BN statistics moved
    assert one_losses[-1] < one_losses[0]
    for name in ("mesh", "pmap"):
        losses, tree = res[name]
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5, err_msg=name)
        _assert_trees_close(tree, one, rtol=1e-4, atol=1e-6, what=name)


def test_adversarial_and_cotraining_steps_match_single_device():
    """WGAN (growing n_critic, clipping, frozen non-DAM layer) and co-training (EMA teachers)."""
    res = _run_on_8_devices("tests.train._patterns_worker")
    assert res["devices"] == 8
    for pattern in ("adversarial", "cotraining"):
        one_losses, one = res[pattern]["one"]
        for name in ("mesh", "pmap"):
            losses, tree = res[pattern][name]
            for a, b in zip(losses, one_losses, strict=True):
                assert a.keys() == b.keys()
                for k in a:
                    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
            _assert_trees_close(tree, one, rtol=1e-5, atol=1e-6, what=f"{pattern}/{name}")
    adv_losses, adv = res["adversarial"]["one"]
    assert [m["n_critic"] for m in adv_losses] == [2, 3, 4]  # grows with the generator step
    init = res["adversarial_init_gen"]
    _assert_trees_close(adv["gen"]["head"], init["head"], rtol=0, atol=0, what="frozen head")
    assert not np.allclose(adv["gen"]["adapt"]["kernel"], init["adapt"]["kernel"])  # DAM trains
    for leaf in jax.tree_util.tree_leaves(adv["critic"]):
        assert np.max(np.abs(leaf)) <= 0.05 + 1e-7  # clipped after every critic step
    cot_losses, _ = res["cotraining"]["one"]
    assert cot_losses[0]["weight"] == 0.0 and cot_losses[-1]["weight"] > 0.0  # ramped up
