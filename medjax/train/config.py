"""Experiment configs: load ``get_config(variant)``, apply typed ``KEY=VALUE`` overrides, JSON round trip."""

from __future__ import annotations

import ast
import difflib
import json
import pathlib

import ml_collections

from medjax.train import experiment as _experiment
from medjax.train.logging import jsonable

__all__ = [
    "ConfigError",
    "REQUIRED_FIELDS",
    "apply_overrides",
    "config_from_json",
    "config_to_json",
    "flat_dict",
    "flat_keys",
    "load_config",
    "parse_value",
    "validate_config",
]

#: fields every experiment config must define (the engine reads them).
REQUIRED_FIELDS = ("seed", "num_steps", "batch_size", "checkpoint_every")
#: engine fields with defaults when a config leaves them out (so they can be overridden).
DEFAULT_FIELDS = {
    "log_every": 50,
    "eval_every": 0,
    "keep_checkpoints": 3,
    "keep_best": 1,
    "async_checkpoint": True,
    "tensorboard": True,
    "reduce_on_plateau": None,
    "early_stopping": None,
    # Refuse to resume a work directory whose checkpoint was trained with other settings.
    "resume_check": True,
}

#: Prefix of the evaluation-only settings (``eval.refine_steps``, ...): they never change a trained model.
EVAL_PREFIX = "eval."

#: Fields that may change between a run and its resumption (length, logging, bookkeeping), and
#: prefixes of evaluation-only settings; every other difference makes ``fit`` refuse to resume.
RESUMABLE_CHANGES = (
    "num_steps",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "keep_checkpoints",
    "keep_best",
    "async_checkpoint",
    "tensorboard",
    "resume_check",
    "early_stopping",
    EVAL_PREFIX,
)

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class ConfigError(ValueError):
    """A config key or value is wrong (unknown key, unparsable value, missing field)."""


def flat_keys(config, prefix="") -> list[str]:
    """All dotted keys of a (nested) ConfigDict, including the nested dicts themselves."""
    keys = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flat_keys(v, key + "."))
    return keys


def parse_value(text: str, current, *, key: str = "value"):
    """Parse ``text`` to the type of ``current`` (bool, int, float, str, tuple/list, None -> literal)."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--config.{key}: expected a bool (true/false), got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
            raise ConfigError(f"--config.{key}: expected an int, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a float, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, tuple | list):
        if text.strip() == "None":  # e.g. a crop back to "follow the data"
            return None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):  # bare words: a,b or (a, b) or [a, b]
            inner = text.strip().strip("()[]")
            value = tuple(s.strip() for s in inner.split(",") if s.strip())
        if not isinstance(value, tuple | list):
            value = (value,)
        return type(current)(value)
    if isinstance(current, ml_collections.ConfigDict | dict):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f"--config.{key}: expected a dict literal, got {text!r}")
        return value
    # None or another type: a Python literal when it parses, else the string itself.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _lookup(config, key: str):
    """Return (parent ConfigDict, last name) for a dotted key, or raise ConfigError with close matches."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            candidates = flat_keys(config)
            close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if is_last:
            return node, part
        node = node[part]
    raise AssertionError("unreachable")


def apply_overrides(config, overrides=()):
    """Return a copy of ``config`` with ``"KEY=VALUE"`` overrides applied (dotted keys, typed values)."""
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides: expected a sequence of 'KEY=VALUE' strings, got {overrides!r}"
        )
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=config.is_type_safe)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override: expected 'KEY=VALUE', got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        if key.startswith("config."):
            key = key[len("config.") :]
        parent, name = _lookup(config, key)
        value = parse_value(text, parent[name], key=key)
        try:
            with parent.unlocked():
                parent[name] = value
        except TypeError as e:
            raise ConfigError(f"--config.{key}: {e}") from None
    return config


def validate_config(config):
    """Check the engine fields (seed, num_steps, batch_size, checkpoint_every, ...); fill defaults."""
    missing = [k for k in REQUIRED_FIELDS if k not in config]
    if missing:
        raise ConfigError(f"config: missing required field(s) {', '.join(missing)}")
    with config.unlocked():
        for k, v in DEFAULT_FIELDS.items():
            if k not in config:
                config[k] = v
    for k in (
        "num_steps",
        "batch_size",
        "checkpoint_every",
        "log_every",
        "eval_every",
        "seed",
        "keep_checkpoints",
        "keep_best",
    ):
        v = config[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config.{k}: expected an int, got {v!r}")
        if k in ("batch_size", "log_every", "keep_checkpoints") and v < 1:
            raise ConfigError(f"config.{k}: expected >= 1, got {v}")
        if k in ("num_steps", "checkpoint_every", "eval_every", "keep_best") and v < 0:
            raise ConfigError(f"config.{k}: expected >= 0, got {v}")
    return config


def load_config(name: str, variant=None, overrides=(), *, directory=None):
    """Resolved ConfigDict of experiment ``name``: ``get_config(variant)`` + overrides.

    The result records ``experiment`` and ``variant`` (so ``medjax predict`` can rebuild it from
    ``workdir/config.json``). An unknown variant or key raises ``ConfigError``.
    """
    module = _experiment.load_config_module(name, directory)
    variants = tuple(getattr(module, "VARIANTS", ()))
    if variant is not None and variants and variant not in variants:
        raise ConfigError(
            f"variant: expected one of {', '.join(variants)} for experiment {name!r}, got {variant!r}"
        )
    config = module.get_config(variant)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"experiment {name!r}: get_config must return an ml_collections.ConfigDict, "
            f"got {type(config).__name__}"
        )
    with config.unlocked():
        config.experiment = name
        config.variant = variant
        for k, v in DEFAULT_FIELDS.items():
            if k not in config:
                config[k] = v
    config = apply_overrides(config, overrides)
    return validate_config(config)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """A nested dict (a config's JSON) as ``{"dotted.key": value}`` (an empty dict stays a value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """``"key: saved -> current"`` for every dotted key whose value differs (except RESUMABLE_CHANGES)."""
    a, b = flat_dict(jsonable(saved)), flat_dict(jsonable(current))
    free = tuple(r.rstrip(".") for r in RESUMABLE_CHANGES) + ("experiment",)
    changes = []
    for key in sorted(set(a) | set(b)):
        if any(key == r or key.startswith(r + ".") for r in free) or key.endswith(".num_steps"):
            continue  # a stage's length (stages.<name>.num_steps) may change like num_steps
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


def config_to_json(config) -> str:
    """JSON text of a resolved config (tuples become lists, other objects their ``str``)."""
    return json.dumps(jsonable(config.to_dict()), indent=2, sort_keys=True)


def _restore_types(saved, like):
    if isinstance(like, ml_collections.ConfigDict) and isinstance(saved, dict):
        for k, v in saved.items():
            if k in like:
                with like.unlocked():
                    like[k] = _restore_types(v, like[k])
            else:
                with like.unlocked():
                    like[k] = v
        return like
    if isinstance(like, tuple) and isinstance(saved, list):
        return tuple(saved)
    if isinstance(like, float) and isinstance(saved, int) and not isinstance(saved, bool):
        return float(saved)
    return saved


def config_from_json(source, *, directory=None):
    """Rebuild a saved config (``config.json`` path, JSON text or dict) with its original types.

    The experiment's ``get_config(variant)`` supplies the types (tuples stay tuples); the saved values win.
    """
    if isinstance(source, dict):
        saved = source
    else:
        p = pathlib.Path(source) if not str(source).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(source)
        saved = json.loads(text)
    name = saved.get("experiment")
    if not name:
        raise ConfigError("config.json: expected an 'experiment' entry, got none")
    base = load_config(name, saved.get("variant"), directory=directory)
    config = _restore_types(saved, base)
    return validate_config(config)
