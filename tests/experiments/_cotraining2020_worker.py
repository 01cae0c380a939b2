"""Every stage's step of experiments/cotraining2020 on 1 device, on an 8-device mesh and under pmap.

Stages: ``single_organ`` (the single-organ models), ``cotraining`` (two networks, EMA teachers),
``self_training`` (one network, its own EMA teacher) and ``naive`` (the plain supervised step, also
``full_labels``'s), each for 2 steps from the same state and batches, BatchNorm included (synchronised
over the pmap axis; every loss on the whole batch). Prints JSON: per stage and mode, the logged metrics and the final states.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported.
"""

import json
import sys

import jax
import numpy as np

from medjax.train import load_config, load_experiment
from medjax.train.mesh import make_mesh, replicate, shard_batch
from medjax.train.state import TrainState
from medjax.train.steps import compile_step

STEPS = 2
TINY = [
    "synthetic.shape=(8,24,24)",
    "synthetic.num_train=2",
    "synthetic.num_val=1",
    "synthetic.num_test=1",
    "synthetic.datasets=(kidney,spleen)",
    "model.features=2",
    "model.levels=1",
    "model.norm=batch",
    "stages.single_organ.num_steps=2",
    "stages.main.num_steps=2",
    "batch_size=8",
    "prefetch_threads=0",
    "soft.ramp=none",  # a non-zero cross-supervision weight from the first step
]


def build(method, axis_name=None):
    spec = load_experiment("cotraining2020")
    config = load_config("cotraining2020", "quick", [*TINY, f"method={method}"])
    with config.unlocked():
        config.num_steps = spec.config_module.steps_for(config)
    return spec.Experiment(config, axis_name=axis_name)


def batches(ex, stage):
    it = stage.iterator() if stage.iterator is not None else ex.train_iterator()
    try:
        return [next(it) for _ in range(STEPS)]
    finally:
        it.close()


def _host(tree):
    def leaf(x):
        return np.asarray(x).astype(np.float64).tolist()

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, TrainState))


def _states(state):
    return {
        k: {"params": v.params, "model_state": v.model_state, "opt_state": v.opt_state}
        for k, v in state.items()
    }


def run_mesh(method, stage_index, devices, data):
    ex = build(method)
    mesh = make_mesh(devices)
    state = replicate(ex.init_state(jax.random.PRNGKey(0)), mesh)
    stage = ex.stages()[stage_index]
    step = compile_step(stage.step, mesh)
    logged = []
    for b in data:
        state, m = step(state, shard_batch(b, mesh))
        logged.append({k: float(v) for k, v in m.items()})
    return logged, _host(_states(state))


def run_pmap(method, stage_index, data):
    n = jax.device_count()
    ex = build(method, axis_name="batch")
    state = ex.init_state(jax.random.PRNGKey(0))
    state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)
    step = jax.pmap(ex.stages()[stage_index].step, axis_name="batch")
    logged = []
    for b in data:
        b = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), b)
        state, m = step(state, b)
        logged.append({k: float(v[0]) for k, v in m.items()})
    return logged, _host(jax.tree.map(lambda a: a[0], _states(state)))


def main():
    out = {"devices": jax.device_count()}
    for method, stage_index in (
        ("cotraining", 0),
        ("cotraining", 1),
        ("self_training", 1),
        ("naive", 0),
    ):
        ex = build(method)
        stage = ex.stages()[stage_index]
        data = batches(ex, stage)
        init = _host(_states(ex.init_state(jax.random.PRNGKey(0))))
        out[stage.name] = {
            "one": run_mesh(method, stage_index, jax.devices()[:1], data),
            "mesh": run_mesh(method, stage_index, jax.devices(), data),
            "pmap": run_pmap(method, stage_index, data),
            "init": init,
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
