"""Segmentation losses: soft / generalized Dice, (weighted) cross-entropy, BCE, focal, adaptive Tversky.

All take channels-last logits ``(B, *S, C)`` and a target that is either an integer label map
``(B, *S)`` or a one-hot / soft array ``(B, *S, C)``; all return a float32 scalar.
"""

import jax
import jax.numpy as jnp

from medjax.losses._utils import (
    activate,
    check_logits,
    class_vector,
    masked_mean,
    target_like,
    voxel_mask,
)

_REDUCTIONS = ("batch", "sample")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def _drop_background(p, y, include_background):
    if include_background:
        return p, y
    if p.shape[-1] < 2:
        raise ValueError(
            f"include_background=False needs at least 2 channels; logits have {p.shape[-1]}"
        )
    return p[..., 1:], y[..., 1:]


def _presence(presence, batch, num_classes):
    if presence is None:
        return jnp.ones((batch, num_classes), jnp.float32)
    m = jnp.asarray(presence, jnp.float32)
    if m.shape != (batch, num_classes):
        raise ValueError(f"presence must have shape ({batch}, {num_classes}); got {tuple(m.shape)}")
    return jax.lax.stop_gradient(m)


def soft_dice_loss(
    logits,
    target,
    *,
    activation="softmax",
    squared=False,
    eps=1e-5,
    smooth=0.0,
    include_background=True,
    reduction="batch",
    class_weights=None,
    axis_name=None,
):
    """Soft Dice loss ``1 - mean_c Dice_c``: logits (B, *S, C), target (B, *S) int or (B, *S, C) -> scalar.

    ``Dice_c = (2 sum p y + smooth) / (max(D_c, eps) + smooth)`` with ``D_c = sum p + sum y``, or
    ``sum p^2 + sum y^2`` when ``squared``. Sums run over the spatial axes, and also over the batch
    when ``reduction="batch"`` (batch-pooled); with ``"sample"`` the per-sample losses are averaged.
    ``class_weights`` (C,) gives a weighted mean over classes (indexed over all C classes, also when
    ``include_background=False`` drops channel 0).

    Variants of the reproduced systems:

    * MedicalZoo ``DiceLoss``: ``squared=True, eps=1e-6, reduction="batch", include_background=True``
      (denominator clamped at eps). The original applies a *sigmoid*; medjax uses softmax for
      multi-class outputs (pass ``activation="sigmoid"`` to reproduce the original exactly).
    * PnP-AdaNet: ``squared=True`` (its denominator is ``sum p^2 + sum y``, identical for one-hot y),
      background included, batch-pooled; the original adds eps=1e-7 instead of clamping, which
      differs by O(eps / D_c).

    ``axis_name``: under ``jax.pmap`` with ``reduction="batch"``, the sums are also pooled over
    this axis (``psum``), so every device gets the loss of the whole global batch.
    """
    _check_reduction(reduction)
    logits = check_logits(logits)
    y = target_like(target, logits)
    p = activate(logits, activation)
    num_classes = logits.shape[-1]
    w = None if class_weights is None else class_vector(class_weights, num_classes, "class_weights")
    p, y = _drop_background(p, y, include_background)
    if w is not None and not include_background:
        w = w[1:]
    spatial = tuple(range(1, p.ndim - 1))
    axes = (0, *spatial) if reduction == "batch" else spatial
    inter = jnp.sum(p * y, axis=axes)
    if squared:
        denom = jnp.sum(p * p, axis=axes) + jnp.sum(y * y, axis=axes)
    else:
        denom = jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes)
    if axis_name is not None and reduction == "batch":
        inter, denom = jax.lax.psum((inter, denom), axis_name)
    dice = (2.0 * inter + smooth) / (jnp.maximum(denom, eps) + smooth)
    loss_c = 1.0 - dice  # (C,) or (B, C)
    if w is None:
        per = jnp.mean(loss_c, axis=-1)
    else:
        per = jnp.sum(loss_c * w, axis=-1) / jnp.sum(w)
    return jnp.mean(per)


def generalized_dice_loss(
    logits,
    target,
    *,
    activation="softmax",
    eps=1e-5,
    include_background=True,
    reduction="batch",
    axis_name=None,
):
    """Generalized Dice loss (Sudre 2017): logits (B, *S, C), target (B, *S) or (B, *S, C) -> scalar.

    ``1 - 2 sum_c w_c sum p y / max(sum_c w_c (sum p + sum y), eps)`` with ``w_c = 1 / max((sum y_c)^2, eps)``
    (MedicalZoo's clamp; a class absent from the target gets the large weight 1/eps). Sums are pooled
    over the batch (``reduction="batch"``) or taken per sample and averaged (``"sample"``);
    ``axis_name`` pools them over a ``jax.pmap`` axis too (as :func:`soft_dice_loss`).
    """
    _check_reduction(reduction)
    logits = check_logits(logits)
    y = target_like(target, logits)
    p = activate(logits, activation)
    p, y = _drop_background(p, y, include_background)
    spatial = tuple(range(1, p.ndim - 1))
    axes = (0, *spatial) if reduction == "batch" else spatial
    ysum, pysum, psum_ = jnp.sum(y, axis=axes), jnp.sum(p * y, axis=axes), jnp.sum(p, axis=axes)
    if axis_name is not None and reduction == "batch":
        ysum, pysum, psum_ = jax.lax.psum((ysum, pysum, psum_), axis_name)
    w = jax.lax.stop_gradient(1.0 / jnp.maximum(ysum * ysum, eps))
    inter = jnp.sum(w * pysum, axis=-1)
    denom = jnp.sum(w * (psum_ + ysum), axis=-1)
    return jnp.mean(1.0 - 2.0 * inter / jnp.maximum(denom, eps))


def _ce_weights(class_weights, y, mask, axis_name=None):
    num_classes = y.shape[-1]
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        if class_weights != "batch_inverse_frequency":
            raise ValueError(
                "class_weights must be None, a (C,) sequence or 'batch_inverse_frequency'; "
                f"got {class_weights!r}"
            )
        yy = y if mask is None else y * mask[..., None]
        counts = jnp.sum(yy, axis=tuple(range(y.ndim - 1)))
        if axis_name is not None:
            counts = jax.lax.psum(counts, axis_name)
        return jax.lax.stop_gradient(1.0 - counts / jnp.maximum(jnp.sum(counts), 1.0))
    return class_vector(class_weights, num_classes, "class_weights")


def cross_entropy(
    logits, labels, *, class_weights=None, mask=None, prob_floor=None, axis_name=None
):
    """Mean (class-weighted) cross-entropy: logits (B, *S, C), labels (B, *S) int or (B, *S, C) -> scalar.

    Per voxel ``-sum_c w_c y_c log softmax(logits)_c``, averaged over all voxels (or the voxels where
    ``mask`` (B, *S) is non-zero). Weights are *not* renormalised by the weights of the targets
    (PnP-AdaNet's convention; torch's ``CrossEntropyLoss(weight=...)`` divides by sum w_y instead).
    ``class_weights``: None, a (C,) sequence, or ``"batch_inverse_frequency"`` for PnP-AdaNet's
    per-batch ``w_c = 1 - N_c / N`` (counted over the batch, inside ``mask`` when given).
    ``prob_floor``: None (an unclipped log-softmax) or a value in (0, 1) to which the softmax
    probabilities are clipped from below before the log, as PnP-AdaNet does with 0.005
    (``log(clip(p, 0.005, 1))``; a voxel whose true class is below the floor gets no gradient).
    ``axis_name``: under ``jax.pmap``, the batch frequencies are counted over every device's batch
    (``psum``), so that the weights are those of the global batch (the mean itself is per device:
    its ``pmean`` is the global mean when the devices hold equal batches and no ``mask``).
    """
    logits = check_logits(logits)
    y = target_like(labels, logits, "labels")
    m = None if mask is None else voxel_mask(mask, logits.shape[:-1])
    w = _ce_weights(class_weights, y, m, axis_name)
    if prob_floor is None:
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        if not 0.0 < float(prob_floor) < 1.0:
            raise ValueError(f"prob_floor: expected None or a value in (0, 1), got {prob_floor}")
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        logp = jnp.log(jnp.clip(p, float(prob_floor), 1.0))
    yw = y if w is None else y * w
    return masked_mean(-jnp.sum(yw * logp, axis=-1), m)


def soft_cross_entropy(logits, teacher, *, teacher_logits=False, mask=None):
    """Soft-label cross-entropy ``-sum_c q_c log softmax(logits)_c``, mean over voxels -> scalar.

    logits (B, *S, C); teacher (B, *S, C) holds probabilities q, or logits when ``teacher_logits``
    (then q = softmax(teacher)). The teacher is not differentiated (stop-gradient). ``mask`` (B, *S)
    restricts the average to the voxels whose labels are uncertain (co-training of Huang et al. 2020:
    e.g. the voxels labelled background in a partially labelled dataset); an empty mask gives 0.
    """
    logits = check_logits(logits)
    teacher = jnp.asarray(teacher, jnp.float32)
    if teacher.shape != logits.shape:
        raise ValueError(
            f"teacher must have the logits' shape {tuple(logits.shape)}; got {tuple(teacher.shape)}"
        )
    q = jax.nn.softmax(teacher, axis=-1) if teacher_logits else teacher
    q = jax.lax.stop_gradient(q)
    m = None if mask is None else voxel_mask(mask, logits.shape[:-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return masked_mean(-jnp.sum(q * logp, axis=-1), m)


def focal_loss(logits, labels, *, gamma=2.0, alpha=None, presence=None, mask=None):
    """Multi-class focal loss (Lin 2017): logits (B, *S, C), labels (B, *S) or (B, *S, C) -> scalar.

    Per voxel ``-sum_c alpha_c m_bc y_c (1 - p_c)^gamma log p_c`` with p = softmax(logits), averaged
    over voxels (or over ``mask`` (B, *S)). ``alpha`` (C,) per-class weights (default 1);
    ``presence`` (B, C) per-sample organ-presence weights m_bc (FocusNetV2; default 1).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    logits = check_logits(logits)
    y = target_like(labels, logits, "labels")
    num_classes = logits.shape[-1]
    batch = logits.shape[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    focus = 1.0 if gamma == 0 else jnp.power(jnp.clip(1.0 - p, 0.0, 1.0), gamma)
    term = y * focus * logp
    if alpha is not None:
        term = term * class_vector(alpha, num_classes, "alpha")
    if presence is not None:
        m = _presence(presence, batch, num_classes)
        term = term * m.reshape((batch,) + (1,) * (logits.ndim - 2) + (num_classes,))
    vm = None if mask is None else voxel_mask(mask, logits.shape[:-1])
    return masked_mean(-jnp.sum(term, axis=-1), vm)


def adaptive_tversky_loss(
    logits,
    labels,
    *,
    presence=None,
    alpha_range=(0.2, 0.8),
    eps=1e-5,
    include_background=True,
    activation="softmax",
):
    """FocusNetV2's adaptive Tversky loss: logits (B, *S, C), labels (B, *S) or (B, *S, C) -> scalar.

    Per sample b and class c (soft counts over the spatial axes):
    ``TP = sum p y``, ``FP = sum p (1 - y)``, ``FN = sum (1 - p) y``;
    ``alpha = clip(FP / (FP + FN), *alpha_range)`` (0.5 when FP + FN = 0; stop-gradient),
    ``beta = 1 - alpha``, ``T = (TP + eps) / (TP + alpha FP + beta FN + eps)``.
    Returns ``sum_bc m_bc (1 - T_bc) / sum_bc m_bc`` with presence m (B, C) (default all ones;
    0 when every weight is 0). alpha weights the false positives, so the error type that currently
    dominates is penalised more.
    """
    lo, hi = alpha_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"alpha_range must satisfy 0 <= lo <= hi <= 1; got {alpha_range}")
    logits = check_logits(logits)
    y = target_like(labels, logits, "labels")
    p = activate(logits, activation)
    num_classes = logits.shape[-1]
    m = _presence(presence, logits.shape[0], num_classes)
    p, y = _drop_background(p, y, include_background)
    if not include_background:
        m = m[:, 1:]
    spatial = tuple(range(1, p.ndim - 1))
    tp = jnp.sum(p * y, axis=spatial)
    fp = jnp.sum(p * (1.0 - y), axis=spatial)
    fn = jnp.sum((1.0 - p) * y, axis=spatial)
    err = fp + fn
    alpha = jnp.where(err > 0, fp / jnp.where(err > 0, err, 1.0), 0.5)
    alpha = jax.lax.stop_gradient(jnp.clip(alpha, lo, hi))
    beta = 1.0 - alpha
    t = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    total = jnp.sum(m)
    return jnp.sum(m * (1.0 - t)) / jnp.where(total > 0, total, 1.0)


def dice_ce_loss(
    logits,
    labels,
    *,
    dice_weight=1.0,
    ce_weight=1.0,
    ce_class_weights=None,
    squared=False,
    include_background=True,
    eps=1e-5,
    reduction="batch",
):
    """``ce_weight * cross_entropy + dice_weight * soft_dice_loss``: logits (B, *S, C) -> scalar.

    PnP-AdaNet's segmentation loss is
    ``dice_ce_loss(..., ce_class_weights="batch_inverse_frequency", squared=True)``.
    """
    ce = cross_entropy(logits, labels, class_weights=ce_class_weights)
    dl = soft_dice_loss(
        logits,
        labels,
        squared=squared,
        eps=eps,
        include_background=include_background,
        reduction=reduction,
    )
    return ce_weight * ce + dice_weight * dl


def binary_cross_entropy(logits, target, *, mask=None):
    """Mean binary cross-entropy with logits: logits (B, *S, C), target (B, *S) int or (B, *S, C).

    Every channel is an independent sigmoid: per element ``softplus(x) - x y`` (torch's
    ``BCEWithLogitsLoss``), averaged over all elements, or over the voxels where ``mask``
    (B, *S) is non-zero. An integer target is one-hot encoded first.
    """
    logits = check_logits(logits)
    y = target_like(target, logits)
    per = jnp.mean(jax.nn.softplus(logits) - logits * y, axis=-1)
    m = None if mask is None else voxel_mask(mask, logits.shape[:-1])
    return masked_mean(per, m)


def bce_dice_loss(
    logits, target, *, alpha=1.0, beta=1.0, activation="softmax", eps=1e-6, axis_name=None
):
    """MedicalZoo's ``BCEDiceLoss``: ``alpha * BCE + beta * Dice`` -> scalar.

    BCE: :func:`binary_cross_entropy` of the one-hot target (sigmoid per channel, mean over every
    element). Dice: MedicalZoo's Dice, ``soft_dice_loss(squared=True, eps=1e-6)`` pooled over the
    batch, background included. The original normalises inside its Dice with a sigmoid; here
    ``activation="softmax"`` (multi-class) is the default and ``"sigmoid"`` reproduces it.
    ``axis_name``: the Dice's sums are pooled over a ``jax.pmap`` axis too.
    """
    bce = binary_cross_entropy(logits, target)
    dice = soft_dice_loss(
        logits,
        target,
        activation=activation,
        squared=True,
        eps=eps,
        reduction="batch",
        axis_name=axis_name,
    )
    return alpha * bce + beta * dice


def weighted_cross_entropy(logits, labels, *, ignore_index=-1, axis_name=None):
    """MedicalZoo's ``WeightedCrossEntropyLoss`` (Sudre 2017): logits (B, *S, C), labels (B, *S) -> scalar.

    Class weights from the *predictions* of the batch (no gradient): with p = softmax(logits),
    ``w_c = sum (1 - p_c) / sum p_c`` over the batch and space. Then torch's weighted
    cross-entropy, a weighted *mean*: ``sum_i w_{y_i} (-log p_{y_i}) / sum_i w_{y_i}`` over the
    voxels whose label is not ``ignore_index`` (0 when none is left). ``axis_name``: the sums
    run over a ``jax.pmap`` axis too (the weights and the mean of the global batch).
    """
    logits = check_logits(logits)
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels: expected integer labels of shape {tuple(logits.shape[:-1])}, got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    axes = tuple(range(p.ndim - 1))
    num, den = jnp.sum(1.0 - p, axis=axes), jnp.sum(p, axis=axes)
    if axis_name is not None:
        num, den = jax.lax.psum((num, den), axis_name)
    w = jax.lax.stop_gradient(num / den)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    wv = jnp.where(valid, w[safe], 0.0)
    total, weight = jnp.sum(wv * nll), jnp.sum(wv)
    if axis_name is not None:
        total, weight = jax.lax.psum((total, weight), axis_name)
    return total / jnp.where(weight > 0, weight, 1.0)
