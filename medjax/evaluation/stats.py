"""Statistics over cases: mean ± std, and the paired bootstrap of a difference between two methods.

Test cases differ far more from each other than two methods differ on them, so a comparison is read
from the *paired* differences (method B minus method A on the same case): their mean, a percentile
bootstrap confidence interval and the number of cases that improve. NaN cases (e.g. a structure
absent from a case) are left out. Everything is deterministic in ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "summarize", "summary"]


def _finite(values) -> np.ndarray:
    v = np.asarray(values, np.float64).ravel()
    return v[np.isfinite(v)]


def summary(values, *, ddof: int = 0) -> dict:
    """``{"mean", "std", "n"}`` of the finite values (std with ``ddof``; NaNs when none)."""
    v = _finite(values)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(v.std(ddof=ddof)) if v.size > ddof else float("nan")
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


def summarize(per_case: Mapping[str, Sequence[float]], *, ddof: int = 0) -> dict:
    """``{key: mean, key + "_std": std}`` for every list of per-case values in ``per_case``."""
    out = {}
    for key, values in per_case.items():
        s = summary(values, ddof=ddof)
        out[key], out[f"{key}_std"] = s["mean"], s["std"]
    return out


def paired_bootstrap(
    before, after, *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict | None:
    """Paired change ``after - before``: mean, percentile bootstrap CI, cases improved.

    ``before`` and ``after`` are per-case values in the same case order. Cases where either is NaN
    are dropped. Returns ``{"mean", "ci95": [lo, hi], "improved", "n", "confidence"}`` (the key is
    ``ci95`` whatever ``confidence`` is, for stable report columns), or None for fewer than 2 cases.
    """
    b, a = np.asarray(before, np.float64).ravel(), np.asarray(after, np.float64).ravel()
    if b.shape != a.shape:
        raise ValueError(f"after: expected {b.size} values (one per case of before), got {a.size}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    d = a - b
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, d.size, (int(resamples), d.size))
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(d[idx].mean(axis=1), [tail, 100 - tail])
    return {
        "mean": float(d.mean()),
        "ci95": [float(lo), float(hi)],
        "improved": int((d > 0).sum()),
        "n": int(d.size),
        "confidence": float(confidence),
    }
