"""Toy experiment: a Dense layer fitting y = x @ w_true + noise from a counter-based iterator."""

import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import medjax.train as mt


class ToyIterator:
    """Batch ``i`` is drawn from ``default_rng([seed, i])``: resuming at ``i`` replays the same data."""

    def __init__(self, seed, batch_size, features, noise, nan_at_step=-1, sleep=0.0):
        self.seed, self.batch_size, self.features = seed, batch_size, features
        self.noise, self.nan_at_step, self.sleep = noise, nan_at_step, sleep
        self.index = 0
        self.w_true = np.random.default_rng(seed + 1000).normal(size=(features, 1))

    def __iter__(self):
        return self

    def __next__(self):
        if self.sleep:
            time.sleep(self.sleep)
        rng = np.random.default_rng([self.seed, self.index])
        n = self.batch_size // jax.process_count()
        x = rng.normal(size=(self.batch_size, self.features)).astype(np.float32)
        y = (x @ self.w_true + self.noise * rng.normal(size=(self.batch_size, 1))).astype(
            np.float32
        )
        if self.index == self.nan_at_step - 1:
            x[:] = np.nan
        self.index += 1
        lo = jax.process_index() * n
        return {"x": x[lo : lo + n], "y": y[lo : lo + n]}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


class Experiment(mt.Experiment):
    eval_metric = "val_loss"
    eval_mode = "min"

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Dense(1)
        self._validations = 0

        def loss_fn(params, model_state, batch, rng, rest):
            pred = self.model.apply({"params": params}, batch["x"])
            if config.step_noise:  # like dropout: the loss depends on the step's random key
                pred = pred + config.step_noise * jax.random.normal(rng, pred.shape)
            loss = jnp.mean((pred - batch["y"]) ** 2)
            return loss, ({"mae": jnp.mean(jnp.abs(pred - batch["y"]))}, model_state)

        self._step = mt.supervised_step(loss_fn)

    def init_state(self, rng):
        x = jnp.zeros((1, self.config.features), jnp.float32)
        params = self.model.init(jax.random.fold_in(jax.random.wrap_key_data(rng), 0), x)["params"]
        return mt.TrainState.create(
            apply_fn=self.model.apply,
            params=params,
            tx=mt.make_optimizer(self.config.optimizer),
            rng=rng,
        )

    def train_step(self, state, batch):
        return self._step(state, batch)

    def train_iterator(self):
        c = self.config
        if c.pipeline == "grain":
            from medjax.data.pipeline import FunctionSource, make_iterator

            w_true = ToyIterator(c.seed, 1, c.features, 0.0).w_true

            def record(i):
                x = np.random.default_rng([c.seed, 99, i]).normal(size=c.features)
                return {"x": x.astype(np.float32), "y": (x @ w_true).astype(np.float32)}

            def add_noise(rec, rng):
                return {**rec, "y": rec["y"] + np.float32(c.noise * rng.normal())}

            source = FunctionSource(64, record)
            return make_iterator(source, batch_size=c.batch_size, seed=c.seed, transform=add_noise)
        return ToyIterator(
            c.seed, c.batch_size, c.features, c.noise, c.nan_at_step, c.sleep_per_batch
        )

    def _val_loss(self, state):
        it = ToyIterator(self.config.seed + 7, 64, self.config.features, 0.0)
        batch = next(it)
        params = jax.device_get(state.params)
        pred = batch["x"] @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
        return float(np.mean((pred - batch["y"]) ** 2))

    def validate(self, state):
        values = tuple(self.config.val_values)
        if values:
            step = int(jax.device_get(state.step))
            k = step // self.config.eval_every - 1
            return {"val_loss": float(values[k % len(values)])}
        return {"val_loss": self._val_loss(state)}

    def evaluate(self, state, workdir):
        loss = self._val_loss(state)
        (pathlib.Path(workdir) / "toy_eval.txt").write_text(f"{loss}\n")
        out = {"val_loss": loss, "step": int(jax.device_get(state.step))}
        if "eval" in self.config:
            out["val_loss_scaled"] = loss * float(self.config.eval.scale)
        return out

    def predict(self, state, inputs, out_dir):
        import nibabel as nib

        params = jax.device_get(state.params)
        w = float(np.asarray(params["kernel"]).sum())
        b = float(np.asarray(params["bias"])[0])
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for path in inputs:
            img = nib.load(str(path))
            pred = (np.asarray(img.dataobj, np.float32) * w + b).astype(np.float32)
            name = pathlib.Path(path).name.replace(".nii.gz", "").replace(".nii", "")
            out = out_dir / f"{name}_pred.nii.gz"
            nib.save(nib.Nifti1Image(pred, img.affine), str(out))
            written.append(out)
        return written
