"""MedicalZoo's losses: its Dice, generalized Dice, BCE + Dice and weighted cross-entropy.

Closed forms on hand-sized inputs (probabilities chosen through ``logits = log p``) and, where
torch has the same operation, torch itself (``BCEWithLogitsLoss``, weighted ``cross_entropy``).
"""

import numpy as np
import pytest

from medjax import losses
from tests.conftest import require_reference

# Two voxels, two classes, probabilities (0.8, 0.2) and (0.4, 0.6); labels 0 and 1. As a batch of
# two one-voxel samples, so that "pooled over the batch" is exercised.
P = np.array([[[0.8, 0.2]], [[0.4, 0.6]]], np.float32)  # (B=2, S=1, C=2)
LABELS = np.array([[0], [1]], np.int32)


def test_zoo_dice_closed_form_softmax_and_sigmoid():
    # class 0: 2 * 0.8 / (0.8^2 + 0.4^2 + 1); class 1: 2 * 0.6 / (0.2^2 + 0.6^2 + 1)
    want = 1 - (1.6 / 1.8 + 1.2 / 1.4) / 2
    got = losses.soft_dice_loss(np.log(P), LABELS, squared=True, eps=1e-6, reduction="batch")
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # The original's sigmoid: per-channel probabilities q = sigmoid(logits).
    logits = np.array([[[1.0, -2.0]], [[0.5, 0.0]]], np.float32)
    q = 1 / (1 + np.exp(-logits[:, 0]))
    d0 = 2 * q[0, 0] / (q[0, 0] ** 2 + q[1, 0] ** 2 + 1)
    d1 = 2 * q[1, 1] / (q[0, 1] ** 2 + q[1, 1] ** 2 + 1)
    got = losses.soft_dice_loss(logits, LABELS, activation="sigmoid", squared=True, eps=1e-6)
    np.testing.assert_allclose(float(got), 1 - (d0 + d1) / 2, rtol=1e-6)


def test_zoo_dice_denominator_clamped_not_nan():
    # An absent class predicted nowhere (sigmoid of -inf-like logits): 0 / max(0, 1e-6) = 0.
    logits = np.array([[[30.0, -1e4]]], np.float32)
    got = losses.soft_dice_loss(
        logits, np.array([[0]], np.int32), activation="sigmoid", squared=True, eps=1e-6
    )
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), 1 - (1.0 + 0.0) / 2, atol=1e-6)


def test_generalized_dice_closed_form():
    # w_c = 1 / (sum y_c)^2 = 1 for both classes; 1 - 2 (0.8 + 0.6) / ((1.2 + 1) + (0.8 + 1))
    got = losses.generalized_dice_loss(np.log(P), LABELS, eps=1e-6)
    np.testing.assert_allclose(float(got), 1 - 2 * 1.4 / 4.0, rtol=1e-6)


def test_bce_dice_closed_form_and_torch():
    logits = np.log(P)
    y = np.eye(2, dtype=np.float32)[LABELS]
    bce = np.mean(np.logaddexp(0, logits) - logits * y)
    dice = 1 - (1.6 / 1.8 + 1.2 / 1.4) / 2
    got = losses.bce_dice_loss(logits, LABELS, alpha=0.3, beta=2.0)
    np.testing.assert_allclose(float(got), 0.3 * bce + 2.0 * dice, rtol=1e-6)
    torch = require_reference("torch")
    want = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits), torch.from_numpy(y))
    np.testing.assert_allclose(
        float(losses.binary_cross_entropy(logits, LABELS)), float(want), 1e-6
    )


def test_weighted_cross_entropy_closed_form_and_torch():
    logits = np.log(P)
    # w_c = sum(1 - p_c) / sum(p_c): class 0 (0.2 + 0.6) / 1.2, class 1 (0.8 + 0.4) / 0.8
    w = np.array([0.8 / 1.2, 1.2 / 0.8])
    want = (w[0] * -np.log(0.8) + w[1] * -np.log(0.6)) / (w[0] + w[1])
    np.testing.assert_allclose(float(losses.weighted_cross_entropy(logits, LABELS)), want, 1e-6)
    torch = require_reference("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    lab = rng.integers(-1, 3, size=(2, 3, 4)).astype(np.int32)  # -1: ignored
    tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    p = torch.softmax(tx, 1).transpose(0, 1).reshape(3, -1)
    weight = (1 - p).sum(-1) / p.sum(-1)
    ref = torch.nn.functional.cross_entropy(
        tx, torch.from_numpy(lab).long(), weight=weight, ignore_index=-1
    )
    np.testing.assert_allclose(float(losses.weighted_cross_entropy(x, lab)), float(ref), 1e-5)


def test_weighted_cross_entropy_refuses_one_hot():
    with pytest.raises(ValueError, match="labels: expected integer labels"):
        losses.weighted_cross_entropy(np.log(P), np.eye(2, dtype=np.float32)[LABELS])
