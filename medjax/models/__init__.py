"""Published networks, one file each. Names resolve lazily to keep ``import medjax.models`` cheap.

``medjax.models.get(name)`` returns a registered network class by name (case-insensitive, see
:mod:`medjax.models.registry`); ``medjax.models.names()`` lists them.
"""

from medjax._lazy import attach

# public name -> module that defines it; add a line when you add a model file.
_LAZY = {
    "VoxelMorph": "medjax.models.voxelmorph",
    "JointRegSeg": "medjax.models.joint_regseg",
    "SegmentationNet": "medjax.models.joint_regseg",
    "UniverSeg": "medjax.models.universeg",
    "UniverSeg3D": "medjax.models.universeg",
    "SmallUNet": "medjax.models.small_unet",
    "UNet3D": "medjax.models.unet3d",
    "VNet": "medjax.models.vnet",
    "VNetLight": "medjax.models.vnet",
    "HighResNet3D": "medjax.models.highresnet",
    "ResNetMed3D": "medjax.models.resnet_med3d",
    "Unet": "medjax.models.unet2d",
    "ResNet3dVAE": "medjax.models.resnet3d_vae",
    "SinglePathDenseNet": "medjax.models.densenet3d",
    "DualPathDenseNet": "medjax.models.densenet3d",
    "DualSingleDenseNet": "medjax.models.densenet3d",
    "HyperDenseNet_2Mod": "medjax.models.hyperdensenet",
    "HyperDenseNet": "medjax.models.hyperdensenet",
    "SkipDenseNet3D": "medjax.models.skipdensenet3d",
    "DenseVoxelNet": "medjax.models.densevoxelnet",
    "PnPAdaNet": "medjax.models.pnp_adanet",
    "PnPAdaNetFront": "medjax.models.pnp_adanet",
    "PnPAdaNetBack": "medjax.models.pnp_adanet",
    "PnPAdaNetCritic": "medjax.models.pnp_adanet",
    "PnPAdaNetMaskCritic": "medjax.models.pnp_adanet",
    "FocusNetV2": "medjax.models.focusnet",
    "ConvAE": "medjax.models.focusnet",
    "get": "medjax.models.registry",
    "names": "medjax.models.registry",
    "param_count": "medjax.models.registry",
}

__getattr__, __dir__ = attach(__name__, _LAZY)
