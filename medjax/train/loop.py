"""The training loop: ``fit(experiment, config, workdir)`` with exact resume, logging and safe stops.

Rerunning ``fit`` with the same workdir resumes from the latest checkpoint (state, iterator state,
plateau/early-stopping counters), so an interrupted run ends bit-identical to an uninterrupted one.
Step numbers count completed steps: the loss logged at step ``n`` comes from the ``n``-th update.
"""

from __future__ import annotations

import math
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from medjax.train import checkpoint as _ckpt
from medjax.train import mesh as _mesh
from medjax.train import steps as _steps
from medjax.train.config import ConfigError, config_changes, config_to_json, validate_config
from medjax.train.logging import (
    MetricsWriter,
    Progress,
    TensorBoardWriter,
    format_metrics,
    write_text_atomic,
)

__all__ = ["NonFiniteLossError", "apply_lr_scale", "fit"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss (or state); the message names the step and last checkpoint."""


def _track_nonfinite(first_bad, loss, step):
    # First step whose loss is not finite (-1 while all are), without a host round trip.
    bad = jnp.logical_not(jnp.all(jnp.isfinite(loss)))
    return jnp.where((first_bad < 0) & bad, step, first_bad)


def _state_finite(state):
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(state)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_lr_scale(state, scale):
    """Set the injected ``lr_scale`` of a TrainState (or of each in a dict of them) to ``scale``."""
    from medjax.train.optim import set_lr_scale

    if isinstance(state, dict):
        return {k: apply_lr_scale(v, scale) for k, v in state.items()}
    if hasattr(state, "opt_state"):
        return state.replace(opt_state=set_lr_scale(state.opt_state, scale))
    return state


def _jsonable(tree):
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return str(tree)  # "inf"/"nan": float("inf") reads it back
    if isinstance(tree, np.generic):
        return _jsonable(tree.item())
    return tree


def _host(metrics):
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        if v.size != 1:
            raise ValueError(f"train_step metrics[{k!r}]: expected a scalar, got shape {v.shape}")
        out[k] = float(v.reshape(()))
    return out


def _controllers(config, experiment, has_validate):
    """ReduceOnPlateau / EarlyStopping from ``config.reduce_on_plateau`` / ``config.early_stopping``."""
    from medjax.train.optim import EarlyStopping, ReduceOnPlateau

    plateau = stopper = None
    mode = experiment.eval_mode
    has_validate = has_validate and getattr(experiment, "eval_metric", None) is not None
    if config.get("reduce_on_plateau"):
        if not has_validate:
            raise ValueError(
                "config.reduce_on_plateau: expected an experiment with validate() and eval_metric, "
                f"got {type(experiment).__name__} without them"
            )
        kw = dict(config.reduce_on_plateau)
        kw.setdefault("mode", mode)
        if "base_lr" not in kw and "optimizer" in config and "learning_rate" in config.optimizer:
            kw["base_lr"] = float(config.optimizer.learning_rate)
        plateau = ReduceOnPlateau(**kw)
    if config.get("early_stopping"):
        if not has_validate:
            raise ValueError(
                "config.early_stopping: expected an experiment with validate() and eval_metric, "
                f"got {type(experiment).__name__} without them"
            )
        kw = dict(config.early_stopping)
        kw.setdefault("mode", mode)
        stopper = EarlyStopping(**kw)
    return plateau, stopper


def _close(iterator):
    close = getattr(iterator, "close", None)
    if callable(close):
        close()  # e.g. a grain pipeline's prefetch threads


class _SigintFlag:
    """First Ctrl-C asks the loop to save and stop; a second one interrupts at once."""

    def __init__(self, progress):
        self.requested = False
        self._progress = progress
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._progress.line("Ctrl-C: saving a checkpoint and stopping (press again to abort)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def fit(experiment, config, workdir, *, mesh=None, interactive=None, stream=None):
    """Train ``experiment`` for ``config.num_steps`` steps in ``workdir``; resumes when checkpoints exist.

    Writes ``workdir/config.json``, ``workdir/metrics.jsonl`` (one JSON object per logged step:
    ``step``, ``split``, metrics), ``workdir/checkpoints/`` and, when a writer is importable,
    ``workdir/tensorboard/``. Config fields read: ``seed``, ``num_steps``, ``log_every``,
    ``eval_every``, ``checkpoint_every``, optional ``keep_checkpoints`` (3), ``keep_best`` (1),
    ``async_checkpoint`` (True), ``tensorboard`` (True), ``reduce_on_plateau`` and
    ``early_stopping`` (keyword dicts for ``medjax.train.optim``). Returns ``(state, summary)``.
    Raises ``NonFiniteLossError`` naming the step on a NaN/Inf loss, keeping the last good checkpoint.
    """
    config = validate_config(config)
    workdir = pathlib.Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = _mesh.make_mesh() if mesh is None else mesh
    rep = _mesh.replicated(mesh)
    num_steps = int(config.num_steps)
    log_every, eval_every = int(config.log_every), int(config.eval_every)
    ckpt_every = int(config.checkpoint_every)
    has_validate = experiment.implements("validate") if hasattr(experiment, "implements") else False
    eval_metric = getattr(experiment, "eval_metric", None) if has_validate and eval_every else None

    config_dict = _jsonable(config.to_dict())

    rng = jax.random.PRNGKey(int(config.seed))
    abstract = _ckpt.abstract_state(experiment.init_state, rep, rng)
    manager = _ckpt.CheckpointManager(
        workdir / "checkpoints",
        max_to_keep=int(config.get("keep_checkpoints", 3)),
        best_metric=eval_metric,
        best_mode=getattr(experiment, "eval_mode", "min"),
        keep_best=int(config.get("keep_best", 1)),
        async_save=bool(config.get("async_checkpoint", True)),
    )
    plateau, stopper = _controllers(config, experiment, has_validate)
    iterator = experiment.train_iterator()
    last_val = {}

    try:
        start = manager.latest_step()
        if start is not None and config.get("resume_check", True):
            # Before restoring (and before config.json is rewritten): a changed model would not
            # even fit the saved arrays, and a changed optimiser would mix two runs silently.
            changes = config_changes(manager.restore_config(start), config_dict)
            if changes:
                raise ConfigError(
                    f"--workdir {workdir} holds a checkpoint (step {start}) trained with other "
                    f"settings: {'; '.join(changes)}. Use a new work directory, rerun with the "
                    "same settings, or pass --config.resume_check=False to resume anyway"
                )
        if is_main:
            write_text_atomic(workdir / "config.json", config_to_json(config) + "\n")
        if start is not None:
            restored = manager.restore(abstract)
            state = restored.state
            if restored.data:
                iterator.set_state(restored.data)
            loop_state = restored.loop
            if plateau is not None and loop_state.get("plateau"):
                plateau.load_state_dict(loop_state["plateau"])
            if stopper is not None and loop_state.get("early_stopping"):
                stopper.load_state_dict(loop_state["early_stopping"])
            last_val = dict(loop_state.get("last_val") or {})
        else:
            start = 0
            state = _mesh.replicate(experiment.init_state(rng), mesh)
    except BaseException:
        manager.close()
        _close(iterator)
        raise

    writer = MetricsWriter(workdir / "metrics.jsonl", enabled=is_main)
    writer.truncate_after(start)
    tensorboard = TensorBoardWriter(
        workdir / "tensorboard", enabled=is_main and bool(config.get("tensorboard", True))
    )
    progress = Progress(
        num_steps, initial=start, interactive=interactive, stream=stream, enabled=is_main
    )
    if start:
        progress.line(f"resuming {workdir} from step {start}")
    elif num_steps:
        progress.line(
            f"training {num_steps} steps on {mesh.size} device(s), batch "
            f"{config.get('batch_size', '?')} -> {workdir} (the first step compiles)"
        )

    step_fn = _steps.compile_step(experiment.train_step, mesh, donate=True)
    track = jax.jit(_track_nonfinite)
    all_finite = jax.jit(_state_finite)
    first_bad = jnp.asarray(-1, jnp.int32)
    val = None  # validation metrics of the current step, when it ran validate()
    step = start
    last_saved = start if start else None
    last_metrics = {}
    interrupted = stopped_early = exhausted = False
    t_start = time.perf_counter()

    def check_finite(at_step):
        bad = int(jax.device_get(first_bad))
        if bad >= 0:
            fail(f"non-finite loss at step {bad}")
        if not bool(jax.device_get(all_finite(state))):
            fail(f"non-finite values in the train state at step {at_step}")

    def fail(what):
        manager.wait_until_finished()
        good = manager.latest_step()
        where = f"last good checkpoint: step {good}" if good is not None else "no checkpoint saved"
        raise NonFiniteLossError(f"{what} ({where} in {manager.directory})")

    def save(at_step, val=None):
        nonlocal last_saved
        check_finite(at_step)
        loop_state = {
            "plateau": plateau.state_dict() if plateau is not None else None,
            "early_stopping": stopper.state_dict() if stopper is not None else None,
            "last_val": last_val,
        }
        data = iterator.get_state() if hasattr(iterator, "get_state") else {}
        manager.save(
            at_step,
            state,
            data=_jsonable(data),
            config=config_dict,
            loop=_jsonable(loop_state),
            metrics=val,
        )
        last_saved = at_step

    if stopper is not None and stopper.should_stop:
        stopped_early = True
        progress.line(f"early stopping was reached at step {start}; nothing to do")
    try:
        with _SigintFlag(progress) as sigint:
            while step < num_steps and not stopped_early:
                if sigint.requested:
                    interrupted = True
                    break
                try:
                    host_batch = next(iterator)
                except StopIteration:
                    exhausted = True
                    progress.line(f"train_iterator ended after step {step} of {num_steps}")
                    break
                batch = _mesh.shard_batch(host_batch, mesh)
                with jax.named_scope("train_step"):
                    state, metrics = step_fn(state, batch)
                step += 1
                if step == start + 1 and not progress.interactive:
                    jax.block_until_ready(metrics)
                    progress.line(
                        f"first step done in {time.perf_counter() - t_start:.1f} s "
                        "(compilation included)"
                    )
                if "loss" not in metrics:
                    raise ValueError(
                        f"train_step metrics: expected a 'loss' entry, got {sorted(metrics)}"
                    )
                first_bad = track(first_bad, metrics["loss"], np.int32(step))
                validate_now = bool(has_validate and eval_every and step % eval_every == 0)
                val = None
                if step % log_every == 0 or step == num_steps or validate_now:
                    bad = int(jax.device_get(first_bad))
                    if bad >= 0:
                        fail(f"non-finite loss at step {bad}")
                    last_metrics = _host(metrics)
                    record = dict(last_metrics)
                    tensorboard.write(step, last_metrics)
                    progress.update(step, last_metrics)
                    if validate_now:
                        check_finite(step)
                        val = {k: float(v) for k, v in experiment.validate(state).items()}
                        last_val = dict(val)
                        # One metrics.jsonl object per step: validation entries named val_*.
                        record.update(
                            {k if k.startswith("val_") else f"val_{k}": v for k, v in val.items()}
                        )
                        tensorboard.write(step, val, split="val")
                        progress.line(f"step {step} validation: {format_metrics(val)}")
                    writer.write(step, record)
                else:
                    progress.update(step)
                if val is not None:
                    if eval_metric is not None and eval_metric not in val:
                        raise ValueError(
                            f"validate(): expected the eval_metric {eval_metric!r} entry, "
                            f"got {sorted(val)}"
                        )
                    if eval_metric is not None and not math.isfinite(val[eval_metric]):
                        fail(f"non-finite validation {eval_metric} at step {step}")
                    if plateau is not None:
                        old = plateau.scale
                        scale = plateau.step(val[eval_metric])
                        if scale != old:
                            state = apply_lr_scale(state, scale)
                            progress.line(f"step {step}: learning-rate scale {old:g} -> {scale:g}")
                    if stopper is not None and stopper.step(val[eval_metric]):
                        stopped_early = True
                        progress.line(f"step {step}: early stopping ({eval_metric} not improving)")
                if (ckpt_every and step % ckpt_every == 0) or stopped_early:
                    save(step, val)
                if stopped_early:
                    break
            if last_saved != step and step > 0:
                # Attach validation metrics only if they were measured on this very state.
                save(step, val)
    except KeyboardInterrupt:
        # A second Ctrl-C (or one outside the main thread): save when the state is intact.
        interrupted = True
        intact = not any(x.is_deleted() for x in jax.tree.leaves(state))
        if last_saved != step and step > 0 and intact:
            save(step, None)
        raise
    finally:
        progress.close()
        tensorboard.close()
        best_step = manager.best_step()
        manager.close()
        _close(iterator)

    wall = time.perf_counter() - t_start
    if interrupted:
        progress.line(f"stopped at step {step}; checkpoint saved; rerun the same command to resume")
    summary = {
        "step": step,
        "start_step": start,
        "num_steps": num_steps,
        "metrics": last_metrics,
        "val_metrics": last_val,
        "checkpoint_step": last_saved,
        "best_step": best_step,
        "interrupted": interrupted,
        "stopped_early": stopped_early,
        "iterator_exhausted": exhausted,
        "wall_s": wall,
        "steps_per_sec": (step - start) / wall if wall > 0 else math.nan,
    }
    return state, summary
