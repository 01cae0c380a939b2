"""Data: image I/O, dataset layouts, transforms, synthetic data and input pipelines. Names resolve lazily to keep ``import medjax.data`` cheap."""

import importlib

# public name -> module that defines it; add a line when you add a new public function.
_LAZY = {
    "Image": "medjax.data.io",
    "load_image": "medjax.data.io",
    "save_image": "medjax.data.io",
    "DataFileError": "medjax.data.io",
    "load_label": "medjax.data.io",
    "check_pair": "medjax.data.io",
    "load_record": "medjax.data.datasets",
    "split": "medjax.data.datasets",
    "kfold": "medjax.data.datasets",
    "make_iterator": "medjax.data.pipeline",
    "FunctionSource": "medjax.data.pipeline",
    "RecordSource": "medjax.data.pipeline",
    "synthetic_tasks": "medjax.data.tasks",
    "folder_tasks": "medjax.data.tasks",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"medjax.data.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"medjax.data.{name}":
            raise  # a real missing dependency inside the submodule
        raise AttributeError(f"module 'medjax.data' has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
