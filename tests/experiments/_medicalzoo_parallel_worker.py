"""The medicalzoo training step on 1 device, on an 8-device mesh and under pmap; prints JSON.

A batch-normed SmallUNet (the zoo's networks compile for minutes; each of them takes
``axis_name`` the same way, tests/models/test_zoo_axis_name.py) on 4^3 crops, 3 steps of the experiment's own
``train_step`` on the same batches. Under pmap the network's BatchNorm and the step share
``config.model.axis_name``. Run with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json
import sys

import jax
import numpy as np

import medjax.nn.conv
from medjax.train.config import load_config
from medjax.train.experiment import load_experiment
from medjax.train.mesh import make_mesh, replicate, shard_batch
from medjax.train.steps import compile_step

BATCH, CROP, STEPS = 8, 4, 3
OVERRIDES = [
    "model.name=smallunet",
    f"crop=({CROP},{CROP},{CROP})",
    f"batch_size={BATCH}",
    "synthetic.shape=(8,8,8)",
    "model.kwargs={'features': 4, 'levels': 2, 'norm': 'batch'}",
    # SGD, the paper's optimiser: Adam's g / sqrt(v) would turn float-rounding differences of
    # near-zero gradients into whole learning-rate steps.
    "optimizer={'name': 'sgd', 'learning_rate': 0.1, 'momentum': 0.5}",
]


def experiment(axis_name=""):
    config = load_config("medicalzoo", "quick", OVERRIDES + [f"model.axis_name={axis_name}"])
    return load_experiment("medicalzoo").build(config)


def batches():
    """The same batch every step (so that the loss must go down)."""
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(BATCH, CROP, CROP, CROP, 2)).astype(np.float32),
        "label": rng.integers(0, 4, size=(BATCH, CROP, CROP, CROP)).astype(np.int32),
    }
    return [batch] * STEPS


def tree(state):
    return jax.tree.map(
        lambda a: np.asarray(a).tolist(), {"p": state.params, "s": state.model_state}
    )


def run_mesh(devices, init):
    ex = experiment()
    mesh = make_mesh(devices)
    state = replicate(init, mesh)
    step = compile_step(ex.train_step, mesh)
    losses = []
    for b in batches():
        state, m = step(state, shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    return losses, tree(state)


def run_pmap(n, init):
    ex = experiment("batch")
    state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), init)
    step = jax.pmap(ex.train_step, axis_name="batch")
    losses = []
    for b in batches():
        b = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), b)
        state, m = step(state, b)
        losses.append(float(m["loss"][0]))
    return losses, tree(jax.tree.map(lambda a: a[0], state))


def main():
    medjax.nn.conv.enabled = False  # XLA's convolution compiles faster; same arithmetic
    n = jax.device_count()
    # One initial state for all three (the axis name changes the network's calls, not its tree).
    init = jax.device_get(experiment().init_state(jax.random.PRNGKey(0)))
    out = {
        "devices": n,
        "one": run_mesh(jax.devices()[:1], init),
        "mesh": run_mesh(jax.devices(), init),
        "pmap": run_pmap(n, init),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
