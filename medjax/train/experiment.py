"""The experiment protocol: the ``Experiment`` base class and loading ``experiments/<name>/``.

An experiment folder holds ``config.py`` (``get_config(variant=None)`` and ``VARIANTS``) and ``task.py``
(an ``Experiment`` subclass). Folders are imported as packages under unique module names, so an
experiment may import its own sibling files relatively (``from .model import Net``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = [
    "Experiment",
    "Stage",
    "ExperimentNotFoundError",
    "ExperimentSpec",
    "find_experiments_dir",
    "list_experiments",
    "load_experiment",
    "scalar_table",
]

ENV_VAR = "MEDJAX_EXPERIMENTS_DIR"


class ExperimentNotFoundError(ValueError):
    """A named experiment does not exist (the message lists the available ones)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a staged training run (``Experiment.stages()``).

    ``step(state, batch) -> (state, metrics)`` is jitted once for the stage (like ``train_step``);
    ``num_steps`` steps run in the stage. ``iterator`` (``() -> iterator``, the data protocol) feeds
    it; None shares the experiment's ``train_iterator()`` across the stages that leave it None.
    ``enter(state) -> state`` runs once when the stage starts (e.g. copy the trained segmenter's
    early groups into the adaptation module); it must keep the state's structure, since every
    network's state, optimiser included, is created by ``init_state``. ``validate=False`` skips
    ``validate()`` during the stage.
    """

    name: str
    num_steps: int
    step: Callable
    iterator: Callable | None = None
    enter: Callable | None = None
    validate: bool = True


class Experiment:
    """Base class of an experiment's ``task.py``; the engine (``medjax.train.fit``) drives it.

    Subclasses implement ``init_state``, ``train_step``, ``train_iterator`` and ``evaluate``, and
    optionally ``prepare``, ``validate`` (with ``eval_metric``/``eval_mode``) and ``predict``.
    """

    #: name of the ``validate()`` entry used for best-checkpoint tracking and reduce-on-plateau.
    eval_metric: str | None = None
    #: ``"min"`` if a smaller ``eval_metric`` is better, ``"max"`` otherwise.
    eval_mode: str = "min"

    def __init__(self, config):
        self.config = config

    def prepare(self):
        """Optional: read and check the training data. ``fit`` calls it first, before the state is
        initialised or restored and before its first progress line, so that a bad folder is the
        first thing a user reads; ``eval`` and ``predict`` do not call it (a model restored for
        predict needs no training data, so ``init_state`` should not read it either)."""

    def init_state(self, rng):
        """Return the initial train state (a TrainState or a dict of them) from a raw PRNG key."""
        raise NotImplementedError(f"{type(self).__name__}.init_state is not implemented")

    def train_step(self, state, batch):
        """Pure step ``(state, batch) -> (state, metrics)``; ``metrics`` holds a scalar ``"loss"``."""
        raise NotImplementedError(f"{type(self).__name__}.train_step is not implemented")

    def stages(self):
        """Optional: the :class:`Stage` s of a staged run, in order (None: one stage of ``train_step``).

        The engine runs them one after another in one ``fit``; ``config.num_steps`` must equal the
        sum of their ``num_steps``. A run killed in any stage resumes in that stage.
        """
        return None

    def train_iterator(self):
        """Iterator of host-local batch dicts with ``get_state()``/``set_state(dict)``."""
        raise NotImplementedError(f"{type(self).__name__}.train_iterator is not implemented")

    def evaluate(self, state, workdir):
        """Host-side evaluation; returns a JSON-serialisable dict (written to results.json)."""
        raise NotImplementedError(f"{type(self).__name__}.evaluate is not implemented")

    def report(self, results) -> str:
        """Markdown summary of ``evaluate()``'s results: printed by ``medjax eval``, saved as results.md.

        The default lists the scalar entries; experiments override it with their own table.
        """
        return scalar_table(results)

    def validate(self, state):
        """Optional: validation metrics dict (host floats), run every ``eval_every`` steps."""
        raise NotImplementedError(f"{type(self).__name__}.validate is not implemented")

    def predict(self, state, inputs, out_dir):
        """Optional: write predictions for input files into ``out_dir``; returns the written paths."""
        raise NotImplementedError(f"{type(self).__name__}.predict is not implemented")

    def implements(self, method: str) -> bool:
        """Whether this experiment overrides the base class's ``method`` (e.g. ``"validate"``)."""
        return getattr(type(self), method, None) is not getattr(Experiment, method, None)


def scalar_table(results: dict) -> str:
    """Markdown table ``| key | value |`` of the int/float/str entries of ``results`` (others skipped)."""
    lines = ["| result | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            continue
        cell = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {cell} |")
    return "\n".join(lines)


def find_experiments_dir() -> pathlib.Path:
    """Folder of experiments: ``$MEDJAX_EXPERIMENTS_DIR``, else ``experiments/`` beside the package."""
    env = os.environ.get(ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser().resolve()
    return pathlib.Path(__file__).resolve().parents[2] / "experiments"


def _root(directory) -> pathlib.Path:
    return find_experiments_dir() if directory is None else pathlib.Path(directory).resolve()


def list_experiments(directory=None) -> list[str]:
    """Sorted names of the experiment folders (sub-folders with a ``config.py``)."""
    root = _root(directory)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and (p / "config.py").is_file() and not p.name.startswith(("_", "."))
    )


def _experiment_dir(name: str, directory=None) -> pathlib.Path:
    if not isinstance(name, str) or not name:
        raise ExperimentNotFoundError(f"name: expected a non-empty experiment name, got {name!r}")
    root = _root(directory)
    path = root / name
    if "/" in name or os.sep in name or not (path / "config.py").is_file():
        available = ", ".join(list_experiments(root)) or "none"
        raise ExperimentNotFoundError(
            f"unknown experiment {name!r} in {root}; available: {available}"
        )
    return path


def _package(path: pathlib.Path) -> str:
    """Import (once) the experiment folder as a package with a unique name; returns the name."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() else "_" for c in path.name)
    pkg = f"_medjax_experiment_{safe}_{digest}"
    if pkg not in sys.modules:
        init = path / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location(
                pkg, init, submodule_search_locations=[str(path)]
            )
        else:
            spec = importlib.util.spec_from_loader(pkg, loader=None, is_package=True)
            spec.submodule_search_locations = [str(path)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = module
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[pkg]
            raise
    return pkg


def load_config_module(name: str, directory=None) -> ModuleType:
    """The imported ``experiments/<name>/config.py`` module (without importing ``task.py``)."""
    path = _experiment_dir(name, directory)
    return importlib.import_module(_package(path) + ".config")


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """A loaded experiment folder: its config and task modules."""

    name: str
    directory: pathlib.Path
    config_module: ModuleType
    task_module: ModuleType

    @property
    def Experiment(self) -> type[Experiment]:  # noqa: N802 (mirrors the class name in task.py)
        """The ``Experiment`` subclass defined in ``task.py``."""
        return self.task_module.Experiment

    @property
    def variants(self) -> tuple[str, ...]:
        """The config's ``VARIANTS`` (empty when it defines none)."""
        return tuple(getattr(self.config_module, "VARIANTS", ()))

    @property
    def description(self) -> str:
        """First line of the config module's docstring."""
        return describe(self.config_module)

    def get_config(self, variant=None):
        """``config.get_config(variant)``."""
        return self.config_module.get_config(variant)

    def build(self, config) -> Experiment:
        """Instantiate the experiment for a resolved config."""
        return self.Experiment(config)


def describe(module: ModuleType) -> str:
    """First non-empty line of a module's docstring ('' when none)."""
    for line in (module.__doc__ or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def load_experiment(name: str, directory=None) -> ExperimentSpec:
    """Load ``<experiments>/<name>/config.py`` and ``task.py``; unknown names list the available ones."""
    path = _experiment_dir(name, directory)
    pkg = _package(path)
    config_module = importlib.import_module(pkg + ".config")
    if not (path / "task.py").is_file():
        raise ExperimentNotFoundError(f"experiment {name!r} has no task.py in {path}")
    task_module = importlib.import_module(pkg + ".task")
    cls = getattr(task_module, "Experiment", None)
    if not (isinstance(cls, type) and issubclass(cls, Experiment)):
        raise ExperimentNotFoundError(
            f"experiment {name!r}: task.py must define class Experiment(medjax.train.Experiment)"
        )
    return ExperimentSpec(name, path, config_module, task_module)
