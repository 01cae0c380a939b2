"""Jittable crop and paste of fixed-size boxes around traced centres (FocusNetV2's zoom-in).

``crop_at(volume, centres, size)`` cuts a ``size`` box out of each sample of ``(B, *S, C)`` around
its own centre ``(B, ndim)``; ``paste_at(volume, patch, centres)`` writes a patch back into the same
box. The box starts at ``round(centre) - size // 2``, clamped so that it lies inside the volume
(FocusNetV2 clamps its centres the same way, to a hard-coded volume; here each sample is clamped to
its own). Centres may be traced floats: both functions work under ``jit`` and ``vmap`` (over organs
and batch), and are differentiable with respect to the arrays (not the centres, which only pick
the box). ``paste_at(zeros, p, c)`` is the adjoint of ``crop_at(., c)``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["box_starts", "crop_at", "paste_at"]


def _check(volume, centres, size):
    if volume.ndim < 3:
        raise ValueError(f"volume: expected (B, *S, C), got shape {volume.shape}")
    n = volume.ndim - 2
    size = (int(size),) * n if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != n:
        raise ValueError(f"size: expected {n} values (one per spatial axis), got {size}")
    spatial = tuple(volume.shape[1:-1])
    if any(b < 1 or b > s for b, s in zip(size, spatial, strict=True)):
        raise ValueError(f"size: expected a box inside the volume {spatial}, got {size}")
    if centres.shape != (volume.shape[0], n):
        raise ValueError(
            f"centres: expected shape ({volume.shape[0]}, {n}) (one centre per sample), "
            f"got {centres.shape}"
        )
    return size, spatial


def box_starts(centres, size, spatial_shape):
    """Integer box starts ``(B, ndim)``: ``round(centre) - size // 2`` clamped to ``[0, S - size]``."""
    size = jnp.asarray(size, jnp.int32)
    hi = jnp.asarray(spatial_shape, jnp.int32) - size
    c = jnp.round(jnp.asarray(centres)).astype(jnp.int32)
    return jnp.clip(c - size // 2, 0, hi)


def crop_at(volume, centres, size):
    """``(B, *S, C)`` -> ``(B, *size, C)``: each sample's box around its centre (clamped inside)."""
    volume, centres = jnp.asarray(volume), jnp.asarray(centres)
    size, spatial = _check(volume, centres, size)
    starts = box_starts(centres, size, spatial)
    chex.assert_shape(starts, (volume.shape[0], len(size)))

    def one(v, s):
        return lax.dynamic_slice(v, tuple(s) + (0,), size + (v.shape[-1],))

    return jax.vmap(one)(volume, starts)


def paste_at(volume, patch, centres):
    """``volume (B, *S, C)`` with ``patch (B, *size, C)`` written into each sample's clamped box."""
    volume, patch, centres = jnp.asarray(volume), jnp.asarray(patch), jnp.asarray(centres)
    if (
        patch.ndim != volume.ndim
        or patch.shape[0] != volume.shape[0]
        or patch.shape[-1] != volume.shape[-1]
    ):
        raise ValueError(
            f"patch: expected (B, *size, C) with B={volume.shape[0]} and C={volume.shape[-1]}, "
            f"got shape {patch.shape}"
        )
    size, spatial = _check(volume, centres, patch.shape[1:-1])
    starts = box_starts(centres, size, spatial)
    chex.assert_shape(starts, (volume.shape[0], len(size)))

    def one(v, p, s):
        return lax.dynamic_update_slice(v, p.astype(v.dtype), tuple(s) + (0,))

    return jax.vmap(one)(volume, patch, starts)
