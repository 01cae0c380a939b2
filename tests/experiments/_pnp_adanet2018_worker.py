"""The four stages of experiments/pnp_adanet2018 chained as ``medjax train`` chains them (each
stage's ``enter`` hook included), on a 1-device mesh, an 8-device mesh and under ``pmap``; prints
JSON (every step's loss and every network's final parameters by path, per mode).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported.
"""

import json
import sys

import jax
import numpy as np
from _workers import params_by_path  # this folder is on sys.path when the worker runs

import medjax.nn.conv
from medjax.train import load_config, load_experiment
from medjax.train.mesh import make_mesh, replicate, shard_batch
from medjax.train.steps import compile_step


def _batches(ex):
    """Each stage's first ``num_steps`` batches from the iterator ``medjax train`` gives it."""
    out = {}
    for stage in ex.stages():
        it = (stage.iterator or ex.train_iterator)()
        out[stage.name] = [next(it) for _ in range(stage.num_steps)]
        it.close()
    return out


def run_mesh(ex, state, batches, devices):
    mesh = make_mesh(devices)
    state = replicate(state, mesh)
    losses = []
    for stage in ex.stages():
        if stage.enter is not None:
            state = replicate(stage.enter(jax.device_get(state)), mesh)
        fn = compile_step(stage.step, mesh, donate=False)
        for b in batches[stage.name]:
            state, m = fn(state, shard_batch(b, mesh))
            losses.append(float(m["loss"]))
    return losses, params_by_path(jax.device_get(state))


def run_pmap(ex, config, state, batches):
    n = jax.device_count()
    stack = lambda t: jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), t)  # noqa: E731
    state = stack(state)
    steps = type(ex)(config, axis_name="batch").steps_fns  # losses pooled over the pmap axis
    losses = []
    for stage in ex.stages():
        if stage.enter is not None:  # the hook sees one replica, as in a 1-device run
            state = stack(stage.enter(jax.tree.map(lambda a: np.asarray(a)[0], state)))
        fn = jax.pmap(steps[stage.name], axis_name="batch")
        for b in batches[stage.name]:
            b = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), b)
            state, m = fn(state, b)
            losses.append(float(m["loss"][0]))
    return losses, params_by_path(jax.tree.map(lambda a: np.asarray(a)[0], jax.device_get(state)))


def main(overrides):
    medjax.nn.conv.enabled = False  # XLA's convolution, as in the suite
    config = load_config("pnp_adanet2018", "quick", overrides)
    ex = load_experiment("pnp_adanet2018").build(config)
    batches = _batches(ex)
    state = jax.device_get(jax.jit(ex.init_state)(jax.random.PRNGKey(int(config.seed))))
    out = {
        "devices": jax.device_count(),
        "stages": [s.name for s in ex.stages()],
        "one": run_mesh(ex, state, batches, jax.devices()[:1]),
        "mesh": run_mesh(ex, state, batches, jax.devices()),
        "pmap": run_pmap(ex, config, state, batches),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
