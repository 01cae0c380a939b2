"""Warm start and partial restore: copy parameter subtrees from another state or work directory.

A *path* names a subtree by ``/``-separated keys through dicts and TrainState fields, e.g.
``"seg/params/group_1"`` or ``"dam/model_state/batch_stats/group_3"``. A *mapping* is
``{destination_path: source_path}``. :func:`copy_subtrees` copies each source subtree into the
destination, leaf for leaf, and refuses (``ValueError`` naming both paths) a subtree of another
structure or any leaf of another shape, so that a warm start never loads silently into the wrong
layer. :func:`load_workdir_state` reads the latest (or a given) checkpoint of another work
directory as a plain tree, optionally checking which experiment wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["copy_subtrees", "get_subtree", "load_workdir_state", "set_subtree", "warm_start"]


def _split(path):
    if not isinstance(path, str) or not path.strip("/"):
        raise ValueError(f"path: expected a '/'-separated subtree path, got {path!r}")
    return [p for p in path.split("/") if p]


def _child(node, key, path):
    if isinstance(node, Mapping):
        if key not in node:
            raise ValueError(f"path {path!r}: no entry {key!r} (entries: {sorted(map(str, node))})")
        return node[key]
    if dataclasses.is_dataclass(node) and key in {f.name for f in dataclasses.fields(node)}:
        return getattr(node, key)
    raise ValueError(f"path {path!r}: cannot step into {type(node).__name__} with {key!r}")


def get_subtree(tree, path):
    """The subtree of ``tree`` at ``path`` (dict keys and dataclass fields)."""
    node = tree
    for key in _split(path):
        node = _child(node, key, path)
    return node


def set_subtree(tree, path, value):
    """A copy of ``tree`` with the subtree at ``path`` replaced by ``value`` (the rest is shared)."""
    keys = _split(path)

    def rec(node, i):
        if i == len(keys):
            return value
        key = keys[i]
        child = _child(node, key, path)
        new = rec(child, i + 1)
        if isinstance(node, Mapping):
            return {**node, key: new}
        return (
            node.replace(**{key: new})
            if hasattr(node, "replace")
            else dataclasses.replace(node, **{key: new})
        )

    return rec(tree, 0)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def copy_subtrees(dst, src, mapping, *, src_name="source"):
    """``dst`` with each ``mapping`` destination subtree replaced by ``src``'s source subtree.

    Shapes and structure must match leaf by leaf; dtypes follow the destination. ``src_name``
    names the source in errors (e.g. a work directory).
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(
            f"mapping: expected a non-empty {{destination: source}} dict, got {mapping!r}"
        )
    for d_path, s_path in mapping.items():
        d_sub = get_subtree(dst, d_path)
        try:
            s_sub = get_subtree(src, s_path)
        except ValueError as e:
            raise ValueError(f"warm start from {src_name}: {e}") from None
        d_leaves, s_leaves = _leaves(d_sub), _leaves(s_sub)
        d_keys = [jax.tree_util.keystr(k) for k, _ in d_leaves]
        s_keys = [jax.tree_util.keystr(k) for k, _ in s_leaves]
        if d_keys != s_keys:
            missing = sorted(set(d_keys) - set(s_keys))
            extra = sorted(set(s_keys) - set(d_keys))
            raise ValueError(
                f"warm start: {src_name}:{s_path} does not have the layout of {d_path} "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        new_leaves = []
        for (k, d), (_, s) in zip(d_leaves, s_leaves, strict=True):
            if np.shape(d) != np.shape(s):
                raise ValueError(
                    f"warm start: {src_name}:{s_path}{jax.tree_util.keystr(k)} has shape "
                    f"{tuple(np.shape(s))}, {d_path}{jax.tree_util.keystr(k)} has "
                    f"{tuple(np.shape(d))}"
                )
            new_leaves.append(jnp.asarray(s, dtype=getattr(d, "dtype", None)))
        treedef = jax.tree_util.tree_structure(d_sub)
        dst = set_subtree(dst, d_path, jax.tree_util.tree_unflatten(treedef, new_leaves))
    return dst


def check_workdir_experiment(workdir, experiment):
    """Raises a one-line ``ValueError`` unless ``workdir`` is a run of ``experiment`` (its
    ``config.json``); cheap, so an experiment can check a warm-start folder before it builds."""
    workdir = pathlib.Path(workdir)
    cfg = workdir / "config.json"
    if not workdir.is_dir():
        raise ValueError(f"warm start: {workdir} is not a directory")
    try:
        saved = json.loads(cfg.read_text()).get("experiment") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"warm start: {cfg} is unreadable ({e})") from None
    if saved != experiment:
        what = f"a run of experiment {saved!r}" if saved else "no medjax run (no config.json)"
        raise ValueError(f"warm start: {workdir} holds {what}, expected {experiment!r}")


def load_workdir_state(workdir, *, step=None, experiment=None):
    """The train state of ``workdir``'s checkpoint ``step`` (default latest) as a plain tree.

    TrainStates come back as dicts of their fields (``params``, ``model_state``, ...). With
    ``experiment``, the work directory's ``config.json`` must name that experiment.
    """
    import orbax.checkpoint as ocp

    from medjax.train.checkpoint import _DropMessage, checkpoint_dir

    workdir = pathlib.Path(workdir)
    if experiment is not None:
        check_workdir_experiment(workdir, experiment)
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise ValueError(f"warm start: {workdir} has no checkpoints folder")
    quiet = _DropMessage("Given directory is read only")
    absl = logging.getLogger("absl")
    absl.addFilter(quiet)
    try:
        manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0
            ),
            item_names=("state", "data", "config", "loop"),
        )
        try:
            steps = sorted(manager.all_steps())
            if not steps:
                raise ValueError(f"warm start: {directory} holds no checkpoint")
            step = steps[-1] if step is None else int(step)
            if step not in steps:
                raise ValueError(f"warm start: {directory} has no step {step} (steps: {steps})")
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        finally:
            manager.close()
    finally:
        absl.removeFilter(quiet)
    return out.state


def warm_start(state, source, mapping, *, step=None, experiment=None):
    """``state`` with the ``mapping`` subtrees taken from ``source`` (a work directory or a tree).

    A work directory is read with :func:`load_workdir_state` (``step``, ``experiment`` as there).
    """
    if isinstance(source, str | pathlib.Path):
        tree = load_workdir_state(source, step=step, experiment=experiment)
        return copy_subtrees(state, tree, mapping, src_name=str(source))
    return copy_subtrees(state, source, mapping, src_name="source state")
