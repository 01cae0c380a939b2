"""Work directories after training: restore the state, evaluate, write ``results.json`` / ``results.md``.

``medjax eval``, ``medjax predict`` and ``medjax compare`` all go through these, so a work
directory is read and its results are written in one way.
"""

from __future__ import annotations

import json
import pathlib

import jax

from medjax.train.logging import write_text_atomic

__all__ = ["evaluate_workdir", "needs_training", "restore_for_eval", "write_results"]


def needs_training(experiment) -> bool:
    """Whether the experiment's config trains a model (False for e.g. an identity baseline)."""
    return bool(getattr(experiment, "needs_training", True))


def restore_for_eval(spec, config, workdir, *, mesh=None):
    """``(experiment, state, step)`` of ``workdir``'s latest checkpoint (state None, step 0 when the
    experiment trains nothing)."""
    from medjax.train.checkpoint import abstract_state, restore_state
    from medjax.train.mesh import make_mesh, replicated

    experiment = spec.build(config)
    if not needs_training(experiment):
        return experiment, None, 0
    mesh = make_mesh() if mesh is None else mesh
    rng = jax.random.PRNGKey(int(config.seed))
    abstract = abstract_state(experiment.init_state, replicated(mesh), rng)
    state, step = restore_state(workdir, abstract)
    return experiment, state, step


def write_results(experiment, record: dict, workdir) -> str:
    """Write ``record`` to ``workdir/results.json`` and ``experiment.report(record)`` to results.md
    (process 0 only); returns the report."""
    report = experiment.report(record)
    if jax.process_index() == 0:
        workdir = pathlib.Path(workdir)
        write_text_atomic(
            workdir / "results.json", json.dumps(record, indent=2, default=str) + "\n"
        )
        write_text_atomic(workdir / "results.md", report + "\n")
    return report


def evaluate_workdir(spec, config, workdir, *, experiment=None, state=None, step=None, extra=None):
    """Evaluate a work directory's latest checkpoint; returns ``(record, report)``.

    ``record`` is ``{"experiment", "variant", "checkpoint_step", **evaluate(), **extra}`` and is
    written with :func:`write_results`. Pass ``experiment``/``state``/``step`` to skip the restore.
    """
    if experiment is None:
        experiment, state, step = restore_for_eval(spec, config, workdir)
    results = experiment.evaluate(state, workdir)
    if not isinstance(results, dict):
        raise TypeError(f"evaluate(): expected a dict, got {type(results).__name__}")
    record = {
        "experiment": spec.name,
        "variant": config.get("variant"),
        "checkpoint_step": step,
        **results,
        **(extra or {}),
    }
    return record, write_results(experiment, record, workdir)
