"""Lazy attribute access for medjax's subpackages (PEP 562), so that ``import medjax.x`` stays cheap."""

import importlib


def attach(package, names):
    """Return ``(__getattr__, __dir__)`` for ``package``.

    ``names`` maps a public name to the module that defines it. Any other attribute is tried as a
    submodule ``package.<name>``; a ModuleNotFoundError raised *inside* an existing submodule (a real
    missing dependency) propagates unchanged instead of turning into an AttributeError.
    """

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    def __dir__():
        module = importlib.import_module(package)
        return sorted(set(vars(module)) | set(names))

    return __getattr__, __dir__
