"""Toy linear regression used by the engine tests (tiny, deterministic, seconds on a CPU).

Run: ``medjax train toy --workdir /tmp/toy`` with MEDJAX_EXPERIMENTS_DIR=tests/train/toy_experiments.
Expected: the train loss falls from ~8 to below 0.1 within 100 steps ("long").
"""

import ml_collections

VARIANTS = ("quick", "long")


def get_config(variant=None):
    """Config of the toy experiment; ``variant`` is ``"quick"`` (default) or ``"long"``."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 12
    c.batch_size = 8
    c.checkpoint_every = 3
    c.log_every = 1
    c.eval_every = 0
    c.features = 4
    c.noise = 0.1
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 0.05})
    c.nan_at_step = -1  # the 1-based step whose batch is NaN (-1: never)
    c.val_values = ()  # scripted validation values for retention tests; () = real val loss
    c.pipeline = "counter"  # or "grain": medjax.data.pipeline over 64 records, shuffled per epoch
    c.step_noise = 0.0  # std of noise drawn from the step's key and added to the prediction
    c.sleep_per_batch = 0.0  # seconds; lets tests interrupt a running training
    c.tensorboard = False
    c.reduce_on_plateau = None
    c.early_stopping = None
    c.eval = ml_collections.ConfigDict({"scale": 1.0})  # evaluation only: val_loss_scaled
    if variant == "long":
        c.num_steps = 100
        c.log_every = 10
        c.checkpoint_every = 50
    return c


def compare_rows(variant=None):
    """Rows of the engine's compare test: two learning rates, a row identical to the first, and
    one that differs from the first in an evaluation setting only."""
    return {
        "a_slow": ("(a) Adam 0.05", ["optimizer.learning_rate=0.05"]),
        "b_fast": ("(b) Adam 0.2", ["optimizer.learning_rate=0.2"]),
        "c_same": ("(c) the same as (a)", ["optimizer.learning_rate=0.05"]),
        "d_eval": (
            "(d) (a) evaluated at scale 2",
            ["optimizer.learning_rate=0.05", "eval.scale=2"],
        ),
    }
