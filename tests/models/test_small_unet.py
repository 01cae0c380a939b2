"""SmallUNet: unchanged at its defaults (parameter tree and outputs), and the optional norm."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.small_unet import SmallUNet
from medjax.nn.norm import BatchNorm
from medjax.ops import resize


class _ReferenceUNet(nn.Module):
    """SmallUNet as it was before the ``norm`` field (three levels, conv + ReLU, linear upsampling)."""

    features: int = 16
    out_channels: int = 1
    levels: int = 3

    @nn.compact
    def __call__(self, x):
        n = x.ndim - 2

        def block(h, f):
            for _ in range(2):
                h = nn.relu(nn.Conv(f, (3,) * n)(h))
            return h

        skips, h = [], x
        for level in range(self.levels - 1):
            h = block(h, self.features * 2**level)
            skips.append(h)
            h = nn.max_pool(h, (2,) * n, (2,) * n)
        h = block(h, self.features * 2 ** (self.levels - 1))
        for level in reversed(range(self.levels - 1)):
            h = block(jnp.concatenate([resize(h, 2), skips[level]], -1), self.features * 2**level)
        return nn.Conv(self.out_channels, (1,) * n)(h)


def test_defaults_keep_the_parameter_tree_and_outputs():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    ref = _ReferenceUNet(4, out_channels=3)
    net = SmallUNet(4, out_channels=3)
    v_ref = ref.init(jax.random.key(0), x)
    v = net.init(jax.random.key(0), x)
    assert set(v) == {"params"}  # no batch_stats collection at the defaults
    shapes = jax.tree.map(np.shape, v)
    assert shapes == jax.tree.map(np.shape, v_ref)
    jax.tree.map(np.testing.assert_array_equal, v, v_ref)
    np.testing.assert_array_equal(net.apply(v, x), ref.apply(v_ref, x))
    np.testing.assert_array_equal(net.apply(v, x, train=True), ref.apply(v_ref, x))


def test_batch_norm_option_trains_statistics_and_syncs_under_pmap():
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    net = SmallUNet(2, out_channels=2, levels=2, norm="batch")
    v = net.init(jax.random.key(0), x)
    assert set(v) == {"params", "batch_stats"}
    assert len(v["batch_stats"]) == 6  # one BatchNorm per 3x3 conv (3 blocks of 2)
    convs = [k for k in v["params"] if k.startswith("Conv_")]
    assert [("bias" in v["params"][k]) for k in convs] == [False] * 6 + [True]  # only the head
    y, upd = net.apply(v, x, train=True, mutable=["batch_stats"])
    assert y.shape == (4, 8, 8, 2)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved))
    # eval uses the running statistics: a different function of x than training mode
    assert not np.allclose(net.apply(v, x), y)
    # an injected factory with axis_name: synchronised statistics over a pmap axis of 1 device
    synced = SmallUNet(
        2, out_channels=2, levels=2, norm=functools.partial(BatchNorm, axis_name="d")
    )
    out = jax.pmap(
        lambda v, x: synced.apply(v, x, train=True, mutable=["batch_stats"])[0], axis_name="d"
    )(jax.tree.map(lambda a: a[None], v), x[None])
    np.testing.assert_allclose(out[0], y, rtol=1e-5, atol=1e-6)
