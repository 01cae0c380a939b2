"""Published networks, one file each. Names resolve lazily to keep ``import medjax.models`` cheap."""

from medjax._lazy import attach

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

__getattr__, __dir__ = attach(__name__, _LAZY)
