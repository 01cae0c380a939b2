"""One process of a 2-process jax.distributed run (gloo on CPU); writes JSON results.

Usage: python -m tests.train._distributed_worker PROCESS_ID NUM_PROCESSES PORT OUT_JSON
Each process has 2 local CPU devices and feeds only its own slice of the global batch.
"""

import json
import sys

from medjax.train.mesh import initialize_distributed


def main():
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    started = initialize_distributed(f"localhost:{port}", nproc, pid)

    import jax

    from medjax.train.mesh import make_mesh, replicate, shard_batch
    from medjax.train.steps import compile_step
    from tests.train import _tiny_model as T

    assert started and jax.process_count() == nproc and jax.process_index() == pid
    mesh = make_mesh()
    state = replicate(T.init_state(), mesh)
    step = compile_step(T.make_step(), mesh)
    local = T.GLOBAL_BATCH // nproc
    losses = []
    for i in range(T.NUM_STEPS):
        full = T.data(i)
        mine = {k: v[pid * local : (pid + 1) * local] for k, v in full.items()}
        batch = shard_batch(mine, mesh)
        assert batch["x"].shape == full["x"].shape
        state, m = step(state, batch)
        losses.append(float(m["loss"].addressable_data(0)))
    tree = T.to_numpy({"params": state.params, "model_state": state.model_state})
    with open(out, "w") as f:
        json.dump(
            {
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "local_device_count": jax.local_device_count(),
                "losses": losses,
                "tree": jax.tree_util.tree_map(lambda a: a.tolist(), tree),
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
