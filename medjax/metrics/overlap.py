"""Overlap metrics on integer label maps: per-class Dice (MONAI semantics) and the confusion matrix."""

import functools

import jax
import jax.numpy as jnp

from medjax.metrics._checks import check_label_maps
from medjax.ops import one_hot


def dice(pred, target, *, num_classes, include_background=False, ignore_empty=True):
    """Per-sample per-class Dice: integer label maps (B, *S) -> (B, C) float32.

    C = num_classes, or num_classes - 1 when ``include_background`` is False (class 0 dropped).
    Follows MONAI ``DiceMetric`` on one-hot inputs: ``2 |P & T| / (|P| + |T|)``; when the target
    class is empty the score is NaN if ``ignore_empty``, else 1 when the prediction is also empty
    and 0 otherwise. Labels must lie in [0, num_classes); NaN or wrong shapes raise ValueError.
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    check_label_maps(pred, target, num_classes)
    return _dice(pred, target, num_classes, include_background, ignore_empty)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dice(pred, target, num_classes, include_background, ignore_empty):
    p = one_hot(pred.astype(jnp.int32), num_classes).astype(jnp.float32)
    t = one_hot(target.astype(jnp.int32), num_classes).astype(jnp.float32)
    if not include_background:
        p, t = p[..., 1:], t[..., 1:]
    axes = tuple(range(1, p.ndim - 1))
    inter = jnp.sum(p * t, axis=axes)
    t_sum = jnp.sum(t, axis=axes)
    p_sum = jnp.sum(p, axis=axes)
    score = 2.0 * inter / jnp.where(t_sum > 0, t_sum + p_sum, 1.0)
    if ignore_empty:
        empty = jnp.nan
    else:
        empty = jnp.where(p_sum > 0, 0.0, 1.0)
    return jnp.where(t_sum > 0, score, empty).astype(jnp.float32)


def confusion_matrix(pred, target, *, num_classes):
    """Voxel counts (num_classes, num_classes) int32: entry [i, j] = #voxels with target i and pred j.

    pred, target: integer label maps (B, *S); counts are summed over the whole batch.
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    check_label_maps(pred, target, num_classes)
    idx = target.astype(jnp.int32).ravel() * num_classes + pred.astype(jnp.int32).ravel()
    counts = jnp.bincount(idx, length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)
