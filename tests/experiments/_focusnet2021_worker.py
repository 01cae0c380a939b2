"""Every stage's step of experiments/focusnet2021 on an 8-device mesh and under pmap, the stages
chained as ``medjax train`` runs them; prints JSON (the loss of every step, the networks' final
parameters by path). The test compares them with the 1-device run of the same config through the CLI.

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

STAGES = ("snet", "ae", "sos_warmup", "sos")


def _batches(ex, steps):
    """The batches each stage's iterator gives (the iterators ``medjax train`` uses)."""
    out = {}
    for name, make in (
        ("snet", ex.train_iterator),
        ("ae", lambda: ex.sos_iterator(1)),
        ("sos_warmup", lambda: ex.sos_iterator(3)),
        ("sos", lambda: ex.sos_iterator(2)),
    ):
        it = make()
        out[name] = [next(it) for _ in range(steps[name])]
        it.close()
    return out


def run_mesh(ex, state, batches):
    mesh = make_mesh(jax.devices())
    state = replicate(state, mesh)
    losses = []
    for name, step in ex.stage_steps().items():
        fn = compile_step(step, mesh, donate=False)
        for b in batches[name]:
            state, m = fn(state, shard_batch(b, mesh))
            losses.append(float(m["loss"]))
    return losses, params_by_path(jax.device_get(state))


def run_pmap(ex, state, batches):
    n = jax.device_count()
    state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)
    losses = []
    for name, step in ex.stage_steps("batch").items():
        fn = jax.pmap(step, axis_name="batch")
        for b in batches[name]:
            b = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), b)
            state, m = fn(state, b)
            losses.append(float(m["loss"][0]))
    return losses, params_by_path(jax.tree.map(lambda a: a[0], jax.device_get(state)))


def main(overrides):
    medjax.nn.conv.enabled = False  # as in the test's CLI run (XLA's convolution)
    config = load_config("focusnet2021", "quick", overrides)
    ex = load_experiment("focusnet2021").build(config)
    steps = {name: int(config.stages[name].num_steps) for name in STAGES}
    batches = _batches(ex, steps)
    state = jax.device_get(jax.jit(ex.init_state)(jax.random.PRNGKey(int(config.seed))))
    out = {"devices": jax.device_count(), "batch": int(batches["snet"][0]["image"].shape[0])}
    out["mesh"] = run_mesh(ex, state, batches)
    out["pmap"] = run_pmap(ex, state, batches)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
