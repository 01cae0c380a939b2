"""Checkpoints: the one checkpoint path of medjax (orbax CheckpointManager, asynchronous, atomic).

A checkpoint at step ``n`` holds four items: ``state`` (the train state pytree), ``data`` (the input
iterator's JSON state), ``config`` (the resolved config as JSON) and ``loop`` (host-side loop state:
plateau/early-stopping counters, last validation metrics). Orbax writes each step into a temporary
folder and renames it when complete, so a run killed mid-save loses only the checkpoint in flight.
Restoring takes an *abstract* state whose leaves carry the current mesh's shardings, so a checkpoint
written on one device count restores onto another.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as _pp

__all__ = [
    "CheckpointManager",
    "Restored",
    "abstract_state",
    "restore_state",
]

_ITEMS = ("state", "data", "config", "loop")


def abstract_state(state_or_fn, sharding, *args):
    """Tree of ``jax.ShapeDtypeStruct`` (with ``sharding`` on every leaf) describing a state.

    ``state_or_fn`` is a state pytree or a function (e.g. ``experiment.init_state``) evaluated
    abstractly with ``*args`` by ``jax.eval_shape`` (nothing is computed). ``sharding`` is a
    ``jax.sharding.Sharding`` for all leaves (e.g. ``mesh.replicated(mesh)``) or None.
    """
    tree = jax.eval_shape(state_or_fn, *args) if callable(state_or_fn) else state_or_fn

    def leaf(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` returns."""

    step: int
    state: Any
    data: dict
    config: dict
    loop: dict


def _metric_fn(name: str, mode: str):
    """Ranking key: the metric, with missing or non-finite values ranked worst."""
    worst = math.inf if mode == "min" else -math.inf

    def get(metrics):
        value = metrics.get(name) if isinstance(metrics, dict) else None
        if value is None or not math.isfinite(float(value)):
            return worst
        return float(value)

    return get


class CheckpointManager:
    """Save/restore train states with their data-iterator state, config and loop state.

    Keeps the ``max_to_keep`` most recent checkpoints plus the ``keep_best`` best ones by the
    validation metric ``best_metric`` (``best_mode`` ``"min"`` or ``"max"``) when one is given.
    Saves are asynchronous (``async_save``): ``save`` returns once the arrays are copied to host.
    """

    def __init__(
        self,
        directory,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode: expected 'min' or 'max', got {best_mode!r}")
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep: expected an int >= 1, got {max_to_keep!r}")
        if not isinstance(keep_best, int) or keep_best < 0:
            raise ValueError(f"keep_best: expected an int >= 0, got {keep_best!r}")
        self.directory = pathlib.Path(directory).resolve()
        self.best_metric = best_metric
        self.best_mode = best_mode
        policies = [_pp.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = _metric_fn(best_metric, best_mode)
            policies.append(
                _pp.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=_pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step of the best checkpoint by ``best_metric`` (None without metric or checkpoints)."""
        if self.best_metric is None:
            return None
        return self._manager.best_step()

    def save(self, step: int, state, *, data=None, config=None, loop=None, metrics=None) -> bool:
        """Start saving ``state`` (and JSON ``data``/``config``/``loop``) as checkpoint ``step``.

        ``metrics`` (a dict of host floats) ranks the checkpoint when it holds ``best_metric``.
        Returns False (and saves nothing) when checkpoint ``step`` already exists.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data or {})),
            config=ocp.args.JsonSave(dict(config or {})),
            loop=ocp.args.JsonSave(dict(loop or {})),
        )
        ranked = None
        if self.best_metric is not None:
            # {} (not None) for an unranked checkpoint: it ranks worst and only LatestN keeps it.
            ranked = {k: float(v) for k, v in (metrics or {}).items()}
        return bool(self._manager.save(step, args=args, metrics=ranked, force=True))

    def restore(self, abstract, step: int | None = None) -> Restored:
        """Restore checkpoint ``step`` (default: the latest) onto the shapes/shardings of ``abstract``."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
            loop=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(int(step), args=args)
        return Restored(
            step=int(step),
            state=out.state,
            data=dict(out.data or {}),
            config=dict(out.config or {}),
            loop=dict(out.loop or {}),
        )

    def restore_config(self, step: int | None = None) -> dict:
        """The resolved config saved with checkpoint ``step`` (default: the latest), without the state."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        out = self._manager.restore(
            int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return dict(out.config or {})

    def restore_state(self, abstract, step: int | None = None):
        """Restore only the train state of checkpoint ``step`` (default: the latest)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return self._manager.restore(int(step), args=args).state

    def wait_until_finished(self):
        """Block until the asynchronous save in flight (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self):
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _DropMessage(logging.Filter):
    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not str(record.getMessage()).startswith(self.prefix)


def checkpoint_dir(workdir) -> pathlib.Path:
    """The checkpoint folder of a work directory (``workdir/checkpoints``)."""
    return pathlib.Path(workdir).resolve() / "checkpoints"


def restore_state(workdir, abstract, *, step: int | None = None):
    """Restore just the train state from ``workdir/checkpoints`` for evaluation or prediction.

    ``abstract`` comes from :func:`abstract_state`; ``step`` defaults to the latest checkpoint.
    Returns ``(state, step)``; raises FileNotFoundError when there is no checkpoint.
    """
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint folder in {pathlib.Path(workdir)}")
    # orbax warns "Given directory is read only" for every read-only manager: that is the point here.
    quiet = _DropMessage("Given directory is read only")
    logging.getLogger("absl").addFilter(quiet)
    try:
        manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0
            ),
            item_names=_ITEMS,
        )
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {directory}")
        if step is None:
            step = steps[-1]
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        state = manager.restore(int(step), args=args).state
    finally:
        manager.close()
    return state, int(step)
