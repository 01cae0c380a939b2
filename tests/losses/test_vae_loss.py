"""The VAE loss of Myronenko 2018 against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.losses.vae import vae_loss, vae_loss_terms


def _case():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 4, 3)).astype(np.float32)  # N = 64 voxels per sample
    recon = x + 0.5
    mu = np.stack([np.full(5, 1.0), np.full(5, 2.0)]).astype(np.float32)
    logvar = np.stack([np.zeros(5), np.full(5, math.log(2.0))]).astype(np.float32)
    return x, recon, mu, logvar


def test_closed_form():
    x, recon, mu, logvar = _case()
    # sample 0: 5 (1 + 1 - 0 - 1) / 64; sample 1: 5 (4 + 2 - log 2 - 1) / 64; mean of the two
    kl = (5.0 + 5.0 * (5.0 - math.log(2.0))) / 64 / 2
    terms = vae_loss_terms(x, recon, mu, logvar)
    np.testing.assert_allclose(terms["reconstruction"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(terms["kl"], kl, rtol=1e-6)
    np.testing.assert_allclose(vae_loss(x, recon, mu, logvar), 0.1 * 0.25 + 0.1 * kl, rtol=1e-6)
    np.testing.assert_allclose(
        vae_loss(x, recon, mu, logvar, kind="l1", rec_weight=1.0, kl_weight=2.0),
        0.5 + 2.0 * kl,
        rtol=1e-6,
    )


def test_kl_is_twice_the_gaussian_kl_over_n():
    """L_KL = 2 KL(N(mu, sigma^2) || N(0, I)) / N, averaged over the batch."""
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(3, 7)).astype(np.float32)
    logvar = rng.normal(size=(3, 7)).astype(np.float32)
    x = np.zeros((3, 2, 3, 5, 1), np.float32)
    var = np.exp(logvar.astype(np.float64))
    kl = 0.5 * np.sum(mu.astype(np.float64) ** 2 + var - np.log(var) - 1, axis=1)
    got = vae_loss_terms(x, x, mu, logvar)["kl"]
    np.testing.assert_allclose(got, np.mean(2 * kl / 30), rtol=1e-5)
    assert float(vae_loss_terms(x, x, np.zeros_like(mu), np.zeros_like(logvar))["kl"]) == 0.0


def test_jits_and_differentiates():
    x, recon, mu, logvar = _case()
    g = jax.jit(jax.grad(lambda r: vae_loss(x, r, mu, logvar)))(jnp.asarray(recon))
    np.testing.assert_allclose(g, 0.1 * 2 * 0.5 / x.size, rtol=1e-5)


def test_bad_inputs_refused():
    x, recon, mu, logvar = _case()
    with pytest.raises(ValueError, match="kind"):
        vae_loss(x, recon, mu, logvar, kind="bce")
    with pytest.raises(ValueError, match="recon"):
        vae_loss(x, recon[:, :2], mu, logvar)
    with pytest.raises(ValueError, match="logvar"):
        vae_loss(x, recon, mu, logvar[:, :3])
    with pytest.raises(ValueError, match="mu"):
        vae_loss(x, recon, mu[:1], logvar[:1])
