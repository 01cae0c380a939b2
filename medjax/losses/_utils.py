"""Input checks and small helpers shared by the loss functions (not public)."""

import jax
import jax.numpy as jnp

from medjax.ops import one_hot


def check_logits(logits, name="logits", min_rank=3):
    """Return ``logits`` as a float array of rank >= ``min_rank``, channels last ``(B, *S, C)``."""
    logits = jnp.asarray(logits)
    if logits.ndim < min_rank:
        raise ValueError(
            f"{name} must have shape (B, *spatial, C) with rank >= {min_rank}; "
            f"got shape {tuple(logits.shape)}"
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    return logits


def target_like(target, logits, name="target"):
    """One-hot/soft target ``(B, *S, C)`` from an integer map ``(B, *S)`` or a ``(B, *S, C)`` array."""
    target = jnp.asarray(target)
    num_classes = logits.shape[-1]
    if target.shape == logits.shape[:-1]:
        if not jnp.issubdtype(target.dtype, jnp.integer) and target.dtype != jnp.bool_:
            raise ValueError(
                f"{name} with shape {tuple(target.shape)} (no channel axis) must hold integer labels; "
                f"got dtype {target.dtype}"
            )
        return one_hot(target.astype(jnp.int32), num_classes).astype(logits.dtype)
    if target.shape == logits.shape:
        return target.astype(logits.dtype)
    raise ValueError(
        f"{name} must have shape {tuple(logits.shape[:-1])} (integer labels) or "
        f"{tuple(logits.shape)} (one-hot/soft); got {tuple(target.shape)}"
    )


def voxel_mask(mask, shape, name="mask"):
    """Float voxel mask of shape ``shape`` = ``(B, *S)`` from ``(B, *S)`` or ``(B, *S, 1)``."""
    mask = jnp.asarray(mask)
    if mask.shape == tuple(shape) + (1,):
        mask = mask[..., 0]
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(mask.shape)}")
    return jax.lax.stop_gradient(mask.astype(jnp.float32))


def class_vector(weights, num_classes, name):
    """``(C,)`` float vector from a sequence/array of per-class values."""
    w = jnp.asarray(weights, dtype=jnp.float32)
    if w.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},); got {tuple(w.shape)}")
    return w


def activate(logits, activation):
    """Softmax / sigmoid / identity over the channel axis."""
    if activation == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if activation == "sigmoid":
        return jax.nn.sigmoid(logits)
    if activation == "none":
        return logits
    raise ValueError(f"activation must be one of 'softmax', 'sigmoid', 'none'; got {activation!r}")


def masked_mean(values, mask):
    """Mean of ``values`` (B, *S) over voxels where ``mask`` is set (all voxels when None)."""
    if mask is None:
        return jnp.mean(values)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
