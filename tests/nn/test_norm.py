"""medjax.nn.norm against torch.nn: BatchNorm (train/eval, running statistics), InstanceNorm, GroupNorm."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.nn import norm as mnorm
from tests.conftest import require_reference


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, size=shape).astype(np.float32)


def _to_torch(x):
    torch = require_reference("torch")
    return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def _from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.mark.reference
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("unbiased", [True, False])
def test_batchnorm_train_eval_and_running_stats_match_torch(ndim, unbiased):
    torch = require_reference("torch")
    shape = (3,) + (5,) * ndim + (4,)
    xs = [_x(shape, s) for s in range(3)]
    tbn = (torch.nn.BatchNorm2d if ndim == 2 else torch.nn.BatchNorm3d)(4, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
        tbn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    bn = mnorm.BatchNorm(momentum=0.9, epsilon=1e-5, unbiased_running_var=unbiased)
    variables = bn.init(jax.random.key(0), xs[0])
    variables = {
        "params": {
            "scale": jnp.asarray([0.5, 1.0, 2.0, -1.0]),
            "bias": jnp.asarray([0.1, -0.2, 0.3, 0.0]),
        },
        "batch_stats": variables["batch_stats"],
    }
    tbn.train()
    for x in xs:
        y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **upd}
        ty = tbn(_to_torch(x))
        chex.assert_trees_all_close(np.asarray(y), _from_torch(ty), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
        np.asarray(variables["batch_stats"]["mean"]), tbn.running_mean.numpy(), atol=1e-5
    )
    if unbiased:  # torch's convention
        chex.assert_trees_all_close(
            np.asarray(variables["batch_stats"]["var"]), tbn.running_var.numpy(), rtol=1e-5
        )
    else:  # biased: a NumPy recurrence of the biased batch variances
        ref = np.ones(4)
        for x in xs:
            ref = 0.9 * ref + 0.1 * x.reshape(-1, 4).var(axis=0)
        chex.assert_trees_all_close(np.asarray(variables["batch_stats"]["var"]), ref, rtol=1e-5)
    if unbiased:
        tbn.eval()
        y = bn.apply(variables, xs[0], train=False)
        chex.assert_trees_all_close(np.asarray(y), _from_torch(tbn(_to_torch(xs[0]))), atol=1e-5)


def test_batchnorm_axis_name_averages_statistics_over_devices():
    """Under vmap with an axis name, statistics pool over the mapped axis (synchronised BN)."""
    x = _x((4, 2, 6, 6, 3))  # 4 "devices" of batch 2
    bn = mnorm.BatchNorm(axis_name="d")
    v = bn.init(jax.random.key(0), x[0])
    y, upd = jax.vmap(
        lambda xi: bn.apply(v, xi, train=True, mutable=["batch_stats"]), axis_name="d"
    )(x)
    whole, upd1 = mnorm.BatchNorm().apply(
        v, x.reshape(8, 6, 6, 3), train=True, mutable=["batch_stats"]
    )
    chex.assert_trees_all_close(np.asarray(y).reshape(8, 6, 6, 3), np.asarray(whole), atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], upd), upd1, atol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("affine", [False, True])
def test_instancenorm_matches_torch_in_train_and_eval(affine):
    torch = require_reference("torch")
    x = _x((2, 4, 5, 6, 3))
    tin = torch.nn.InstanceNorm3d(3, affine=affine)
    norm = mnorm.InstanceNorm(affine=affine)
    v = norm.init(jax.random.key(0), x)
    if affine:
        w = np.asarray([0.5, 2.0, -1.0], np.float32)
        b = np.asarray([0.1, 0.0, -0.3], np.float32)
        with torch.no_grad():
            tin.weight.copy_(torch.from_numpy(w))
            tin.bias.copy_(torch.from_numpy(b))
        v = {"params": {"scale": jnp.asarray(w), "bias": jnp.asarray(b)}}
    for train in (True, False):
        tin.train(train)
        chex.assert_trees_all_close(
            np.asarray(norm.apply(v, x, train=train)), _from_torch(tin(_to_torch(x))), atol=1e-5
        )


def test_instancenorm_refuses_a_single_spatial_element():
    x = jnp.ones((1, 1, 1, 1, 8))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        mnorm.InstanceNorm().init(jax.random.key(0), x)


@pytest.mark.reference
@pytest.mark.parametrize("ndim", [2, 3])
def test_groupnorm_matches_torch(ndim):
    torch = require_reference("torch")
    x = _x((2,) + (4,) * ndim + (16,))
    tgn = torch.nn.GroupNorm(8, 16, eps=1e-5)
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    with torch.no_grad():
        tgn.weight.copy_(torch.from_numpy(w))
        tgn.bias.copy_(torch.from_numpy(b))
    v = {"params": {"scale": jnp.asarray(w), "bias": jnp.asarray(b)}}
    y = mnorm.GroupNorm(8).apply(v, x)
    chex.assert_trees_all_close(np.asarray(y), _from_torch(tgn(_to_torch(x))), atol=1e-5)


def test_groupnorm_refuses_indivisible_channels():
    with pytest.raises(ValueError, match="divisible by num_groups=8"):
        mnorm.GroupNorm(8).init(jax.random.key(0), jnp.ones((1, 4, 4, 12)))


def test_make_norm_by_name_partial_and_unknown():
    assert mnorm.make_norm("BN") is mnorm.BatchNorm
    assert mnorm.make_norm(None) is mnorm.NoNorm
    f = mnorm.make_norm("group", num_groups=4)
    assert isinstance(f(), mnorm.GroupNorm) and f().num_groups == 4
    p = functools.partial(mnorm.BatchNorm, momentum=0.99)
    assert mnorm.make_norm(p)().momentum == 0.99
    with pytest.raises(ValueError, match="expected one of"):
        mnorm.make_norm("layer")
    x = jnp.arange(8.0).reshape(1, 2, 2, 2)
    assert np.array_equal(mnorm.NoNorm().apply({}, x, train=True), x)
