"""The VAE regulariser of Myronenko (2018): the loss of ResNet3dVAE (medjax.models.resnet3d_vae)."""

from __future__ import annotations

import math

import jax.numpy as jnp

__all__ = ["vae_loss", "vae_loss_terms"]

_KINDS = ("l2", "l1")


def _check(x, recon, mu, logvar, kind):
    x = jnp.asarray(x, jnp.float32)
    recon = jnp.asarray(recon, jnp.float32)
    mu = jnp.asarray(mu, jnp.float32)
    logvar = jnp.asarray(logvar, jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"x: expected an image (B, *S, C), got shape {tuple(x.shape)}")
    if recon.shape != x.shape:
        raise ValueError(f"recon: expected x's shape {tuple(x.shape)}, got {tuple(recon.shape)}")
    if mu.ndim != 2 or mu.shape[0] != x.shape[0]:
        raise ValueError(
            f"mu: expected (B, latent) with B = {x.shape[0]}, got shape {tuple(mu.shape)}"
        )
    if logvar.shape != mu.shape:
        raise ValueError(
            f"logvar: expected mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}"
        )
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {_KINDS}, got {kind!r}")
    return x, recon, mu, logvar


def vae_loss_terms(x, recon, mu, logvar, *, kind: str = "l2"):
    """The unweighted terms ``{"reconstruction": scalar, "kl": scalar}`` of :func:`vae_loss`."""
    x, recon, mu, logvar = _check(x, recon, mu, logvar, kind)
    diff = recon - x
    rec = jnp.mean(jnp.square(diff)) if kind == "l2" else jnp.mean(jnp.abs(diff))
    n = math.prod(x.shape[1:-1])
    per_sample = jnp.sum(jnp.square(mu) + jnp.exp(logvar) - logvar - 1.0, axis=-1) / n
    return {"reconstruction": rec, "kl": jnp.mean(per_sample)}


def vae_loss(
    x,
    recon,
    mu,
    logvar,
    *,
    kind: str = "l2",
    rec_weight: float = 0.1,
    kl_weight: float = 0.1,
):
    """Myronenko's VAE loss ``rec_weight * L_rec + kl_weight * L_KL``: a scalar.

    ``x``, ``recon``: the input image and its reconstruction ``(B, *S, C)``; ``mu``, ``logvar``:
    the latent mean and log-variance ``(B, L)``. With ``sigma^2 = exp(logvar)``:

    - ``L_rec`` (``kind="l2"``): the mean squared error ``mean((recon - x)^2)`` over every element
      (``kind="l1"``: the mean absolute error);
    - ``L_KL = mean over the batch of (1 / N) * sum over the L latents of
      (mu^2 + sigma^2 - log sigma^2 - 1)``, with ``N = prod(S)`` the number of image voxels per
      sample (channels not counted): the paper's ``L_KL`` (Myronenko 2018, eq. 2; note it has no
      factor 1/2, so it is twice the KL divergence to N(0, I) divided by N).

    The defaults weigh both terms by 0.1, the paper's ``L = L_dice + 0.1 L_L2 + 0.1 L_KL`` (and
    the original's ``h1 = h2 = 0.1``), so ``dice + vae_loss(...)`` is the paper's total loss;
    :func:`vae_loss_terms` gives the unweighted terms.

    MedicalZoo's ``lib/losses3D/VAEloss.py`` does not compute this: it imports
    ``torch.functional as F`` and calls ``F.binary_cross_entropy``, which does not exist there (its
    default ``"BCE"`` branch fails); its ``"L2"`` branch sums ``sqrt(recon^2 - x^2)`` (not an L2
    distance, and NaN wherever ``|x| > |recon|``); its ``"L1"`` branch and its KL
    (``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))``) are sums over the whole batch, unnormalised.
    """
    terms = vae_loss_terms(x, recon, mu, logvar, kind=kind)
    return rec_weight * terms["reconstruction"] + kl_weight * terms["kl"]
