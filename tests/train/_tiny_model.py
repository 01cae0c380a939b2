"""Shared tiny BatchNorm conv model, data and step for the multi-device / multi-process tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.train.optim import sgd
from medjax.train.state import TrainState
from medjax.train.steps import supervised_step

GLOBAL_BATCH = 8
SPATIAL = (6, 6, 6)
NUM_STEPS = 3


class TinyBNNet(nn.Module):
    """Conv3d -> BatchNorm (over the global batch) -> ReLU -> Conv3d 1x1x1."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
        return nn.Conv(2, (1, 1, 1))(nn.relu(x))


def data(step):
    """Global batch for ``step``: dict of float32 ``x (8, 6, 6, 6, 1)`` and ``y (8, 6, 6, 6, 2)``."""
    rng = np.random.default_rng(100 + step)
    x = rng.normal(size=(GLOBAL_BATCH, *SPATIAL, 1)).astype(np.float32)
    y = rng.normal(size=(GLOBAL_BATCH, *SPATIAL, 2)).astype(np.float32)
    return {"x": x, "y": y}


def init_state(axis_name=None):
    """State of TinyBNNet with SGD(momentum, weight decay); identical for every axis_name."""
    model = TinyBNNet(axis_name=None)
    v = model.init(jax.random.key(0), jnp.zeros((1, *SPATIAL, 1)), train=False)
    return TrainState.create(
        apply_fn=TinyBNNet(axis_name=axis_name).apply,
        params=v["params"],
        model_state={"batch_stats": v["batch_stats"]},
        tx=sgd(0.5, momentum=0.9, weight_decay=1e-3),
        rng=0,
    )


def make_step(axis_name=None):
    """Supervised MSE step; under pmap pass the pmap ``axis_name`` (BN and gradient pmean)."""
    model = TinyBNNet(axis_name=axis_name)

    def loss_fn(params, model_state, batch, rng, rest):
        out, upd = model.apply(
            {"params": params, **model_state}, batch["x"], train=True, mutable=["batch_stats"]
        )
        return jnp.mean((out - batch["y"]) ** 2), ({"out_mean": jnp.mean(out)}, upd)

    return supervised_step(loss_fn, axis_name=axis_name)


def to_numpy(tree):
    """Host copy of a (replicated, possibly multi-host) tree: the first addressable shard."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)
