"""medjax: pure-functional JAX/Flax medical image segmentation and registration.

Subpackages are imported lazily so that ``import medjax`` stays cheap:
``medjax.ops``, ``medjax.losses``, ``medjax.metrics``, ``medjax.nn``, ``medjax.models``,
``medjax.data``, ``medjax.inference``, ``medjax.evaluation``, ``medjax.figures``, ``medjax.train``.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "ops",
    "losses",
    "metrics",
    "nn",
    "models",
    "data",
    "inference",
    "evaluation",
    "figures",
    "train",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"medjax.{name}")
    raise AttributeError(f"module 'medjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
