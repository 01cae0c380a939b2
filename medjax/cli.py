"""The ``medjax`` command: train, evaluate and predict with an experiment, or list experiments.

    medjax train <experiment> --workdir DIR [--variant NAME] [--config.KEY=VALUE ...]
    medjax eval <experiment> --workdir DIR [--variant NAME] [--config.KEY=VALUE ...]
    medjax predict --workdir DIR <input files...> --out DIR [--refine N]
    medjax compare <experiment> --workdir DIR [--variant NAME] [--only a,b] [--config.KEY=VALUE ...]
    medjax list [--models]

Rerunning ``medjax train`` with the same work directory resumes from its latest checkpoint.
User errors (unknown experiment, config key or work directory, and every ``ValueError`` raised
while building, training, evaluating or predicting) print one line and exit with 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A user error reported as one line on stderr with exit code 2."""


def _parser():
    dist = argparse.ArgumentParser(add_help=False)
    g = dist.add_argument_group("multi-process (or MEDJAX_COORDINATOR/... or SLURM variables)")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)

    p = argparse.ArgumentParser(
        prog="medjax",
        description="Train, evaluate and apply medjax experiments.",
        epilog="Config overrides: --config.KEY=VALUE (dotted keys, typed like the config's field).",
    )
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    sub = p.add_subparsers(dest="command", metavar="{train,eval,predict,compare,list}")
    sub.required = True

    t = sub.add_parser("train", parents=[dist], help="train (or resume) an experiment")
    t.add_argument("experiment")
    t.add_argument("--workdir", required=True, help="output folder; rerun to resume")
    t.add_argument("--variant", default=None)

    e = sub.add_parser("eval", parents=[dist], help="evaluate the latest checkpoint of a workdir")
    e.add_argument("experiment")
    e.add_argument("--workdir", required=True)
    e.add_argument("--variant", default=None)

    r = sub.add_parser("predict", parents=[dist], help="predict input files with a trained workdir")
    r.add_argument("inputs", nargs="+", help="input image files")
    r.add_argument("--workdir", required=True)
    r.add_argument("--out", required=True, help="output folder for the predictions")
    r.add_argument(
        "--refine",
        type=int,
        default=0,
        help="registration: refine the network's field per pair for N steps (test-time optimisation)",
    )

    c = sub.add_parser(
        "compare",
        parents=[dist],
        help="train, evaluate and tabulate an experiment's comparison rows",
    )
    c.add_argument("experiment")
    c.add_argument(
        "--workdir",
        required=True,
        help="output folder (rows in WORKDIR/VARIANT/ROW); rerun to resume",
    )
    c.add_argument("--variant", default=None)
    c.add_argument("--only", default="", help="comma list of row names (or their letters)")

    ls = sub.add_parser("list", help="list the experiments with their variants (or the models)")
    ls.add_argument(
        "--models", action="store_true", help="list the registered networks with parameter counts"
    )
    return p


def _split_overrides(parser, extra):
    """``--config.a.b=1`` / ``--config.a.b 1`` -> ``["a.b=1"]``; anything else is an argparse error."""
    overrides, i = [], 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("--config."):
            key = item[len("--config.") :]
            if "=" in key:
                overrides.append(key)
            elif i + 1 < len(extra):
                overrides.append(f"{key}={extra[i + 1]}")
                i += 1
            else:
                raise UsageError(f"--config.{key}: expected a value (--config.{key}=VALUE)")
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra[i:])}")
        i += 1
    return overrides


def _init_distributed(args):
    from medjax.train.mesh import initialize_distributed

    initialize_distributed(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )


def _saved_config(workdir: pathlib.Path):
    path = workdir / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--workdir: {path} is not valid JSON ({e})") from None


def _existing_workdir(workdir: pathlib.Path):
    if not workdir.is_dir():
        raise UsageError(f"--workdir: expected an existing work directory, got {workdir}")
    ckpts = workdir / "checkpoints"
    if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
        raise UsageError(f"--workdir: expected a work directory with checkpoints, got {workdir}")


def _resolve_config(name, variant, overrides, workdir: pathlib.Path):
    """The saved config of ``workdir`` (same experiment) or a fresh one, with ``overrides`` applied."""
    from medjax.train.config import apply_overrides, config_from_json, load_config, validate_config

    saved = _saved_config(workdir)
    if saved is not None and saved.get("experiment") not in (None, name):
        raise UsageError(
            f"--workdir: {workdir} holds experiment {saved.get('experiment')!r}, "
            f"not {name!r}; use another work directory"
        )
    if saved is not None and (variant is None or variant == saved.get("variant")):
        config = config_from_json(saved)
        return validate_config(apply_overrides(config, overrides))
    return load_config(name, variant, overrides)


def _restore(spec, config, workdir):
    from medjax.train.workdir import restore_for_eval

    return restore_for_eval(spec, config, workdir)


def _train(args, overrides):
    from medjax.train.experiment import load_experiment

    workdir = pathlib.Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir: expected a directory, got the file {workdir}")
    # Rerunning in a work directory continues its saved config (plus these overrides), so a
    # resumed run never mixes two settings; fit() refuses overrides that change the training.
    config = _resolve_config(args.experiment, args.variant, overrides, workdir)
    _init_distributed(args)  # before the task module is imported: it may touch jax
    spec = load_experiment(args.experiment)
    from medjax.train.loop import fit

    _, summary = fit(spec.build(config), config, workdir)
    import jax

    if jax.process_index() == 0:
        metrics = " ".join(f"{k} {v:.4g}" for k, v in summary["metrics"].items())
        print(f"done: step {summary['step']}/{summary['num_steps']} {metrics} -> {workdir}")
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


def _eval(args, overrides):
    from medjax.train.experiment import load_experiment
    from medjax.train.workdir import evaluate_workdir, needs_training

    workdir = pathlib.Path(args.workdir)
    config = _resolve_config(args.experiment, args.variant, overrides, workdir)
    _init_distributed(args)
    spec = load_experiment(args.experiment)
    if needs_training(spec.build(config)):
        _existing_workdir(workdir)
    import jax

    record, report = evaluate_workdir(spec, config, workdir)
    if jax.process_index() == 0:
        print(report)
        print(f"\nresults:     {workdir / 'results.json'} (this table: {workdir / 'results.md'})")
        figures = sorted(
            p for p in workdir.rglob("*.png") if "checkpoints" not in p.relative_to(workdir).parts
        )
        if figures:
            folders = sorted({str(p.parent) for p in figures})
            print(f"figures:     {len(figures)} PNG in {', '.join(folders)}")
        print(f"checkpoint:  {workdir / 'checkpoints'} (step {record['checkpoint_step']})")
    return 0


def _compare(args, overrides):
    from medjax.train.compare import compare
    from medjax.train.experiment import load_experiment

    _init_distributed(args)
    spec = load_experiment(args.experiment)
    compare(
        spec,
        args.variant,
        pathlib.Path(args.workdir),
        only=args.only,
        overrides=overrides,
        log=lambda s: print(s, flush=True),
    )
    return 0


def _predict(args, overrides):
    from medjax.train.config import config_from_json
    from medjax.train.experiment import Experiment, load_experiment

    if overrides:
        raise UsageError(
            "predict: --config overrides are not accepted (the workdir's config is used)"
        )
    from medjax.train.workdir import needs_training

    workdir = pathlib.Path(args.workdir)
    if not workdir.is_dir():
        raise UsageError(f"--workdir: expected an existing work directory, got {workdir}")
    saved = _saved_config(workdir)
    if saved is None or not saved.get("experiment"):
        raise UsageError(f"--workdir: expected {workdir}/config.json naming the experiment")
    missing = [p for p in args.inputs if not pathlib.Path(p).is_file()]
    if missing:
        raise UsageError(f"inputs: expected existing files, missing {', '.join(missing)}")
    config = config_from_json(saved)
    _init_distributed(args)
    spec = load_experiment(saved["experiment"])
    if spec.Experiment.predict is Experiment.predict:
        raise UsageError(f"experiment {spec.name!r} does not implement predict")
    if needs_training(spec.build(config)):
        _existing_workdir(workdir)  # a trained model needs its checkpoints
    experiment, state, step = _restore(spec, config, workdir)
    options = {}
    if args.refine:
        import inspect

        if "refine" not in inspect.signature(experiment.predict).parameters:
            raise UsageError(
                f"predict: experiment {spec.name!r} has no test-time refinement (--refine)"
            )
        if args.refine < 0:
            raise UsageError(f"--refine: expected a number of steps >= 0, got {args.refine}")
        options["refine"] = args.refine
    written = experiment.predict(
        state, [pathlib.Path(p) for p in args.inputs], pathlib.Path(args.out), **options
    )
    for path in written or ():
        print(path)
    return 0


def _list(args, overrides):
    from medjax.train.experiment import (
        describe,
        find_experiments_dir,
        list_experiments,
        load_config_module,
    )

    if getattr(args, "models", False):
        return _list_models()
    names = list_experiments()
    if not names:
        print(f"no experiments found in {find_experiments_dir()}")
        return 0
    width = max(len(n) for n in names)
    for name in names:
        try:
            module = load_config_module(name)
            variants = ", ".join(getattr(module, "VARIANTS", ())) or "-"
            text = describe(module)
        except Exception as e:  # one broken experiment must not hide the others
            variants, text = "?", f"(config does not load: {type(e).__name__}: {e})"
        print(f"{name:<{width}}  [{variants}]  {text}")
    return 0


def _list_models():
    from medjax.models import registry

    names = registry.names()
    width = max(len(n) for n in names)
    print(f"{'name':<{width}}  {'parameters':>12}  class (aliases): description")
    for name in names:
        e = registry.entry(name)
        try:
            count = f"{registry.param_count(name):,}"
        except Exception as err:  # one broken model must not hide the others
            count = f"? ({type(err).__name__})"
        aliases = f" ({', '.join(e.aliases)})" if e.aliases else ""
        print(f"{name:<{width}}  {count:>12}  {e.cls}{aliases}: {e.description}")
    return 0


_COMMANDS = {
    "train": _train,
    "eval": _eval,
    "predict": _predict,
    "compare": _compare,
    "list": _list,
}


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _compilation_cache():
    """Use JAX's persistent compilation cache (a resumed run or a second variant starts without
    recompiling): ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``~/.cache/medjax/jax``
    (``$XDG_CACHE_HOME`` respected); ``MEDJAX_COMPILATION_CACHE=0`` turns it off."""
    import os

    if os.environ.get("MEDJAX_COMPILATION_CACHE", "1") == "0":
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return  # the user's (or JAX_COMPILATION_CACHE_DIR's) choice
    home = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    jax.config.update("jax_compilation_cache_dir", str(home / "medjax" / "jax"))


def main(argv=None) -> int:
    """Run the ``medjax`` command line; returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "eval", "predict", "compare"):
        _compilation_cache()
    try:
        overrides = _split_overrides(parser, extra)
        if args.command == "list" and overrides:
            raise UsageError("list: --config overrides are not accepted")
        return _COMMANDS[args.command](args, overrides)
    except KeyboardInterrupt:
        print("medjax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        from medjax.train.loop import NonFiniteLossError

        if isinstance(e, NonFiniteLossError | MemoryError):
            print(f"medjax: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_FAILED
        # Usage and config errors, bad data and every ValueError of building, training,
        # evaluating or predicting: one line (--debug shows the traceback).
        if isinstance(e, ValueError | FileNotFoundError):
            print(f"medjax: error: {_one_line(e)} (--debug for the traceback)", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
