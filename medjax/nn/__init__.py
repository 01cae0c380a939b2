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
    "ConvNormAct": "medjax.nn.blocks",
    "ResidualBlock": "medjax.nn.blocks",
    "SqueezeExcitation": "medjax.nn.blocks",
    "pad_channels": "medjax.nn.blocks",
    "DenseLayer": "medjax.nn.dense",
    "DenseBlock": "medjax.nn.dense",
    "Transition": "medjax.nn.dense",
    "DenseASPP": "medjax.nn.dense",
    "Conv": "medjax.nn.layers",
    "ConvTranspose": "medjax.nn.layers",
    "PReLU": "medjax.nn.layers",
    "Dropout": "medjax.nn.layers",
    "Upsample": "medjax.nn.layers",
    "upsample": "medjax.nn.layers",
    "leaky_relu": "medjax.nn.layers",
    "apply_act": "medjax.nn.layers",
    "max_pool": "medjax.nn.layers",
    "avg_pool": "medjax.nn.layers",
    "BatchNorm": "medjax.nn.norm",
    "InstanceNorm": "medjax.nn.norm",
    "GroupNorm": "medjax.nn.norm",
    "NoNorm": "medjax.nn.norm",
    "make_norm": "medjax.nn.norm",
    "conv_general_dilated": "medjax.nn.conv",
    "conv_transpose_patch": "medjax.nn.conv",
    "CrossConv": "medjax.nn.cross",
    "CrossBlock": "medjax.nn.cross",
    "CrossConv3D": "medjax.nn.cross",
    "CrossBlock3D": "medjax.nn.cross",
}

__getattr__, __dir__ = attach(__name__, _LAZY)
