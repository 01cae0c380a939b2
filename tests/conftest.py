"""Shared pytest fixtures and helpers for the medjax test suite."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


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
