"""Every lazily exported name resolves, and missing names give the usual AttributeError."""

import importlib

import pytest

PACKAGES = ("medjax.data", "medjax.models", "medjax.nn", "medjax.train")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_lazy_name_resolves(package):
    module = importlib.import_module(package)
    for name, source in module._LAZY.items():
        assert getattr(module, name) is getattr(importlib.import_module(source), name)
        assert name in dir(module)


@pytest.mark.parametrize("package", PACKAGES + ("medjax",))
def test_unknown_name_is_an_attribute_error(package):
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_thing"):
        module.no_such_thing  # noqa: B018
