"""UniverSeg experiment: episodic training on synthetic task families, held-out evaluation.

Training: every batch item samples its own task (per-item task sampling), then a query and a support
set of that task; on device, a task augmentation (identical within a task) and an in-task
augmentation (independent per image) are applied with the step's key; soft Dice on the query; Adam.

Evaluation (host-side): Dice on held-out task families against the support size, with and without
ensembling over random support sets; a small U-Net trained per task on its support set only; and
the untrained UniverSeg floor.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import medjax.train
from medjax import figures as F
from medjax.data import tasks as T
from medjax.data.pipeline import FunctionSource, make_iterator
from medjax.losses import soft_dice_loss
from medjax.metrics import dice
from medjax.models.small_unet import SmallUNet
from medjax.models.universeg import UniverSeg, predict
from medjax.train import TrainState, adam, supervised_step

EPISODES_PER_EPOCH = 1_000_000


def _binary_dice(prob, label):
    """Dice of (prob > 0.5) vs label, (N, H, W, 1) each -> (N,) (1 when both are empty)."""
    pred = (np.asarray(prob)[..., 0] > 0.5).astype(np.int32)
    target = (np.asarray(label)[..., 0] > 0.5).astype(np.int32)
    return np.asarray(dice(pred, target, num_classes=2, ignore_empty=False))[:, 0]


class Experiment(medjax.train.Experiment):
    """UniverSeg trained on synthetic tasks; evaluated on held-out task families."""

    def __init__(self, config):
        super().__init__(config)
        d = config.data
        self.size = (int(d.size), int(d.size))
        self.model = UniverSeg(encoder_features=tuple(config.model.features))
        self.train_tasks = T.synthetic_tasks(
            int(d.num_train_generators), split="train", seed=int(d.seed)
        )
        self.heldout_tasks = T.synthetic_tasks(
            int(d.num_heldout_generators), split="heldout", seed=int(d.seed) + 1
        )
        self._step = supervised_step(self._loss)

    # ------------------------------------------------------------------------------ training
    def _dummy(self, s=1):
        h, w = self.size
        return jnp.zeros((1, h, w, 1)), jnp.zeros((1, s, h, w, 1)), jnp.zeros((1, s, h, w, 1))

    def init_state(self, rng):
        """TrainState of UniverSeg (Adam, ``config.learning_rate``)."""
        params = self.model.init(jax.random.wrap_key_data(rng), *self._dummy())["params"]
        return TrainState.create(
            apply_fn=self.model.apply,
            params=params,
            tx=adam(float(self.config.learning_rate)),
            rng=rng,
        )

    def augment(self, key, batch):
        """Task augmentation then in-task augmentation of an episode batch (device, jittable)."""
        d = self.config.data
        images = jnp.concatenate([batch["query"][:, None], batch["support_images"]], axis=1)
        labels = jnp.concatenate([batch["query_label"][:, None], batch["support_labels"]], axis=1)
        k_task, k_in = jax.random.split(key)
        if d.task_augment and any(float(v) > 0 for v in dict(d.task_augment).values()):
            images, labels = T.task_augment(k_task, images, labels, dict(d.task_augment))
        if d.in_task_augment:
            b, n = images.shape[:2]
            flat = lambda x: x.reshape((b * n, *x.shape[2:]))
            im, lb = T.in_task_augment(k_in, flat(images), flat(labels))
            images, labels = im.reshape(images.shape), lb.reshape(labels.shape)
        return images, labels

    def _loss(self, params, model_state, batch, rng, rest):
        del rest
        images, labels = self.augment(rng, batch)
        logits = self.model.apply({"params": params}, images[:, 0], images[:, 1:], labels[:, 1:])
        loss = soft_dice_loss(logits, labels[:, 0], activation="sigmoid", reduction="sample")
        return loss, ({"soft_dice": 1.0 - loss}, model_state)

    def train_step(self, state, batch):
        """One Adam step on soft Dice of the queries of an episode batch."""
        return self._step(state, batch)

    def train_iterator(self):
        """Resumable iterator of episode batches (one task per item), built by medjax.data.pipeline."""
        d, seed = self.config.data, int(self.config.seed)
        tasks, s, size = self.train_tasks, int(d.support_size), self.size

        def episode(i):
            rng = np.random.default_rng([seed, 17, int(i)])
            return T.sample_episode(tasks, rng, support_size=s, size=size)

        return make_iterator(
            FunctionSource(EPISODES_PER_EPOCH, episode),
            batch_size=int(self.config.batch_size),
            seed=seed,
            prefetch_threads=int(d.prefetch_threads),
        )

    # ------------------------------------------------------------------------------ evaluation
    def eval_set(self):
        """Held-out episodes: per task, queries and ``ensemble`` nested pools of support pairs."""
        e = self.config.eval
        rng = np.random.default_rng(int(e.seed))
        smax = max(e.support_sizes)
        out = []
        for t in self.heldout_tasks:
            q, ql = t.sample(rng, int(e.queries_per_task), self.size)
            pools = [t.sample(rng, smax, self.size) for _ in range(int(e.ensemble))]
            out.append({"task": t, "query": q, "query_label": ql, "pools": pools})
        return out

    def _universeg_dice(self, variables, episodes, s, ensemble):
        scores = []
        for ep in episodes:
            q = jnp.asarray(ep["query"])
            nq = q.shape[0]
            probs = 0.0
            for pi, pl in ep["pools"][:ensemble]:
                si = jnp.broadcast_to(jnp.asarray(pi[:s])[None], (nq, s, *pi.shape[1:]))
                sl = jnp.broadcast_to(jnp.asarray(pl[:s])[None], (nq, s, *pl.shape[1:]))
                probs = probs + predict(variables, q, si, sl, model=self.model)
            scores.append(_binary_dice(probs / ensemble, ep["query_label"]))
        return np.stack(scores)  # (tasks, queries)

    def _unet_trainer(self):
        """``(key, pool_i, pool_l, s, query) -> probs``: a SmallUNet trained from scratch.

        Trains on the first ``s`` pairs of the support pool (``s`` is traced, so one compilation
        serves every support size): ``unet_steps`` Adam steps on soft Dice, batches of
        ``unet_batch_size`` pairs drawn with replacement, in-task augmentation when
        ``unet_augment``; then predicts the queries ``(Q, H, W, 1)``.
        """
        if getattr(self, "_unet_fn", None) is not None:
            return self._unet_fn
        e = self.config.eval
        net = SmallUNet(int(e.unet_features))
        h, w = self.size
        tx = optax.adam(float(e.unet_learning_rate))
        steps = int(e.unet_steps)
        bs, aug = int(e.get("unet_batch_size", 8)), bool(e.get("unet_augment", True))

        def loss_fn(p, x, y):
            return soft_dice_loss(net.apply(p, x), y, activation="sigmoid", reduction="batch")

        @jax.jit
        def init(key):
            params = net.init(key, jnp.zeros((1, h, w, 1)))
            return params, tx.init(params)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(p, o, key, pool_i, pool_l, s):
            k_idx, k_aug = jax.random.split(key)
            idx = jax.random.randint(k_idx, (bs,), 0, s)
            x, y = pool_i[idx], pool_l[idx]
            if aug:
                x, y = T.in_task_augment(k_aug, x, y)
            upd, o = tx.update(jax.grad(loss_fn)(p, x, y), o, p)
            return optax.apply_updates(p, upd), o

        apply = jax.jit(lambda p, q: jax.nn.sigmoid(net.apply(p, q)))

        def train_and_predict(key, pool_i, pool_l, s, query):
            k_init, k_train = jax.random.split(key)
            p, o = init(k_init)
            for i in range(steps):  # a Python loop: XLA:CPU runs a fori_loop body much slower
                p, o = step(p, o, jax.random.fold_in(k_train, i), pool_i, pool_l, s)
            return apply(p, query)

        self._unet_fn = train_and_predict
        return train_and_predict

    def _unet_dice(self, episodes, s, key):
        """Dice ``(tasks, queries)`` of one SmallUNet per task trained on its first ``s`` pairs."""
        fn = self._unet_trainer()
        smax = max(int(v) for v in self.config.eval.unet_support_sizes)
        scores = []
        for t, ep in enumerate(episodes):
            pool_i, pool_l = ep["pools"][0]
            probs = fn(
                jax.random.fold_in(key, t),
                jnp.asarray(pool_i[:smax]),
                jnp.asarray(pool_l[:smax]),
                jnp.int32(s),
                jnp.asarray(ep["query"]),
            )
            scores.append(_binary_dice(probs, ep["query_label"]))
        return np.stack(scores)

    def evaluate(self, state, workdir):
        """Dice on held-out families vs support size; writes dice_vs_support.png."""
        e = self.config.eval
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        episodes = self.eval_set()
        trained = {"params": state.params}
        untrained = {
            "params": self.model.init(jax.random.key(int(e.seed) + 1), *self._dummy())["params"]
        }
        sizes = [int(s) for s in e.support_sizes]
        rows = {"universeg": {}, "universeg_ensemble": {}, "unet_per_task": {}, "untrained": {}}
        per_family = {}
        for s in sizes:
            d1 = self._universeg_dice(trained, episodes, s, 1)
            rows["universeg"][s] = float(d1.mean())
            if int(e.ensemble) > 1:
                dk = self._universeg_dice(trained, episodes, s, int(e.ensemble))
                rows["universeg_ensemble"][s] = float(dk.mean())
            if s in e.floor_support_sizes:
                rows["untrained"][s] = float(self._universeg_dice(untrained, episodes, s, 1).mean())
            if s in e.unet_support_sizes:
                du = self._unet_dice(episodes, s, jax.random.key(int(e.seed) + s))
                rows["unet_per_task"][s] = float(du.mean())
            if s == sizes[-1]:
                for ep, score in zip(episodes, d1, strict=True):
                    fam = "/".join(ep["task"].family)
                    per_family.setdefault(fam, []).append(float(score.mean()))
        results = {
            "dice_vs_support": {k: {str(s): v for s, v in r.items()} for k, r in rows.items()},
            "dice_per_family_at_max_support": {f: float(np.mean(v)) for f, v in per_family.items()},
            "num_heldout_tasks": len(episodes),
            "queries_per_task": int(e.queries_per_task),
            "ensemble": int(e.ensemble),
            "step": int(state.step),
        }
        plot_dice_vs_support(results, workdir / "dice_vs_support.png")
        return results

    def report(self, results):
        """Markdown table of mean held-out Dice (%) against support size, and per family."""
        fams = results.get("dice_per_family_at_max_support", {})
        lines = [
            f"UniverSeg at step {results['step']}: mean Dice (%) on {results['num_heldout_tasks']} "
            f"held-out tasks x {results['queries_per_task']} queries",
            "",
            results_table(results),
        ]
        if fams:
            per = ", ".join(f"{f} {100 * v:.1f}" for f, v in fams.items())
            lines += ["", f"per held-out family at the largest support size: {per}"]
        return "\n".join(lines)


NAMES = {
    "universeg": "UniverSeg (1 support set)",
    "universeg_ensemble": "UniverSeg, ensemble of random support sets",
    "unet_per_task": "small U-Net trained per task on its support set",
    "untrained": "untrained UniverSeg (floor)",
}


def results_table(results):
    """Markdown table: method x support size -> mean Dice on held-out tasks."""
    rows = results["dice_vs_support"]
    sizes = sorted({int(s) for r in rows.values() for s in r})
    head = "| method | " + " | ".join(f"S={s}" for s in sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 1)]
    for k, r in rows.items():
        if not r:
            continue
        cells = [f"{100 * r[str(s)]:.1f}" if str(s) in r else "" for s in sizes]
        lines.append(f"| {NAMES.get(k, k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_dice_vs_support(results, path):
    """Plot mean held-out Dice against support size (log2 axis) to ``path``."""
    styles = {
        "universeg": "o-",
        "universeg_ensemble": "s-",
        "unet_per_task": "^--",
        "untrained": "x:",
    }
    series = {}
    for k, r in results["dice_vs_support"].items():
        if r:
            s = sorted(int(v) for v in r)
            series[NAMES.get(k, k)] = (s, [100 * r[str(v)] for v in s])
    return F.curves(
        path,
        None,
        series,
        xlabel="support size",
        ylabel="Dice on held-out task families (%)",
        styles={NAMES.get(k, k): v for k, v in styles.items()},
        xlog_base=2,
        ylim=(0, 100),
        grid=True,
        figsize=(5.5, 3.8),
        dpi=120,
    )
