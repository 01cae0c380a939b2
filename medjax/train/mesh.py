"""Device mesh, shardings and multi-host setup: one mesh axis ``"data"`` (data parallelism)."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "replicated",
    "data_sharded",
    "shard_batch",
    "replicate",
    "initialize_distributed",
    "available_memory",
]

DATA_AXIS = "data"
log = logging.getLogger(__name__)


def make_mesh(devices=None):
    """Return a 1-D ``Mesh`` over ``devices`` (default: all global devices) with axis ``"data"``.

    The axis type is ``AxisType.Auto`` (the Explicit default breaks 3-D conv gradients).
    """
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) == 0:
        raise ValueError("devices: expected at least one device, got an empty sequence")
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh):
    """``NamedSharding`` that replicates an array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def data_sharded(mesh):
    """``NamedSharding`` that splits an array's leading axis over the mesh's ``"data"`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def _local_data_devices(mesh):
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def shard_batch(host_batch, mesh):
    """Assemble global arrays from this process's part of the batch.

    ``host_batch``: a pytree (usually a dict) of arrays whose leading axis is this process's share,
    ``global_batch // process_count``. Returns the same tree of global ``jax.Array``s of leading
    size ``local * process_count``, split over ``"data"``.
    """
    sharding = data_sharded(mesh)
    n_local = len(_local_data_devices(mesh))
    if n_local == 0:
        raise ValueError("mesh: expected devices of this process in the mesh, got none")

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(
                f"host_batch{jax.tree_util.keystr(path)}: expected an array with a leading batch axis, "
                "got a scalar"
            )
        if x.shape[0] % n_local:
            raise ValueError(
                f"host_batch{jax.tree_util.keystr(path)}: expected a leading size divisible by the "
                f"{n_local} local devices, got shape {x.shape}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, host_batch)


def replicate(tree, mesh):
    """Place every leaf of ``tree`` on all devices of ``mesh`` (replicated); works multi-host.

    Each process must pass the same values. Non-array leaves are returned unchanged.
    """
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array):
            if not x.is_fully_addressable:
                return jax.device_put(x, sharding)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.device_put(x, sharding)
            x = np.asarray(jax.device_get(x))
        elif isinstance(x, (np.ndarray, np.generic, int, float, bool, complex)):
            x = np.asarray(x)
        else:
            return x
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


def _env_int(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}: expected an integer environment variable, got {v!r}") from None


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Start ``jax.distributed`` for a multi-process run; returns True when it did, False otherwise.

    Values come from the arguments, else ``MEDJAX_COORDINATOR`` (``host:port``),
    ``MEDJAX_NUM_PROCESSES`` and ``MEDJAX_PROCESS_ID``, else SLURM (``SLURM_NTASKS`` > 1: JAX's own
    cluster detection). A single process (or none of these set) is a no-op. On CPU the collectives
    use gloo. Call it before any other JAX call.
    """
    coordinator_address = coordinator_address or os.environ.get("MEDJAX_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int("MEDJAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("MEDJAX_PROCESS_ID")

    if jax.distributed.is_initialized():
        return True

    slurm_tasks = _env_int("SLURM_NTASKS")
    explicit = coordinator_address is not None or num_processes is not None
    if not explicit and (slurm_tasks is None or slurm_tasks <= 1):
        return False
    if explicit and num_processes is not None and num_processes <= 1:
        return False
    if explicit:
        if coordinator_address is None:
            raise ValueError(
                "coordinator_address: expected 'host:port' (or MEDJAX_COORDINATOR) for "
                f"num_processes={num_processes}, got None"
            )
        if num_processes is None or process_id is None:
            raise ValueError(
                "num_processes/process_id: expected both (or MEDJAX_NUM_PROCESSES/MEDJAX_PROCESS_ID), "
                f"got num_processes={num_processes}, process_id={process_id}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id: expected 0 <= process_id < {num_processes}, got {process_id}"
            )
    _use_gloo_on_cpu()
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def _use_gloo_on_cpu():
    # Only the CPU backend reads this; multi-process CPU needs gloo, accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def available_memory(device=None) -> int | None:
    """Bytes a compiled program may use on ``device`` (default: the first local one), or None.

    ``MEDJAX_DEVICE_MEMORY_BYTES`` overrides it (tests, or a share of a machine). Accelerators report
    their limit less what is in use (``memory_stats``); the CPU backend has the host's available
    memory (``MemAvailable`` of ``/proc/meminfo``), shared by all its devices.
    """
    env = os.environ.get("MEDJAX_DEVICE_MEMORY_BYTES")
    if env:
        return int(float(env))
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
