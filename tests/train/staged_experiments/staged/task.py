"""Staged toy experiment (see config.py): two stages, a warm start, a frozen network in the loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import medjax.train as mt
from medjax.train.transfer import copy_subtrees


class ToyIterator:
    """Batch ``i`` of ``y = x @ w + noise`` drawn from ``default_rng([seed, i])`` (resumable)."""

    def __init__(self, seed, batch_size, features, noise):
        self.seed, self.batch_size, self.features, self.noise = seed, batch_size, features, noise
        self.w = np.random.default_rng(1000).normal(size=(features, 1))
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        x = rng.normal(size=(self.batch_size, self.features)).astype(np.float32)
        y = (x @ self.w + self.noise * rng.normal(size=(self.batch_size, 1))).astype(np.float32)
        return {"x": x, "y": y}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


class _NoState:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)


class Experiment(mt.Experiment):
    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Dense(1)

        def loss_a(params, ms, batch, rng, rest):
            pred = self.model.apply({"params": params}, batch["x"])
            return jnp.mean((pred - batch["y"]) ** 2), ({}, ms)

        def loss_b(params, ms, batch, rng, rest):
            pred = self.model.apply({"params": params}, batch["x"])
            teacher = self.model.apply({"params": rest["a"].params}, batch["x"])
            fit = jnp.mean((pred - batch["y"]) ** 2)
            match = jnp.mean((pred - teacher) ** 2)
            return fit + config.distill * match, ({"match": match}, ms)

        self._step_a = mt.supervised_step(loss_a, key="a")
        self._step_b = mt.supervised_step(loss_b, key="b")

    def init_state(self, rng):
        key = jax.random.wrap_key_data(rng)
        x = jnp.zeros((1, self.config.features), jnp.float32)
        out = {}
        for i, (name, lr) in enumerate((("a", self.config.lr_a), ("b", self.config.lr_b))):
            params = self.model.init(jax.random.fold_in(key, i), x)["params"]
            out[name] = mt.TrainState.create(
                apply_fn=self.model.apply, params=params, tx=optax.sgd(lr), rng=rng
            )
        return out

    def train_iterator(self):
        c = self.config
        return ToyIterator(c.seed, c.batch_size, c.features, c.noise)

    def _finetune_iterator(self):
        c = self.config
        it = ToyIterator(c.seed + 1, c.batch_size, c.features, c.noise)
        return _NoState(it) if c.no_state_iterator else it

    def _enter_finetune(self, state):
        return copy_subtrees(state, state, {"b/params": "a/params"})

    def stages(self):
        s = self.config.stages
        return [
            mt.Stage("pretrain", int(s.pretrain.num_steps), self._step_a),
            mt.Stage(
                "finetune",
                int(s.finetune.num_steps),
                self._step_b,
                iterator=self._finetune_iterator,
                enter=self._enter_finetune,
            ),
        ]

    def evaluate(self, state, workdir):
        return {}
