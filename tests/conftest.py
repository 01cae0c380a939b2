"""Shared pytest fixtures and helpers for the medjax test suite."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Set before JAX starts (this file is imported before any test module), and inherited by every
# process the tests start (the CLI runs, notebook kernels, the multi-device workers):
# - JAX's persistent compilation cache, so that a computation compiled in several processes
#   (two pytest-xdist workers, a CLI subprocess and its in-process twin) is compiled once per run;
# - XLA's cheap compilation settings (``MEDJAX_TEST_FAST_COMPILE=0`` turns them off): the suite's
#   time is mostly compilation of tiny models, which run for milliseconds either way. Results agree
#   with the optimised build to float rounding; the benchmarks and the experiments never use them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if os.environ.get("MEDJAX_TEST_FAST_COMPILE", "1") == "1":
    # (XLA:CPU's older fusion emitters and one LLVM module per program compiled the FocusNetV2 steps
    # about 15 % faster than the defaults here: 33 s against 36-43 s over three runs each.)
    _FAST = (
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
        "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
    )
    if _FAST not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()
    # XLA's own convolution instead of medjax.nn.conv's CPU lowerings, which compile several times
    # more slowly (the joint network's gradient: 17 s against 1.3 s) for the same arithmetic. The
    # lowerings keep their own tests (tests/nn/test_conv.py and the tests that switch them on).
    os.environ.setdefault("MEDJAX_CPU_CONV", "0")

#: Fake CPU devices run a collective (a pmap's psum, a mesh's all-reduce) as one thread per device,
#: and XLA aborts the process when the threads have not all arrived within 40 s. On a loaded
#: 2-core machine 8 device threads can take longer than that to be scheduled, so the workers
#: wait up to 15 minutes instead (a hang still ends with the tests' own subprocess timeouts).
COLLECTIVE_TIMEOUTS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
    "--xla_cpu_collective_timeout_seconds=900"
)


def fake_devices_env(n, env=None):
    """``env`` (default ``os.environ``) for a subprocess with ``n`` fake CPU devices.

    Keeps the suite's XLA flags (fast compilation) and adds the device count and
    :data:`COLLECTIVE_TIMEOUTS`.
    """
    env = dict(os.environ if env is None else env)
    flags = env.get("XLA_FLAGS", "")
    extra = f"--xla_force_host_platform_device_count={int(n)} {COLLECTIVE_TIMEOUTS}"
    env["XLA_FLAGS"] = f"{flags} {extra}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def require_reference(module_name):
    """Import a reference library (torch, monai) or skip; fail instead when CI demands it.

    CI sets ``MEDJAX_REQUIRE_REFERENCE=1`` so that parity tests can never silently skip there.
    """
    try:
        return __import__(module_name)
    except ImportError as e:
        if os.environ.get("MEDJAX_REQUIRE_REFERENCE") == "1":
            raise RuntimeError(
                f"MEDJAX_REQUIRE_REFERENCE=1 but reference library {module_name!r} is missing: {e}"
            ) from e
        pytest.skip(f"reference library {module_name!r} is not installed")


def shared_data_dir():
    """Directory with the small real scans (``monai/``, ``voxelmorph/``), or None when absent."""
    env = os.environ.get("MEDJAX_SHARED_DATA")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture
def shared_data():
    """Path to ``shared/data``; skips with a reason when the real scans are absent."""
    d = shared_data_dir()
    if d is None:
        pytest.skip("real scans not found: set MEDJAX_SHARED_DATA to the shared/data folder")
    return d
