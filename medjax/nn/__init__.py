"""Reusable Flax linen blocks. Names resolve lazily to keep ``import medjax.nn`` cheap."""

from medjax._lazy import attach

# public name -> module that defines it; add a line when you add a block file.
_LAZY = {
    "ConvAct": "medjax.nn.blocks",
    "UpConvAct": "medjax.nn.blocks",
    "ResidualLevel": "medjax.nn.blocks",
    "ResidualUpLevel": "medjax.nn.blocks",
    "ResidualEncoder": "medjax.nn.blocks",
    "ResidualDecoder": "medjax.nn.blocks",
    "PatchConvTranspose": "medjax.nn.blocks",
    "fast_init": "medjax.nn.blocks",
    "conv_general_dilated": "medjax.nn.conv",
    "conv_transpose_patch": "medjax.nn.conv",
    "CrossConv": "medjax.nn.cross",
    "CrossBlock": "medjax.nn.cross",
    "CrossConv3D": "medjax.nn.cross",
    "CrossBlock3D": "medjax.nn.cross",
}

__getattr__, __dir__ = attach(__name__, _LAZY)
