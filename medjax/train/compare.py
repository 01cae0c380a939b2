"""The one variant sweep: ``medjax compare EXPERIMENT --variant V --workdir W [--only a,b]``.

An experiment declares its comparison rows in ``config.py``::

    def compare_rows(variant):
        return {"a_joint": ("(a) joint", ["model.kind=joint"]), "f_identity": ("(f) identity", [...])}

Each row is the base variant's config plus the row's overrides (plus the command's own
``--config.KEY=VALUE``). It is trained with :func:`medjax.train.fit` in ``W/<variant>/<row>``
(rerun to resume: a finished row is neither retrained nor re-evaluated while its config and
checkpoint are unchanged; a row whose resolved config equals a finished row's takes that row's
results instead of training the same model twice, and one that differs from a trained row only in
evaluation settings (``eval.*``, e.g. test-time refinement) takes that row's checkpoints and is
evaluated with its own settings; another base variant works in another folder,
so it never reuses stale rows), evaluated with the experiment's ``evaluate``, and tabulated into ``W/compare.md`` with
``W/compare.json`` (row name -> that row's ``results.json`` content). The table is the
experiment's ``compare_table(rows)`` when it defines one, else the columns of its
``compare_columns`` (``[(header, results key[, digits])]``); its ``compare_figures(rows, W)``, when
defined, draws the comparison's figures.
"""

from __future__ import annotations

import json
import pathlib
import time

from medjax.evaluation.report import results_table
from medjax.train.config import EVAL_PREFIX, config_to_json, flat_dict, load_config
from medjax.train.logging import write_text_atomic

__all__ = ["compare", "rows_of", "select_rows"]


def rows_of(spec, variant) -> dict:
    """``{row: (label, overrides)}`` declared by the experiment's ``config.compare_rows(variant)``."""
    fn = getattr(spec.config_module, "compare_rows", None)
    if fn is None:
        raise ValueError(f"experiment {spec.name!r} declares no comparison (config.compare_rows)")
    rows = dict(fn(variant))
    if not rows:
        raise ValueError(f"experiment {spec.name!r}: compare_rows({variant!r}) is empty")
    return rows


def select_rows(rows: dict, only: str | None) -> list[str]:
    """Row names chosen by ``--only``: a comma list of row names, or of prefixes before ``_``
    (``s1`` picks ``s1_a`` and ``s1_b``); a full row name picks that row alone."""
    if not only:
        return list(rows)
    chosen = []
    for item in (s.strip() for s in only.split(",") if s.strip()):
        match = [item] if item in rows else [k for k in rows if k.split("_")[0] == item]
        if not match:
            raise ValueError(f"--only: {item!r} is not a row; the rows are {', '.join(rows)}")
        chosen += [m for m in match if m not in chosen]
    return chosen


def _reusable(path: pathlib.Path, config_dict: dict, step) -> dict | None:
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    # Exactly the same config and checkpoint: any change (evaluation settings included) re-evaluates.
    if old.get("checkpoint_step") != step or old.get("config") != config_dict:
        return None
    return old


def _twin(workdir: pathlib.Path, config_dict: dict) -> dict | None:
    """Results of another finished row of this comparison with exactly this config, if any."""
    for other in sorted(workdir.parent.glob("*/results.json")):
        if other.parent == workdir:
            continue
        try:
            res = json.loads(other.read_text())
        except json.JSONDecodeError:
            continue
        if res.get("config") == config_dict and "same_as" not in res:
            return res
    return None


def _training_of(config_dict: dict) -> dict:
    """The settings that make the trained model: every field but the evaluation-only ``eval.*``."""
    return {k: v for k, v in flat_dict(config_dict).items() if not k.startswith(EVAL_PREFIX)}


def _trained_twin(workdir: pathlib.Path, config_dict: dict, step: int) -> pathlib.Path | None:
    """Another row's work directory that trained this row's model to ``step`` (a config that
    differs at most in evaluation-only ``eval.*`` fields), if any."""
    mine = _training_of(config_dict)
    for other in sorted(workdir.parent.glob("*/config.json")):
        row = other.parent
        if row == workdir or not (row / "checkpoints" / str(step)).is_dir():
            continue
        try:
            theirs = json.loads(other.read_text())
        except json.JSONDecodeError:
            continue
        if _training_of(theirs) == mine:
            return row
    return None


def _copy_training(src: pathlib.Path, dst: pathlib.Path) -> None:
    """``src``'s checkpoints, metrics and timing into ``dst`` (hard links where the disk allows)."""
    import os
    import shutil

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src / "checkpoints", dst / "checkpoints", copy_function=link)
    for name in ("metrics.jsonl", "timing.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _run_row(spec, name, label, config, workdir, log):
    from medjax.train.loop import fit
    from medjax.train.workdir import evaluate_workdir, needs_training, restore_for_eval

    workdir.mkdir(parents=True, exist_ok=True)
    config_dict = json.loads(config_to_json(config))
    twin = None if (workdir / "checkpoints").is_dir() else _twin(workdir, config_dict)
    if twin is not None:  # the same config as a finished row: its results, not a second training
        log(f"same config as row {twin.get('row')!r}: reusing its results")
        record = {**twin, "row": name, "label": label, "same_as": twin.get("row")}
        write_text_atomic(
            workdir / "results.json", json.dumps(record, indent=2, default=str) + "\n"
        )
        return record
    experiment = spec.build(config)
    if needs_training(experiment) and not (workdir / "checkpoints").is_dir():
        trained = _trained_twin(workdir, config_dict, int(config.num_steps))
        if trained is not None:  # only evaluation settings differ: one training for both rows
            log(f"same training as {trained.name!r}: its checkpoints, this row's evaluation")
            _copy_training(trained, workdir)
    timing_path = workdir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    if needs_training(experiment):
        log(f"training {int(config.num_steps)} steps in {workdir}")
        _, summary = fit(experiment, config, workdir)
        if summary["step"] > summary["start_step"]:
            timing["train_wall_s"] = timing.get("train_wall_s", 0.0) + summary["wall_s"]
            timing["train_steps"] = int(summary["step"])
        step = int(summary["step"])
        if summary["interrupted"]:
            raise KeyboardInterrupt
    else:
        write_text_atomic(workdir / "config.json", config_to_json(config) + "\n")
        step = 0
    write_text_atomic(timing_path, json.dumps(timing))
    old = _reusable(workdir / "results.json", config_dict, step)
    if old is not None:
        log(f"reusing {workdir / 'results.json'}")
        return old
    log("evaluating")
    t0 = time.perf_counter()
    experiment, state, step = restore_for_eval(spec, config, workdir)
    extra = {
        "row": name,
        "label": label,
        "config": config_dict,
        "train_wall_s": timing.get("train_wall_s", 0.0 if not needs_training(experiment) else None),
    }
    record, _ = evaluate_workdir(
        spec, config, workdir, experiment=experiment, state=state, step=step, extra=extra
    )
    record["eval_wall_s"] = time.perf_counter() - t0
    write_text_atomic(workdir / "results.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


def compare(spec, variant, workdir, *, only=None, overrides=(), log=print) -> dict:
    """Train, evaluate and tabulate the experiment's comparison rows; returns ``{row: results}``.

    Writes ``workdir/compare.json`` and ``workdir/compare.md`` (and the experiment's comparison
    figures). See the module docstring.
    """
    variant = variant or getattr(spec.config_module, "VARIANTS", ("quick",))[0]
    rows = rows_of(spec, variant)
    names = select_rows(rows, only)
    root = pathlib.Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    t_all = time.perf_counter()
    for i, name in enumerate(names, 1):
        label, row_overrides = rows[name]
        log(f"[{i}/{len(names)}] {label}")
        config = load_config(
            spec.name,
            variant,
            list(row_overrides) + list(overrides),
            directory=spec.directory.parent,
        )
        t0 = time.perf_counter()
        results[name] = _run_row(
            spec, name, label, config, root / variant / name, lambda s: log("   " + s)
        )
        log(f"   done in {time.perf_counter() - t0:.0f} s")
    experiment = spec.build(
        load_config(spec.name, variant, list(overrides), directory=spec.directory.parent)
    )
    if hasattr(experiment, "compare_table"):
        table = experiment.compare_table(results)
    else:
        columns = getattr(experiment, "compare_columns", None) or [
            (k, k)
            for k, v in next(iter(results.values())).items()
            if isinstance(v, float) and not k.endswith("_std")
        ]
        table = results_table(results, columns, first_header="row")
    header = (
        f"{spec.name} comparison, variant {variant!r}"
        f"{', overrides ' + ' '.join(overrides) if overrides else ''}; "
        f"{len(results)} rows in {time.perf_counter() - t_all:.0f} s of this run"
    )
    write_text_atomic(root / "compare.md", f"{header}\n\n{table}\n")
    write_text_atomic(root / "compare.json", json.dumps(results, indent=2, default=str) + "\n")
    if hasattr(experiment, "compare_figures"):
        try:
            for path in experiment.compare_figures(results, root) or ():
                log(f"figure: {path}")
        except Exception as e:  # a figure must never lose the table
            log(f"compare figures failed: {type(e).__name__}: {e}")
    log("")
    log(header)
    log(table)
    log(f"\ntable: {root / 'compare.md'}; results: {root / 'compare.json'}")
    return results
