"""Mesh and sharding helpers on the local (single-process) devices."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from medjax.train import mesh as M


def test_make_mesh_axis():
    mesh = M.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.axis_types == (AxisType.Auto,)
    assert mesh.devices.size == jax.device_count()
    one = M.make_mesh(jax.devices()[:1])
    assert one.devices.size == 1
    with pytest.raises(ValueError, match="devices"):
        M.make_mesh([])


def test_shard_batch_and_replicate():
    mesh = M.make_mesh()
    n = jax.device_count()
    x = np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)
    out = M.shard_batch({"x": x, "y": x[:, 0].astype(np.int32)}, mesh)
    assert out["x"].shape == (2 * n, 3)
    assert out["x"].sharding == M.data_sharded(mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), x)
    np.testing.assert_array_equal(np.asarray(out["y"]), x[:, 0].astype(np.int32))
    r = M.replicate({"a": np.ones((2, 2)), "b": 3.0, "c": "keep"}, mesh)
    assert r["a"].sharding.is_fully_replicated and r["c"] == "keep"
    np.testing.assert_array_equal(np.asarray(r["a"]), np.ones((2, 2)))
    assert float(r["b"]) == 3.0
    with pytest.raises(ValueError, match="host_batch"):
        M.shard_batch({"s": np.float32(1.0)}, mesh)


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    for k in ("MEDJAX_COORDINATOR", "MEDJAX_NUM_PROCESSES", "MEDJAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert M.initialize_distributed() is False
    assert M.initialize_distributed(num_processes=1) is False
    monkeypatch.setenv("MEDJAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="coordinator_address"):
        M.initialize_distributed()
    with pytest.raises(ValueError, match="process_id"):
        M.initialize_distributed(coordinator_address="localhost:1", process_id=5)
    assert jax.process_count() == 1
