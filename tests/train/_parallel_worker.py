"""Run the tiny BN model on 1 device, on an 8-device mesh and under pmap; print JSON results.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported.
"""

import json
import sys

import jax
import numpy as np

from medjax.train.mesh import make_mesh, replicate, shard_batch
from medjax.train.steps import compile_step
from tests.train import _tiny_model as T


def run_mesh(devices):
    mesh = make_mesh(devices)
    state = replicate(T.init_state(), mesh)
    step = compile_step(T.make_step(), mesh)
    losses = []
    for i in range(T.NUM_STEPS):
        state, m = step(state, shard_batch(T.data(i), mesh))
        losses.append(float(m["loss"]))
    return losses, T.to_numpy({"params": state.params, "model_state": state.model_state})


def run_pmap(n):
    state = T.init_state(axis_name="batch")
    state = jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state
    )
    step = jax.pmap(T.make_step(axis_name="batch"), axis_name="batch")
    losses = []
    for i in range(T.NUM_STEPS):
        b = jax.tree_util.tree_map(lambda a: a.reshape(n, -1, *a.shape[1:]), T.data(i))
        state, m = step(state, b)
        losses.append(float(m["loss"][0]))
    out = jax.tree_util.tree_map(
        lambda a: np.asarray(a), {"params": state.params, "model_state": state.model_state}
    )
    # every device holds the same replica
    for leaf in jax.tree_util.tree_leaves(out):
        np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape), rtol=1e-6, atol=1e-7)
    return losses, jax.tree_util.tree_map(lambda a: a[0], out)


def main():
    n = jax.device_count()
    results = {
        "devices": n,
        "one": run_mesh(jax.devices()[:1]),
        "mesh": run_mesh(jax.devices()),
        "pmap": run_pmap(n),
    }
    enc = {
        k: (v if k == "devices" else [v[0], jax.tree_util.tree_map(lambda a: a.tolist(), v[1])])
        for k, v in results.items()
    }
    json.dump(enc, sys.stdout)


if __name__ == "__main__":
    main()
