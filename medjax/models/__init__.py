"""Published networks, one file each. Names resolve lazily to keep ``import medjax.models`` cheap."""

import importlib

# public name -> module that defines it; add a line when you add a model file.
_LAZY = {
    "VoxelMorph": "medjax.models.voxelmorph",
    "voxelmorph_loss": "medjax.models.voxelmorph",
    "JointRegSeg": "medjax.models.joint_regseg",
    "SegmentationNet": "medjax.models.joint_regseg",
    "joint_loss": "medjax.models.joint_regseg",
    "UniverSeg": "medjax.models.universeg",
    "UniverSeg3D": "medjax.models.universeg",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"medjax.models.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"medjax.models.{name}":
            raise  # a real missing dependency inside the submodule
        raise AttributeError(f"module 'medjax.models' has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
