"""The training loop: ``fit(experiment, config, workdir)`` with stages, exact resume, logging and safe stops.

Rerunning ``fit`` with the same workdir resumes from the latest checkpoint (state, iterator state,
stage, plateau/early-stopping counters), so an interrupted run ends bit-identical to an
uninterrupted one. Step numbers count completed steps over all stages: the loss logged at step
``n`` comes from the ``n``-th update. Logged train metrics are means over the steps since the
previous log line (the logging window), accumulated on device.

A staged experiment (``Experiment.stages()``) runs its stages one after another: stage ``k`` covers
global steps ``(b_k, b_{k+1}]``, its ``enter`` hook runs once when it starts, its step is compiled
when it starts, and a checkpoint is written at the end of every stage.
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
from medjax.train.experiment import Stage
from medjax.train.logging import (
    MetricsWriter,
    Progress,
    TensorBoardWriter,
    format_metrics,
    jsonable,
    write_text_atomic,
)

__all__ = ["NonFiniteLossError", "apply_lr_scale", "fit", "init_sharded"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss (or state); the message names the step and last checkpoint."""


def _track_nonfinite(first_bad, loss, step):
    # First step whose loss is not finite (-1 while all are), without a host round trip.
    bad = jnp.logical_not(jnp.all(jnp.isfinite(loss)))
    return jnp.where((first_bad < 0) & bad, step, first_bad)


def _accumulate(total, metrics):
    # Running sums of the window's metrics (float32), on device; total None starts a window.
    if total is None:
        return jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
    return jax.tree.map(lambda t, m: t + jnp.asarray(m, jnp.float32), total, metrics)


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


def _unalias(tree):
    """``tree`` with every repeated array object replaced by a copy (donation needs distinct buffers).

    A state can hold one array twice: a key given to two networks, or parameters copied by a
    warm start; a donating step would then donate one buffer twice.
    """
    seen = set()

    def fresh(x):
        if isinstance(x, jax.Array):
            if id(x) in seen:
                return jnp.copy(x)
            seen.add(id(x))
        return x

    return jax.tree.map(fresh, tree)


def init_sharded(init_fn, rng, mesh):
    """``init_fn(rng)`` computed directly with replicated shardings on ``mesh``.

    ``jax.jit(init_fn, out_shardings=...)``: parameters are created on the devices, never on the
    host first. An ``init_fn`` that cannot be traced (host-side NumPy on its inputs) falls back to
    running eagerly and replicating the result.
    """
    rep = _mesh.replicated(mesh)
    try:
        return _unalias(jax.jit(init_fn, out_shardings=rep)(rng))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return _unalias(_mesh.replicate(init_fn(rng), mesh))


def _host_means(total, count):
    out = {}
    for k, v in jax.device_get(total).items():
        v = np.asarray(v)
        if v.size != 1:
            raise ValueError(f"train_step metrics[{k!r}]: expected a scalar, got shape {v.shape}")
        out[k] = float(v.reshape(())) / count
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


def _stages(experiment, config):
    """The experiment's stages (one ``train`` stage of ``train_step`` when it declares none)."""
    stages = experiment.stages() if hasattr(experiment, "stages") else None
    if stages is None:
        return [Stage("train", int(config.num_steps), experiment.train_step)]
    stages = list(stages)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise ValueError(
            f"{type(experiment).__name__}.stages(): expected a non-empty list of medjax.train.Stage"
        )
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{type(experiment).__name__}.stages(): stage names repeat: {names}")
    total = sum(int(s.num_steps) for s in stages)
    if int(config.num_steps) != total:
        detail = " + ".join(f"{s.name} {int(s.num_steps)}" for s in stages)
        raise ConfigError(
            f"config.num_steps: expected the sum of the stages' steps ({detail} = {total}), got "
            f"{int(config.num_steps)}; change a stage's num_steps instead"
        )
    return stages


def _check_iterator(iterator, where):
    if not (
        callable(getattr(iterator, "get_state", None))
        and callable(getattr(iterator, "set_state", None))
    ):
        raise ValueError(
            f"{where}: expected an iterator with get_state()/set_state() (e.g. "
            "medjax.data.pipeline.make_iterator), so that a resumed run continues where it stopped; "
            f"got {type(iterator).__name__} without them"
        )
    return iterator


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


def _gib(n):
    if n >= 2**28:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**18 else f"{n:.1f} B"


def _memory_fields(experiment, config):
    """``"batch_size=2, synthetic.shape=(32, 32, 32), ..."``: the config fields the experiment
    names as driving its memory (``memory_fields``), with their values."""
    out = []
    for key in getattr(experiment, "memory_fields", ("batch_size",)):
        node = config
        try:
            for part in key.split("."):
                node = node[part]
        except (KeyError, TypeError):
            continue
        out.append(f"{key}={tuple(node) if isinstance(node, list) else node}")
    return ", ".join(out)


def compile_checked(step_fn, state, batch, mesh, experiment, config, stage_name):
    """Compile ``step_fn`` for these arguments and check its memory before the first step runs.

    XLA's memory analysis of the compiled step (arguments + outputs - aliased + temporaries, on
    each device) is compared with what the devices have (:func:`medjax.train.mesh.available_memory`);
    a step that cannot fit raises ``MemoryError`` with one line naming both sizes and the config
    fields that drive them. Returns the compiled step.
    """
    compiled = step_fn.lower(state, batch).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return compiled
    need = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    shared = local and local[0].platform == "cpu"  # CPU devices share the host's memory
    total = need * (len(local) if shared else 1)
    have = _mesh.available_memory(local[0] if local else None)
    if have is not None and total > have:
        raise MemoryError(
            f"stage {stage_name!r}: one training step needs {_gib(total)} "
            f"({'on ' + str(len(local)) + ' CPU devices' if shared else 'per device'}), but "
            f"{_gib(have)} is available; it grows with {_memory_fields(experiment, config)} "
            "(lower them, or use a device with more memory)"
        )
    return compiled


class _Run:
    """The state of one ``fit`` call: checkpoints, iterators, writers and the train state."""

    def __init__(self, experiment, config, workdir, mesh, interactive, stream):
        self.experiment, self.config = experiment, validate_config(config)
        self.workdir = pathlib.Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        self.mesh = _mesh.make_mesh() if mesh is None else mesh
        self.stages = _stages(experiment, self.config)
        self.bounds = np.cumsum([0] + [int(s.num_steps) for s in self.stages]).tolist()
        self.num_steps = self.bounds[-1]
        cfg = self.config
        self.log_every, self.eval_every = int(cfg.log_every), int(cfg.eval_every)
        self.ckpt_every = int(cfg.checkpoint_every)
        self.has_validate = (
            experiment.implements("validate") if hasattr(experiment, "implements") else False
        )
        self.eval_metric = (
            getattr(experiment, "eval_metric", None)
            if self.has_validate and self.eval_every
            else None
        )
        self.config_dict = jsonable(cfg.to_dict())
        self.rng = jax.random.PRNGKey(int(cfg.seed))
        self.manager = _ckpt.CheckpointManager(
            self.workdir / "checkpoints",
            max_to_keep=int(cfg.get("keep_checkpoints", 3)),
            best_metric=self.eval_metric,
            best_mode=getattr(experiment, "eval_mode", "min"),
            keep_best=int(cfg.get("keep_best", 1)),
            async_save=bool(cfg.get("async_checkpoint", True)),
        )
        self.plateau, self.stopper = _controllers(cfg, experiment, self.has_validate)
        self.iterators = {}  # source name -> live iterator
        self.source = None  # the source name of the current stage
        self.entered = -1  # index of the last stage whose enter hook the state has seen
        self.last_val = {}
        self.last_saved = None
        self.step = 0
        self.state = None
        self.interactive, self.stream = interactive, stream
        self._resume_data = None
        self.window, self.count = None, 0  # the logging window's metric sums and step count
        self._closed = False

    def close(self):
        """Finish pending saves, release the checkpoint manager and the iterators (once)."""
        if self._closed:
            return
        self._closed = True
        self.manager.close()
        for it in self.iterators.values():
            _close(it)

    # ------------------------------------------------------------------ set-up and resume

    def _iterator(self, stage):
        source = "default" if stage.iterator is None else stage.name
        if source not in self.iterators:
            make = self.experiment.train_iterator if stage.iterator is None else stage.iterator
            where = (
                "train_iterator()" if stage.iterator is None else f"stage {stage.name!r} iterator"
            )
            it = _check_iterator(make(), where)
            data = self._resume_data
            if data is not None and data.get("source", "default") == source:
                it.set_state(data["state"])
            self.iterators[source] = it
        self.source = source
        return self.iterators[source]

    def restore_or_init(self):
        start = self.manager.latest_step()
        if start is not None and self.config.get("resume_check", True):
            # Before restoring (and before config.json is rewritten): a changed model would not
            # even fit the saved arrays, and a changed optimiser would mix two runs silently.
            changes = config_changes(self.manager.restore_config(start), self.config_dict)
            if changes:
                raise ConfigError(
                    f"--workdir {self.workdir} holds a checkpoint (step {start}) trained with other "
                    f"settings: {'; '.join(changes)}. Use a new work directory, rerun with the "
                    "same settings, or pass --config.resume_check=False to resume anyway"
                )
        if self.is_main:
            write_text_atomic(self.workdir / "config.json", config_to_json(self.config) + "\n")
        if start is None:
            self.state = init_sharded(self.experiment.init_state, self.rng, self.mesh)
            return 0
        abstract = _ckpt.abstract_state(
            self.experiment.init_state, _mesh.replicated(self.mesh), self.rng
        )
        restored = self.manager.restore(abstract)
        self.state = restored.state
        data = restored.data or {}
        # Checkpoints of medjax before stages held the iterator state itself.
        self._resume_data = data if "source" in data else {"source": "default", "state": data}
        if not self._resume_data["state"]:
            self._resume_data = None
        loop = restored.loop
        if self.plateau is not None and loop.get("plateau"):
            self.plateau.load_state_dict(loop["plateau"])
        if self.stopper is not None and loop.get("early_stopping"):
            self.stopper.load_state_dict(loop["early_stopping"])
        self.last_val = dict(loop.get("last_val") or {})
        window = loop.get("window") or {}
        if window.get("count"):
            sums = {k: jnp.asarray(float(v), jnp.float32) for k, v in window["sums"].items()}
            self.window = jax.device_put(sums, _mesh.replicated(self.mesh))
            self.count = int(window["count"])
        # Before stages, a checkpoint's state had entered its (only) stage.
        self.entered = int(loop.get("stage_entered", self._stage_of(start)))
        self.last_saved = start
        return start

    def _stage_of(self, step):
        """Index of the stage that the step after ``step`` belongs to (the last one at the end)."""
        for k in range(len(self.stages)):
            if step < self.bounds[k + 1]:
                return k
        return len(self.stages) - 1

    # ------------------------------------------------------------------ bookkeeping

    def fail(self, what):
        self.manager.wait_until_finished()
        good = self.manager.latest_step()
        where = f"last good checkpoint: step {good}" if good is not None else "no checkpoint saved"
        raise NonFiniteLossError(f"{what} ({where} in {self.manager.directory})")

    def check_finite(self, at_step):
        bad = int(jax.device_get(self.first_bad))
        if bad >= 0:
            self.fail(f"non-finite loss at step {bad}")
        if not bool(jax.device_get(self.all_finite(self.state))):
            self.fail(f"non-finite values in the train state at step {at_step}")

    def save(self, at_step, val=None):
        self.check_finite(at_step)
        loop_state = {
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "early_stopping": self.stopper.state_dict() if self.stopper is not None else None,
            "last_val": self.last_val,
            "stage_entered": self.entered,
            # The logging window so far, so that a resumed run logs the same means.
            "window": {
                "count": self.count,
                "sums": {k: float(v) for k, v in jax.device_get(self.window or {}).items()},
            },
        }
        it = self.iterators.get(self.source)
        data = {"source": self.source, "state": it.get_state()} if it is not None else {}
        self.manager.save(
            at_step,
            self.state,
            data=jsonable(data),
            config=self.config_dict,
            loop=jsonable(loop_state),
            metrics=val,
        )
        self.last_saved = at_step

    # ------------------------------------------------------------------ the loop

    def _enter(self, k):
        stage = self.stages[k]
        if stage.enter is not None:
            before = jax.tree.structure(self.state)
            new = stage.enter(self.state)
            if jax.tree.structure(new) != before:
                raise ValueError(
                    f"stage {stage.name!r} enter(): expected a state of the same structure as "
                    "init_state() gives (create every network and optimiser there), got another"
                )
            self.state = _unalias(jax.device_put(new, _mesh.replicated(self.mesh)))
        self.entered = k

    def _validate(self, step, record):
        self.check_finite(step)
        val = {k: float(v) for k, v in self.experiment.validate(self.state).items()}
        self.last_val = dict(val)
        # One metrics.jsonl object per step: validation entries named val_*.
        record.update({k if k.startswith("val_") else f"val_{k}": v for k, v in val.items()})
        self.tensorboard.write(step, val, split="val")
        self.progress.line(f"step {step} validation: {format_metrics(val)}")
        if self.eval_metric is not None and self.eval_metric not in val:
            raise ValueError(
                f"validate(): expected the eval_metric {self.eval_metric!r} entry, got {sorted(val)}"
            )
        if self.eval_metric is not None and not math.isfinite(val[self.eval_metric]):
            self.fail(f"non-finite validation {self.eval_metric} at step {step}")
        if self.plateau is not None:
            old = self.plateau.scale
            scale = self.plateau.step(val[self.eval_metric])
            if scale != old:
                self.state = apply_lr_scale(self.state, scale)
                self.progress.line(f"step {step}: learning-rate scale {old:g} -> {scale:g}")
        if self.stopper is not None and self.stopper.step(val[self.eval_metric]):
            self.stopped_early = True
            self.progress.line(f"step {step}: early stopping ({self.eval_metric} not improving)")
        return val

    def run_stage(self, k, sigint):
        """Steps of stage ``k`` from ``self.step`` to its end; False when the run must stop."""
        stage, end = self.stages[k], self.bounds[k + 1]
        if self.entered < k:
            self._enter(k)
        if len(self.stages) > 1:
            self.progress.line(
                f"stage {k + 1}/{len(self.stages)} {stage.name!r}: steps "
                f"{self.bounds[k] + 1}-{end} ({self.step - self.bounds[k]} done)"
            )
        iterator = self._iterator(stage)
        step_fn = _steps.compile_step(stage.step, self.mesh, donate=True)
        compiled = None
        t_stage = time.perf_counter()
        first = self.step
        while self.step < end and not self.stopped_early:
            if sigint.requested:
                self.interrupted = True
                return False
            try:
                host_batch = next(iterator)
            except StopIteration:
                self.exhausted = True
                self.progress.line(
                    f"train iterator ended after step {self.step} of {self.num_steps}"
                )
                return False
            batch = _mesh.shard_batch(host_batch, self.mesh)
            if compiled is None:  # compile once, and check its memory before running it
                compiled = compile_checked(
                    step_fn, self.state, batch, self.mesh, self.experiment, self.config, stage.name
                )
            with jax.named_scope(f"train_step/{stage.name}"):
                self.state, metrics = compiled(self.state, batch)
            self.step += 1
            step = self.step
            if "loss" not in metrics:
                raise ValueError(
                    f"stage {stage.name!r} step metrics: expected a 'loss' entry, got {sorted(metrics)}"
                )
            if step == first + 1 and not self.progress.interactive:
                jax.block_until_ready(metrics)
                self.progress.line(
                    f"first step done in {time.perf_counter() - t_stage:.1f} s (compilation included)"
                )
            self.first_bad = self.track(self.first_bad, metrics["loss"], np.int32(step))
            self.window = self.accumulate(self.window, metrics)
            self.count += 1
            validate_now = bool(
                self.has_validate
                and stage.validate
                and self.eval_every
                and step % self.eval_every == 0
            )
            val = None
            if step % self.log_every == 0 or step == end or validate_now:
                bad = int(jax.device_get(self.first_bad))
                if bad >= 0:
                    self.fail(f"non-finite loss at step {bad}")
                self.last_metrics = _host_means(self.window, self.count)
                self.window, self.count = None, 0
                record = dict(self.last_metrics)
                if len(self.stages) > 1:
                    record["stage"] = stage.name
                self.tensorboard.write(step, self.last_metrics)
                # The console shows the losses; the norms go to metrics.jsonl and TensorBoard.
                shown = {k: v for k, v in self.last_metrics.items() if not k.endswith("_norm")}
                self.progress.update(step, shown)
                if validate_now:
                    val = self._validate(step, record)
                self.writer.write(step, record)
            else:
                self.progress.update(step)
            if (
                (self.ckpt_every and step % self.ckpt_every == 0)
                or self.stopped_early
                or step == end
            ):
                self.save(step, val)
        return not self.stopped_early

    def run(self):
        start = self.restore_or_init()
        self.step = start
        self.first_bad = jnp.asarray(-1, jnp.int32)
        self.track = jax.jit(_track_nonfinite)
        self.accumulate = jax.jit(_accumulate)
        self.all_finite = jax.jit(_state_finite)
        self.last_metrics = {}
        self.interrupted = self.stopped_early = self.exhausted = False
        self.writer = MetricsWriter(self.workdir / "metrics.jsonl", enabled=self.is_main)
        self.writer.truncate_after(start)
        self.tensorboard = TensorBoardWriter(
            self.workdir / "tensorboard",
            enabled=self.is_main and bool(self.config.get("tensorboard", True)),
            purge_step=start + 1 if start else None,
        )
        self.progress = Progress(
            self.num_steps,
            initial=start,
            interactive=self.interactive,
            stream=self.stream,
            enabled=self.is_main,
        )
        if start:
            self.progress.line(f"resuming {self.workdir} from step {start}")
        elif self.num_steps:
            self.progress.line(
                f"training {self.num_steps} steps on {self.mesh.size} device(s), batch "
                f"{self.config.get('batch_size', '?')} -> {self.workdir} (the first step compiles)"
            )
        t_start = time.perf_counter()
        if self.stopper is not None and self.stopper.should_stop:
            self.stopped_early = True
            self.progress.line(f"early stopping was reached at step {start}; nothing to do")
        try:
            with _SigintFlag(self.progress) as sigint:
                for k in range(self._stage_of(self.step), len(self.stages)):
                    if self.stopped_early or not self.run_stage(k, sigint):
                        break
                if self.last_saved != self.step and self.step > 0:
                    self.save(self.step)  # e.g. after Ctrl-C or an exhausted iterator
        except KeyboardInterrupt:
            # A second Ctrl-C (or one outside the main thread): save when the state is intact.
            self.interrupted = True
            intact = not any(x.is_deleted() for x in jax.tree.leaves(self.state))
            if self.last_saved != self.step and self.step > 0 and intact:
                self.save(self.step)
            raise
        finally:
            self.progress.close()
            self.tensorboard.close()
            best_step = self.manager.best_step()
            self.close()
        wall = time.perf_counter() - t_start
        if self.interrupted:
            self.progress.line(
                f"stopped at step {self.step}; checkpoint saved; rerun the same command to resume"
            )
        return self.state, {
            "step": self.step,
            "start_step": start,
            "num_steps": self.num_steps,
            "metrics": self.last_metrics,
            "val_metrics": self.last_val,
            "checkpoint_step": self.last_saved,
            "best_step": best_step,
            "interrupted": self.interrupted,
            "stopped_early": self.stopped_early,
            "iterator_exhausted": self.exhausted,
            "wall_s": wall,
            "steps_per_sec": (self.step - start) / wall if wall > 0 else math.nan,
        }


def fit(experiment, config, workdir, *, mesh=None, interactive=None, stream=None):
    """Train ``experiment`` for ``config.num_steps`` steps in ``workdir``; resumes when checkpoints exist.

    Writes ``workdir/config.json``, ``workdir/metrics.jsonl`` (one JSON object per logged step:
    ``step``, the window's mean train metrics, ``val_*`` at validation steps, ``stage`` in staged
    runs), ``workdir/checkpoints/`` and, when a writer is importable, ``workdir/tensorboard/``.
    Config fields read: ``seed``, ``num_steps``, ``log_every``, ``eval_every``,
    ``checkpoint_every``, optional ``keep_checkpoints`` (3), ``keep_best`` (1),
    ``async_checkpoint`` (True), ``tensorboard`` (True), ``reduce_on_plateau`` and
    ``early_stopping`` (keyword dicts for ``medjax.train.optim``). Returns ``(state, summary)``.
    Raises ``NonFiniteLossError`` naming the step on a NaN/Inf loss, keeping the last good
    checkpoint, and ``ValueError`` for an iterator that cannot be resumed (no ``get_state``).
    """
    prepare = getattr(experiment, "prepare", None)
    if callable(prepare):
        prepare()  # the training data's errors come before anything is written or printed
    run = _Run(experiment, config, workdir, mesh, interactive, stream)
    try:
        return run.run()
    finally:
        run.close()
