"""Staged toy experiment for the engine tests: pre-train model a, warm-start b from it, fine-tune b.

Stage "pretrain" fits a Dense layer ``a``; stage "finetune" copies a's parameters into ``b`` when
it starts and trains ``b`` (with ``a`` frozen, reaching the loss as ``rest``) on its own iterator.
"""

import ml_collections

VARIANTS = ("quick",)


def get_config(variant=None):
    """Config of the staged toy experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ml_collections.ConfigDict()
    c.stages.pretrain = ml_collections.ConfigDict({"num_steps": 4})
    c.stages.finetune = ml_collections.ConfigDict({"num_steps": 5})
    c.num_steps = 9
    c.batch_size = 8
    c.checkpoint_every = 2
    c.log_every = 2
    c.eval_every = 0
    c.features = 4
    c.noise = 0.1
    c.lr_a = 0.05
    c.lr_b = 0.05
    c.distill = 0.5  # weight of b's match to the frozen a
    c.tensorboard = False
    c.no_state_iterator = False  # a finetune iterator without get_state (must be refused)
    return c
