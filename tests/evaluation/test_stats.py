"""medjax.evaluation.stats: closed forms and scipy.stats.bootstrap for the paired interval."""

import numpy as np
import pytest
from scipy import stats as sps

from medjax.evaluation.stats import paired_bootstrap, summarize, summary


def test_summary_ignores_nan_and_matches_numpy():
    v = [0.2, np.nan, 0.4, 0.9]
    s = summary(v)
    assert s["n"] == 3
    np.testing.assert_allclose(
        [s["mean"], s["std"]], [np.mean([0.2, 0.4, 0.9]), np.std([0.2, 0.4, 0.9])]
    )
    assert summary([np.nan])["n"] == 0 and np.isnan(summary([])["mean"])
    np.testing.assert_allclose(summary(v, ddof=1)["std"], np.std([0.2, 0.4, 0.9], ddof=1))
    out = summarize({"dice": [0.5, 0.7], "hd95": [np.inf, 2.0]})
    assert out["dice"] == pytest.approx(0.6) and out["dice_std"] == pytest.approx(0.1)
    assert out["hd95"] == 2.0  # inf is not finite: left out like NaN


def test_paired_bootstrap_closed_forms():
    g = paired_bootstrap([0.2, 0.3, 0.4, 0.5], [0.3, 0.4, 0.5, 0.6])  # +0.1 on every case
    assert g["improved"] == 4 and g["n"] == 4
    np.testing.assert_allclose([g["mean"], *g["ci95"]], [0.1, 0.1, 0.1], atol=1e-12)
    g = paired_bootstrap([0.5] * 4, [0.4, 0.6, 0.45, 0.55])  # symmetric changes: CI spans 0
    assert g["improved"] == 2 and abs(g["mean"]) < 1e-12 and g["ci95"][0] < 0 < g["ci95"][1]
    d = np.array([0.4, 0.6, 0.45, 0.55]) - 0.5
    assert d.min() <= g["ci95"][0] and g["ci95"][1] <= d.max()
    assert paired_bootstrap([0.1], [0.2]) is None
    assert paired_bootstrap([0.1, np.nan, 0.3], [0.2, 0.5, 0.2])["n"] == 2
    with pytest.raises(ValueError, match="one per case"):
        paired_bootstrap([0.1, 0.2], [0.1])


def test_paired_bootstrap_interval_agrees_with_scipy():
    rng = np.random.default_rng(3)
    before = rng.uniform(0.3, 0.5, 16)
    after = before + rng.normal(0.04, 0.03, 16)
    g = paired_bootstrap(before, after, resamples=40_000, seed=1)
    ref = sps.bootstrap(
        (after - before,),
        np.mean,
        confidence_level=0.95,
        n_resamples=40_000,
        method="percentile",
        random_state=np.random.default_rng(2),
    ).confidence_interval
    # Two independent Monte Carlo estimates of the same percentiles.
    np.testing.assert_allclose(g["ci95"], [ref.low, ref.high], atol=2.5e-3)
    g90 = paired_bootstrap(before, after, confidence=0.9, resamples=40_000)
    assert g90["ci95"][0] > g["ci95"][0] and g90["ci95"][1] < g["ci95"][1]
