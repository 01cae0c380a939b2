"""Reusable Flax linen blocks. Names resolve lazily to keep ``import medjax.nn`` cheap."""

import importlib

# public name -> module that defines it; add a line when you add a block file.
_LAZY = {
    "ConvAct": "medjax.nn.blocks",
    "UpConvAct": "medjax.nn.blocks",
    "ResidualLevel": "medjax.nn.blocks",
    "ResidualUpLevel": "medjax.nn.blocks",
    "ResidualEncoder": "medjax.nn.blocks",
    "ResidualDecoder": "medjax.nn.blocks",
    "fast_init": "medjax.nn.blocks",
    "CrossConv": "medjax.nn.cross",
    "CrossBlock": "medjax.nn.cross",
    "CrossConv3D": "medjax.nn.cross",
    "CrossBlock3D": "medjax.nn.cross",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"medjax.nn.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"medjax.nn.{name}":
            raise  # a real missing dependency inside the submodule
        raise AttributeError(f"module 'medjax.nn' has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
