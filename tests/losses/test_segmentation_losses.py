"""Segmentation losses against NumPy-loop references, finite differences and torch/MONAI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from medjax import losses
from tests.conftest import require_reference

B, H, W, C = 2, 4, 3, 3


def _data(seed=0, shape=(B, H, W, C)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    return logits, labels


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _onehot(labels, c):
    out = np.zeros(labels.shape + (c,), np.float64)
    for idx in np.ndindex(labels.shape):
        out[idx + (labels[idx],)] = 1.0
    return out


def _voxels(shape):
    return list(np.ndindex(shape[1:-1]))


def ref_soft_dice(logits, labels, squared, eps, include_background, reduction, weights, act):
    p = _softmax(logits.astype(np.float64)) if act == "softmax" else 1 / (1 + np.exp(-logits))
    y = _onehot(labels, logits.shape[-1])
    classes = range(0 if include_background else 1, logits.shape[-1])
    groups = [list(range(logits.shape[0]))] if reduction == "batch" else [[b] for b in range(B)]
    per_group = []
    for g in groups:
        losses_c, ws = [], []
        for c in classes:
            inter = den_p = den_y = 0.0
            for b in g:
                for v in _voxels(logits.shape):
                    pv, yv = p[(b, *v, c)], y[(b, *v, c)]
                    inter += pv * yv
                    den_p += pv * pv if squared else pv
                    den_y += yv * yv if squared else yv
            losses_c.append(1 - 2 * inter / max(den_p + den_y, eps))
            ws.append(1.0 if weights is None else weights[c])
        per_group.append(np.dot(losses_c, ws) / np.sum(ws))
    return np.mean(per_group)


@pytest.mark.parametrize(
    "squared,include_background,reduction,weighted",
    [
        (False, True, "batch", False),
        (True, True, "sample", False),
        (False, False, "sample", True),
        (True, False, "batch", True),
    ],
)
def test_soft_dice_matches_loop(squared, include_background, reduction, weighted):
    logits, labels = _data(1)
    weights = [0.5, 2.0, 1.0] if weighted else None
    got = losses.soft_dice_loss(
        logits,
        labels,
        squared=squared,
        include_background=include_background,
        reduction=reduction,
        class_weights=weights,
    )
    want = ref_soft_dice(
        logits, labels, squared, 1e-5, include_background, reduction, weights, "softmax"
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_soft_dice_sigmoid_and_onehot_target_equal_integer_target():
    logits, labels = _data(2)
    onehot = _onehot(labels, C).astype(np.float32)
    a = losses.soft_dice_loss(logits, labels, activation="sigmoid", squared=True, eps=1e-6)
    b = losses.soft_dice_loss(logits, onehot, activation="sigmoid", squared=True, eps=1e-6)
    want = ref_soft_dice(logits, labels, True, 1e-6, True, "batch", None, "sigmoid")
    np.testing.assert_allclose(float(a), want, rtol=1e-5)
    np.testing.assert_allclose(float(b), want, rtol=1e-5)


def test_soft_dice_pnp_adanet_denominator():
    # PnP-AdaNet: 1 - mean_c 2 sum(p y) / (sum p^2 + sum y), batch-pooled, background included.
    logits, labels = _data(3)
    p = _softmax(logits.astype(np.float64))
    y = _onehot(labels, C)
    dice = [
        2 * (p[..., c] * y[..., c]).sum() / ((p[..., c] ** 2).sum() + y[..., c].sum())
        for c in range(C)
    ]
    want = 1 - np.mean(dice)
    got = losses.soft_dice_loss(logits, labels, squared=True)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_soft_dice_perfect_prediction_is_zero_and_closed_form():
    labels = np.array([[[0, 1], [1, 2]]], np.int32)
    logits = 50.0 * _onehot(labels, 3).astype(np.float32)
    assert float(losses.soft_dice_loss(logits, labels)) == pytest.approx(0.0, abs=1e-6)
    # activation "none" with hand-made probabilities: class 0 p=[.5,.5,0,0], y=[1,0,0,0]
    probs = np.zeros((1, 2, 2, 2), np.float32)
    probs[0, 0, 0] = [0.5, 0.5]
    probs[0, 0, 1] = [0.5, 0.5]
    probs[0, 1, 0] = [0.0, 1.0]
    probs[0, 1, 1] = [0.0, 1.0]
    lab = np.array([[[0, 1], [1, 1]]], np.int32)
    # class0: I=.5, D=1+1=2 -> .5 ; class1: I=.5+1+1=2.5, D=3+3=6 -> 5/6
    want = 1 - (0.5 + 5 / 6) / 2
    got = losses.soft_dice_loss(probs, lab, activation="none")
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_soft_dice_matches_monai_diceloss():
    torch = require_reference("torch")
    monai = require_reference("monai")
    logits, labels = _data(4, (2, 5, 4, 3, 3))
    eps = 1e-5
    ref = monai.losses.DiceLoss(
        softmax=True, to_onehot_y=True, batch=True, squared_pred=True, smooth_nr=0.0, smooth_dr=eps
    )
    want = ref(
        torch.from_numpy(np.moveaxis(logits, -1, 1)),
        torch.from_numpy(labels[:, None].astype(np.int64)),
    ).item()
    got = losses.soft_dice_loss(logits, labels, squared=True, eps=eps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_generalized_dice_matches_loop():
    logits, labels = _data(5)
    labels[:, 0, 0] = 1  # keep class 1 present; make class 2 absent
    labels[labels == 2] = 0
    p = _softmax(logits.astype(np.float64))
    y = _onehot(labels, C)
    eps = 1e-5
    num = den = 0.0
    for c in range(C):
        ysum = sum(y[(b, *v, c)] for b in range(B) for v in _voxels(logits.shape))
        w = 1 / max(ysum**2, eps)
        for b in range(B):
            for v in _voxels(logits.shape):
                num += w * p[(b, *v, c)] * y[(b, *v, c)]
                den += w * (p[(b, *v, c)] + y[(b, *v, c)])
    want = 1 - 2 * num / den
    got = losses.generalized_dice_loss(logits, labels, eps=eps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _ref_ce(logits, labels, weights=None, mask=None):
    logp = np.log(_softmax(logits.astype(np.float64)))
    tot = cnt = 0.0
    for idx in np.ndindex(labels.shape):
        m = 1.0 if mask is None else mask[idx]
        w = 1.0 if weights is None else weights[labels[idx]]
        tot += -m * w * logp[idx + (labels[idx],)]
        cnt += m
    return tot / cnt


def test_cross_entropy_plain_matches_torch_and_loop():
    logits, labels = _data(6)
    got = float(losses.cross_entropy(logits, labels))
    np.testing.assert_allclose(got, _ref_ce(logits, labels), rtol=1e-5)
    torch = require_reference("torch")
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(np.moveaxis(logits, -1, 1)), torch.from_numpy(labels.astype(np.int64))
    ).item()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cross_entropy_fixed_weights_and_mask():
    logits, labels = _data(7)
    mask = (np.random.default_rng(0).random(labels.shape) > 0.4).astype(np.float32)
    w = [0.2, 1.0, 3.0]
    got = losses.cross_entropy(logits, labels, class_weights=w, mask=mask)
    np.testing.assert_allclose(float(got), _ref_ce(logits, labels, w, mask), rtol=1e-5)


def test_cross_entropy_batch_inverse_frequency():
    logits, labels = _data(8)
    counts = np.array([(labels == c).sum() for c in range(C)], np.float64)
    w = 1 - counts / labels.size
    got = losses.cross_entropy(logits, labels, class_weights="batch_inverse_frequency")
    np.testing.assert_allclose(float(got), _ref_ce(logits, labels, w), rtol=1e-5)


def test_pnp_losses_over_a_device_axis_are_the_global_batch_losses():
    """Split over a named axis (vmap stands in for pmap): the batch-frequency weights and the
    batch-pooled Dice see the whole batch, so the shards' mean loss and mean gradient (what a pmap
    step's pmean gives) are the loss and gradient of the unsplit batch."""
    logits, labels = _data(10)
    b = logits.shape[0]
    assert b % 2 == 0

    def loss(lg, lb, axis_name=None):
        ce = losses.cross_entropy(
            lg, lb, class_weights="batch_inverse_frequency", prob_floor=0.005, axis_name=axis_name
        )
        dice = losses.soft_dice_loss(lg, lb, squared=True, axis_name=axis_name)
        return ce + dice

    shards = (
        logits.reshape(2, b // 2, *logits.shape[1:]),
        labels.reshape(2, b // 2, *labels.shape[1:]),
    )
    per = jax.vmap(jax.value_and_grad(lambda lg, lb: loss(lg, lb, "dev")), axis_name="dev")
    values, grads = per(*shards)
    full, full_grad = jax.value_and_grad(loss)(logits, labels)
    np.testing.assert_allclose(float(np.mean(values)), float(full), rtol=1e-5)
    # each shard's gradient (here with respect to its own logits) is n = 2 times its share of the
    # global one (psum's transpose sums the shards' cotangents), so that pmean over parameter
    # gradients, sum_i (n g_i) / n, is the global gradient
    got = np.asarray(grads).reshape(full_grad.shape) / 2
    np.testing.assert_allclose(got, np.asarray(full_grad), rtol=1e-4, atol=1e-7)
    # without the axis, the shards' weights and Dice are their own: not the global loss
    local = jax.vmap(loss)(*shards)
    assert not np.allclose(np.asarray(local).mean(), float(full), rtol=1e-5)


def test_cross_entropy_probability_floor():
    """PnP-AdaNet's log(clip(softmax, 0.005, 1)): a NumPy loop, and no gradient below the floor."""
    logits, labels = _data(9)
    logits = logits * 4.0  # some true-class probabilities fall below the floor
    p = np.clip(_softmax(logits.astype(np.float64)), 0.05, 1.0)
    w = np.array([0.5, 1.0, 2.0])
    want = np.mean([-w[labels[i]] * np.log(p[i + (labels[i],)]) for i in np.ndindex(labels.shape)])
    got = losses.cross_entropy(logits, labels, class_weights=w, prob_floor=0.05)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    true_p = np.take_along_axis(_softmax(logits), labels[..., None], -1)[..., 0]
    assert (true_p < 0.05).any()
    grads = jax.grad(lambda x: losses.cross_entropy(x, labels, prob_floor=0.05))(logits)
    np.testing.assert_array_equal(np.asarray(grads)[true_p < 0.05], 0.0)
    with pytest.raises(ValueError, match="prob_floor"):
        losses.cross_entropy(logits, labels, prob_floor=1.5)


def test_soft_cross_entropy_mask_and_teacher_logits():
    logits, _ = _data(9)
    teacher_logits, _ = _data(10)
    q = _softmax(teacher_logits.astype(np.float64))
    logp = np.log(_softmax(logits.astype(np.float64)))
    mask = np.zeros(logits.shape[:-1], np.float32)
    mask[0, 1:3] = 1
    mask[1, 0, 0] = 1
    want = sum(-(q[i] * logp[i]).sum() for i in np.ndindex(mask.shape) if mask[i]) / mask.sum()
    got_p = losses.soft_cross_entropy(logits, q.astype(np.float32), mask=mask)
    got_l = losses.soft_cross_entropy(logits, teacher_logits, teacher_logits=True, mask=mask)
    np.testing.assert_allclose(float(got_p), want, rtol=1e-5)
    np.testing.assert_allclose(float(got_l), want, rtol=1e-5)
    # the teacher receives no gradient
    g = jax.jit(jax.grad(lambda t: losses.soft_cross_entropy(logits, t, teacher_logits=True)))(
        jnp.asarray(teacher_logits)
    )
    assert float(jnp.abs(g).max()) == 0.0
    # an empty mask gives 0
    assert float(losses.soft_cross_entropy(logits, q, mask=np.zeros_like(mask))) == 0.0


def test_focal_loss_matches_loop():
    logits, labels = _data(11)
    alpha = [0.25, 1.0, 2.0]
    presence = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
    gamma = 2.0
    p = _softmax(logits.astype(np.float64))
    tot = 0.0
    for idx in np.ndindex(labels.shape):
        c = labels[idx]
        pt = p[idx + (c,)]
        tot += -alpha[c] * presence[idx[0], c] * (1 - pt) ** gamma * np.log(pt)
    want = tot / labels.size
    got = losses.focal_loss(logits, labels, gamma=gamma, alpha=alpha, presence=presence)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # gamma = 0 and no alpha reduces to cross-entropy
    np.testing.assert_allclose(
        float(losses.focal_loss(logits, labels, gamma=0.0)),
        float(losses.cross_entropy(logits, labels)),
        rtol=1e-6,
    )


def _ref_tversky(logits, labels, presence, lo=0.2, hi=0.8, eps=1e-5):
    p = _softmax(logits.astype(np.float64))
    y = _onehot(labels, C)
    num = den = 0.0
    for b in range(B):
        for c in range(C):
            tp = fp = fn = 0.0
            for v in _voxels(logits.shape):
                pv, yv = p[(b, *v, c)], y[(b, *v, c)]
                tp += pv * yv
                fp += pv * (1 - yv)
                fn += (1 - pv) * yv
            a = min(max(fp / (fp + fn), lo), hi)
            t = (tp + eps) / (tp + a * fp + (1 - a) * fn + eps)
            num += presence[b, c] * (1 - t)
            den += presence[b, c]
    return num / den


def test_adaptive_tversky_matches_loop():
    logits, labels = _data(12)
    logits[0, ..., 2] += 3.0  # many false positives for class 2 in sample 0 -> alpha clamps at 0.8
    presence = np.array([[1, 1, 1], [1, 0, 1]], np.float32)
    got = losses.adaptive_tversky_loss(logits, labels, presence=presence)
    np.testing.assert_allclose(float(got), _ref_tversky(logits, labels, presence), rtol=1e-5)


def test_adaptive_tversky_alpha_is_stop_gradient():
    logits, labels = _data(13)
    presence = np.ones((B, C), np.float32)
    y = jax.nn.one_hot(labels, C)

    def frozen(lg, alpha):  # Tversky with alpha held fixed: its gradient is the expected one
        p = jax.nn.softmax(lg, -1)
        tp = (p * y).sum((1, 2))
        fp = (p * (1 - y)).sum((1, 2))
        fn = ((1 - p) * y).sum((1, 2))
        return jnp.mean(1 - (tp + 1e-5) / (tp + alpha * fp + (1 - alpha) * fn + 1e-5))

    p = jax.nn.softmax(jnp.asarray(logits), -1)
    fp = (p * (1 - y)).sum((1, 2))
    fn = ((1 - p) * y).sum((1, 2))
    alpha = jnp.clip(fp / (fp + fn), 0.2, 0.8)
    g = jax.jit(jax.grad(lambda lg: losses.adaptive_tversky_loss(lg, labels, presence=presence)))(
        jnp.asarray(logits)
    )
    want = jax.jit(jax.grad(lambda lg: frozen(lg, alpha)))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-7)


def test_dice_ce_is_sum_of_parts():
    logits, labels = _data(14)
    got = losses.dice_ce_loss(
        logits,
        labels,
        dice_weight=0.7,
        ce_weight=1.3,
        ce_class_weights="batch_inverse_frequency",
        squared=True,
    )
    want = 1.3 * float(
        losses.cross_entropy(logits, labels, class_weights="batch_inverse_frequency")
    ) + 0.7 * float(losses.soft_dice_loss(logits, labels, squared=True))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda lg, lb: losses.soft_dice_loss(lg, lb),
        lambda lg, lb: losses.generalized_dice_loss(lg, lb),
        lambda lg, lb: losses.cross_entropy(lg, lb, class_weights=[1.0, 2.0, 0.5]),
        lambda lg, lb: losses.focal_loss(lg, lb, gamma=2.0),
    ],
)
def test_gradients_match_finite_differences(fn):
    logits, labels = _data(15, (1, 3, 2, 3))
    check_grads(
        jax.jit(lambda lg: fn(lg, labels)),
        (jnp.asarray(logits),),
        order=1,
        modes=["rev"],
        atol=2e-2,
        rtol=2e-2,
    )


def test_validation_errors():
    logits, labels = _data(16)
    with pytest.raises(ValueError, match="target"):
        losses.soft_dice_loss(logits, labels[:, :2])
    with pytest.raises(ValueError, match="target"):
        losses.soft_dice_loss(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match="activation"):
        losses.soft_dice_loss(logits, labels, activation="tanh")
    with pytest.raises(ValueError, match="reduction"):
        losses.soft_dice_loss(logits, labels, reduction="mean")
    with pytest.raises(ValueError, match="class_weights"):
        losses.cross_entropy(logits, labels, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="class_weights"):
        losses.cross_entropy(logits, labels, class_weights="inverse")
    with pytest.raises(ValueError, match="mask"):
        losses.cross_entropy(logits, labels, mask=np.ones((B, H)))
    with pytest.raises(ValueError, match="presence"):
        losses.adaptive_tversky_loss(logits, labels, presence=np.ones((B, C + 1)))
    with pytest.raises(ValueError, match="teacher"):
        losses.soft_cross_entropy(logits, logits[..., :2])
    with pytest.raises(ValueError, match="logits"):
        losses.cross_entropy(np.ones((3, 2)), np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="labels"):
        losses.cross_entropy(logits, np.full(labels.shape, C, np.int32))


def test_focal_gradient_finite_for_saturated_logits():
    logits = jnp.array([[[100.0, 0.0], [0.0, 100.0]]])
    labels = jnp.array([[0, 1]])
    for gamma in (0.0, 2.0):
        g = jax.grad(lambda x, gm=gamma: losses.focal_loss(x, labels, gamma=gm))(logits)
        assert np.all(np.isfinite(np.asarray(g)))
