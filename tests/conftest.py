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
    _FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    if _FAST not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()


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
