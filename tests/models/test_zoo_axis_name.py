"""The MedicalZoo networks with BatchNorm take ``axis_name`` for synchronised statistics under pmap.

Without it (the default) each network is unchanged: the same parameter and statistics trees. With
it, every BatchNorm the network calls gets that axis name (recorded while tracing ``init`` with
``jax.eval_shape``, so nothing is computed), and one small network trained under ``jax.vmap``
with that axis name equals the same network on the whole batch. The engine's 8-device and pmap
runs of a whole training step are in ``tests/experiments/test_medicalzoo.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import registry
from medjax.nn.norm import BatchNorm

#: registry name -> a small input that runs (channels-last)
BN_NETWORKS = {
    "vnet": (1, 16, 16, 16, 2),
    "vnetlight": (1, 8, 8, 8, 2),
    "singlepathdensenet": (1, 2, 2, 2, 2),
    "dualpathdensenet": (1, 2, 2, 2, 3),
    "dualsingledensenet": (1, 2, 2, 2, 2),
    "hyperdensenet_2mod": (1, 19, 19, 19, 2),
    "hyperdensenet": (1, 19, 19, 19, 3),
    "skipdensenet3d": (1, 16, 16, 16, 2),
    "densevoxelnet": (1, 4, 4, 4, 2),
    "resnetmed3d": (1, 8, 8, 8, 2),
    "highresnet3d": (1, 2, 2, 2, 2),
    "unet": (1, 16, 16, 2),
}


def _trace(name, **kw):
    """(variables shape tree, axis names seen by BatchNorm calls) of ``init`` on the small input."""
    e = registry.entry(name)
    model = e.load()(**{**e.defaults, **kw})
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
            seen.append(context.module.axis_name)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct(BN_NETWORKS[name], jnp.float32)
    with nn.intercept_methods(spy):
        shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: (s.shape, s.dtype), shapes), seen


@pytest.mark.parametrize("name", sorted(BN_NETWORKS))
def test_axis_name_reaches_every_batch_norm_and_keeps_the_tree(name):
    plain, seen_plain = _trace(name)
    synced, seen = _trace(name, axis_name="batch")
    assert seen_plain and set(seen_plain) == {None}
    assert len(seen) == len(seen_plain) and set(seen) == {"batch"}
    assert jax.tree.structure(plain) == jax.tree.structure(synced)
    assert jax.tree.leaves(plain) == jax.tree.leaves(synced)


def test_synchronised_statistics_under_vmap_equal_the_whole_batch():
    e = registry.entry("highresnet3d")
    plain = e.load()(in_channels=2, num_classes=3, dropout_rate=0.0)
    synced = e.load()(in_channels=2, num_classes=3, dropout_rate=0.0, axis_name="batch")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 4, 4, 2)), jnp.float32)
    v = plain.init(jax.random.key(0), x[:1])

    def run(model, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    want, want_stats = run(plain, x)
    # one sample per vmapped "device": statistics are pmean-ed over the axis
    got, got_stats = jax.vmap(lambda xi: run(synced, xi[None]), axis_name="batch")(x)
    np.testing.assert_allclose(np.asarray(got)[:, 0], np.asarray(want), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b), rtol=1e-4, atol=1e-6)
