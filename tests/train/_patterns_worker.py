"""Adversarial (WGAN, growing n_critic, clipping, frozen sub-tree) and co-training (EMA teachers)
steps on 1 device, on an 8-device mesh and under pmap; prints JSON results.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported.
"""

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.train.ema import ema_params, mean_teacher_decay
from medjax.train.mesh import make_mesh, replicate, shard_batch
from medjax.train.optim import adam, frozen, rmsprop
from medjax.train.state import TrainState
from medjax.train.steps import adversarial_step, compile_step, cotraining_step, ramp_weight

BATCH, FEATURES, STEPS = 8, 3, 3


class Generator(nn.Module):
    """An "adaptation" layer in front of a fixed head: only ``adapt`` trains (the DAM pattern)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(nn.tanh(nn.Dense(4, name="adapt")(x)))


def data(step):
    rng = np.random.default_rng(200 + step)
    return {
        "source": rng.normal(size=(BATCH, FEATURES)).astype(np.float32),
        "target": (1.5 + rng.normal(size=(BATCH, FEATURES))).astype(np.float32),
        "y": rng.integers(0, 2, BATCH).astype(np.int32),
    }


def adversarial(axis_name=None):
    gen, critic = Generator(), nn.Dense(1)
    x = jnp.zeros((1, FEATURES))
    gp = gen.init(jax.random.key(0), x)["params"]
    cp = critic.init(jax.random.key(1), jnp.zeros((1, 2)))["params"]
    trainable = {"adapt": jax.tree.map(lambda _: True, gp["adapt"])}
    trainable["head"] = jax.tree.map(lambda _: False, gp["head"])
    state = {
        "gen": TrainState.create(
            apply_fn=gen.apply, params=gp, tx=frozen(rmsprop(3e-3), trainable), rng=0
        ),
        "critic": TrainState.create(apply_fn=critic.apply, params=cp, tx=rmsprop(3e-3), rng=1),
    }

    def features(params, x):
        return gen.apply({"params": params}, x)

    def critic_loss(params, ms, g, batch, rng, rest):
        # WGAN critic: source features are "real", target features "fake". (No use of the key:
        # under pmap every device draws its own, so random losses would differ from 1 device.)
        real = critic.apply({"params": params}, features(g.params, batch["source"]))
        fake = critic.apply({"params": params}, features(g.params, batch["target"]))
        return -(jnp.mean(real) - jnp.mean(fake)), ({}, ms)

    def gen_loss(params, ms, c, batch, rng, rest):
        feats = features(params, batch["target"])
        return -jnp.mean(critic.apply({"params": c.params}, feats)), ({"feat": jnp.mean(feats)}, ms)

    step = adversarial_step(
        gen_loss, critic_loss, n_critic=lambda s: 2 + s, clip=0.05, axis_name=axis_name
    )
    return state, step


def cotraining(axis_name=None):
    net = nn.Dense(2)
    x = jnp.zeros((1, FEATURES))
    state = {
        name: TrainState.create(
            apply_fn=net.apply,
            params=net.init(jax.random.key(k), x)["params"],  # different initialisations
            tx=optax.chain(adam(1e-2), ema_params(mean_teacher_decay(0.9))),
            rng=k,
        )
        for k, name in enumerate(("a", "b"))
    }

    def loss_fn(params, ms, teacher, batch, rng, weight, rest):
        logits = net.apply({"params": params}, batch["source"])
        hard = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))
        soft_t = jax.nn.softmax(teacher.apply_fn({"params": teacher.params}, batch["source"]))
        soft = -jnp.mean(jnp.sum(soft_t * jax.nn.log_softmax(logits), -1))
        return hard + weight * soft, ({"soft": soft}, ms)

    step = cotraining_step(
        loss_fn, weight=lambda s: ramp_weight(s, max_weight=0.5, ramp_steps=2), axis_name=axis_name
    )
    return state, step


def _host(tree):
    return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def run_mesh(build, devices):
    mesh = make_mesh(devices)
    state, step = build()
    state = replicate(state, mesh)
    step = compile_step(step, mesh)
    losses = []
    for i in range(STEPS):
        state, m = step(state, shard_batch(data(i), mesh))
        losses.append(jax.tree.map(float, m))
    return losses, _host(jax.tree.map(lambda s: s.params, state, is_leaf=_is_state))


def _is_state(x):
    return isinstance(x, TrainState)


def run_pmap(build, n):
    state, step = build(axis_name="batch")
    state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)
    step = jax.pmap(step, axis_name="batch")
    losses = []
    for i in range(STEPS):
        b = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), data(i))
        state, m = step(state, b)
        losses.append(jax.tree.map(lambda v: float(v[0]), m))
    params = jax.tree.map(lambda s: s.params, state, is_leaf=_is_state)
    return losses, _host(jax.tree.map(lambda a: a[0], params))


def main():
    n = jax.device_count()
    out = {"devices": n}
    for name, build in (("adversarial", adversarial), ("cotraining", cotraining)):
        out[name] = {
            "one": run_mesh(build, jax.devices()[:1]),
            "mesh": run_mesh(build, jax.devices()),
            "pmap": run_pmap(build, n),
        }
    state, _ = adversarial()
    out["adversarial_init_gen"] = _host(state["gen"].params)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
