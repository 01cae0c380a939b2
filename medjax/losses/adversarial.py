"""Wasserstein GAN losses (PnP-AdaNet: source MR = real, target CT = fake)."""

import jax.numpy as jnp


def wgan_critic_loss(d_real, d_fake):
    """Critic loss ``-(mean d_real - mean d_fake)``: critic outputs of any shape -> scalar."""
    return -(
        jnp.mean(jnp.asarray(d_real, jnp.float32)) - jnp.mean(jnp.asarray(d_fake, jnp.float32))
    )


def wgan_generator_loss(d_fake):
    """Generator (adaptation module) loss ``-mean d_fake``: critic outputs of any shape -> scalar."""
    return -jnp.mean(jnp.asarray(d_fake, jnp.float32))
