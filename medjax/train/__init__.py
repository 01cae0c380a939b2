"""Training engine: TrainState, step builders, mesh/sharding, checkpoints, EMA, optimisers, the loop.

Names resolve lazily (a missing or broken module never breaks ``import medjax.train``)::

    from medjax.train import TrainState, fit, load_config, load_experiment
"""

from medjax._lazy import attach

# public name -> module that defines it.
_LAZY = {
    # state.py
    "TrainState": "medjax.train.state",
    # ema.py
    "ema_params": "medjax.train.ema",
    "get_ema_params": "medjax.train.ema",
    # optim.py
    "make_optimizer": "medjax.train.optim",
    "constant": "medjax.train.optim",
    "warmup_cosine": "medjax.train.optim",
    "make_schedule": "medjax.train.optim",
    "lr_scale": "medjax.train.optim",
    "multistep": "medjax.train.optim",
    "step_decay": "medjax.train.optim",
    "adam": "medjax.train.optim",
    "sgd": "medjax.train.optim",
    "rmsprop": "medjax.train.optim",
    "frozen": "medjax.train.optim",
    "clip_params": "medjax.train.optim",
    "set_lr_scale": "medjax.train.optim",
    "get_lr_scale": "medjax.train.optim",
    "ReduceOnPlateau": "medjax.train.optim",
    "EarlyStopping": "medjax.train.optim",
    # mesh.py
    "make_mesh": "medjax.train.mesh",
    "replicated": "medjax.train.mesh",
    "data_sharded": "medjax.train.mesh",
    "shard_batch": "medjax.train.mesh",
    "replicate": "medjax.train.mesh",
    "initialize_distributed": "medjax.train.mesh",
    # steps.py
    "compile_step": "medjax.train.steps",
    "supervised_step": "medjax.train.steps",
    "adversarial_step": "medjax.train.steps",
    "cotraining_step": "medjax.train.steps",
    "ramp_weight": "medjax.train.steps",
    # checkpoint.py
    "CheckpointManager": "medjax.train.checkpoint",
    "abstract_state": "medjax.train.checkpoint",
    "restore_state": "medjax.train.checkpoint",
    # experiment.py
    "Experiment": "medjax.train.experiment",
    "Stage": "medjax.train.experiment",
    "ExperimentNotFoundError": "medjax.train.experiment",
    "find_experiments_dir": "medjax.train.experiment",
    "list_experiments": "medjax.train.experiment",
    "load_experiment": "medjax.train.experiment",
    # config.py
    "ConfigError": "medjax.train.config",
    "load_config": "medjax.train.config",
    "apply_overrides": "medjax.train.config",
    "config_from_json": "medjax.train.config",
    # loop.py
    "fit": "medjax.train.loop",
    "init_sharded": "medjax.train.loop",
    "NonFiniteLossError": "medjax.train.loop",
    # transfer.py
    "warm_start": "medjax.train.transfer",
    "copy_subtrees": "medjax.train.transfer",
    "load_workdir_state": "medjax.train.transfer",
    # logging.py
    "read_metrics": "medjax.train.logging",
}

__getattr__, __dir__ = attach(__name__, _LAZY)
