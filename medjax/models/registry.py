"""The model registry: a network class by name, so that a config says ``model.name = "vnet"``.

``get(name)`` returns the class (case-insensitive; aliases such as the MedicalZoo registry keys
``"VNET2"`` or ``"DENSENET1"`` resolve too); an unknown name raises ``ValueError`` listing the known
ones. Each entry also records the keyword arguments of the network at its defaults and the example
input shapes used to count its parameters (``param_count``) without running it.
Modules are imported only when their model is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping

__all__ = ["ModelEntry", "entry", "get", "names", "param_count", "register"]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registered network: where it lives, its default arguments and example inputs."""

    name: str
    module: str
    cls: str
    #: keyword arguments of the network at its defaults (the original's factory call, for ports)
    defaults: Mapping = dataclasses.field(default_factory=dict)
    #: example input shapes (one per positional input), channels-last, for parameter counts
    inputs: tuple = ()
    aliases: tuple = ()
    description: str = ""

    def load(self):
        """The model class (imports its module)."""
        return getattr(importlib.import_module(self.module), self.cls)


_ENTRIES: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry`` to the registry (its name and aliases, case-insensitively); returns it."""
    key = entry.name.lower()
    keys = (key, *(a.lower() for a in entry.aliases))
    for k in keys:
        if k in _ALIASES and _ALIASES[k] != key:
            raise ValueError(f"name: {k!r} is already registered for {_ALIASES[k]!r}")
    _ALIASES.update(dict.fromkeys(keys, key))
    _ENTRIES[key] = entry
    return entry


def names() -> list[str]:
    """Registered model names (lower case, sorted)."""
    return sorted(_ENTRIES)


def entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of ``name`` (or an alias), case-insensitive."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected a model name, got {name!r}")
    key = _ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"name: unknown model {name!r}; known models: {', '.join(names())}")
    return _ENTRIES[key]


def get(name: str):
    """The model class registered as ``name`` (case-insensitive; aliases accepted)."""
    return entry(name).load()


def param_count(name: str, **overrides) -> int:
    """Number of trainable parameters of ``name`` at its defaults (plus ``overrides``).

    Counted on ``jax.eval_shape`` of ``init`` with the entry's example inputs: nothing is computed.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    e = entry(name)
    model = e.load()(**{**e.defaults, **overrides})
    inputs = [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in e.inputs]
    shapes = jax.eval_shape(lambda k, *a: model.init(k, *a), jax.random.key(0), *inputs)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes.get("params", {}))))


def _reg(name, module, cls, defaults, inputs, *, aliases=(), description=""):
    register(
        ModelEntry(
            name,
            f"medjax.models.{module}",
            cls,
            dict(defaults),
            tuple(inputs),
            tuple(aliases),
            description,
        )
    )


# -- registration and segmentation networks of the first systems
_reg(
    "JointRegSeg",
    "joint_regseg",
    "JointRegSeg",
    {"f": 8, "n_modalities": 4, "n_classes": 4},
    [(1, 32, 32, 32, 4)] * 2,
    aliases=("estienne2020",),
    description="Estienne 2020 joint registration + tumour segmentation",
)
_reg(
    "SegmentationNet",
    "joint_regseg",
    "SegmentationNet",
    {"f": 8, "n_modalities": 4, "n_classes": 4},
    [(1, 32, 32, 32, 4)],
    description="Estienne 2020's segmentation-only V-Net",
)
_reg(
    "VoxelMorph",
    "voxelmorph",
    "VoxelMorph",
    {"n_modalities": 1},
    [(1, 32, 32, 32, 1)] * 2,
    description="VoxelMorph-style U-Net registration",
)
_reg(
    "UniverSeg",
    "universeg",
    "UniverSeg",
    {},
    [(1, 64, 64, 1), (1, 2, 64, 64, 1), (1, 2, 64, 64, 1)],
    description="UniverSeg v1 in-context segmentation (2D)",
)
_reg(
    "SmallUNet",
    "small_unet",
    "SmallUNet",
    {},
    [(1, 64, 64, 1)],
    description="a small U-Net baseline (2D or 3D)",
)

# -- the MedicalZoo registry (factory defaults: in_channels=2, classes=4; aliases = original keys)
_ZOO = "MedicalZoo 3D model zoo"
_reg(
    "UNet3D",
    "unet3d",
    "UNet3D",
    {"in_channels": 2, "num_classes": 4},
    [(1, 32, 32, 32, 2)],
    aliases=("unet3d_isensee",),
    description=f"{_ZOO}: Isensee's modified 3D U-Net (UNET3D)",
)
_reg(
    "VNet",
    "vnet",
    "VNet",
    {"in_channels": 2, "num_classes": 4},
    [(1, 16, 16, 16, 2)],
    description=f"{_ZOO}: V-Net, PReLU (VNET)",
)
_reg(
    "VNetLight",
    "vnet",
    "VNetLight",
    {"in_channels": 2, "num_classes": 4},
    [(1, 16, 16, 16, 2)],
    aliases=("vnet2",),
    description=f"{_ZOO}: V-Net without the 256 level (VNET2)",
)
_reg(
    "HighResNet3D",
    "highresnet",
    "HighResNet3D",
    {"in_channels": 2, "num_classes": 4},
    [(1, 8, 8, 8, 2)],
    aliases=("highresnet",),
    description=f"{_ZOO}: dilated residual (HIGHRESNET)",
)
_reg(
    "ResNetMed3D",
    "resnet_med3d",
    "ResNetMed3D",
    {"in_channels": 2, "num_classes": 4},
    [(1, 8, 8, 8, 2)],
    description=f"{_ZOO}: MedicalNet ResNet-18 (RESNETMED3D)",
)
_reg(
    "Unet",
    "unet2d",
    "Unet",
    {"in_channels": 2, "num_classes": 4},
    [(1, 16, 16, 2)],
    aliases=("unet2d",),
    description=f"{_ZOO}: the 2D U-Net (UNET2D)",
)
_reg(
    "ResNet3dVAE",
    "resnet3d_vae",
    "ResNet3dVAE",
    {"in_channels": 2, "num_classes": 4, "dim": (32, 32, 32)},
    [(1, 32, 32, 32, 2)],
    description=f"{_ZOO}: Myronenko 2018 with its VAE branch (RESNET3DVAE)",
)

# -- PnP-AdaNet and FocusNetV2
_reg(
    "PnPAdaNet",
    "pnp_adanet",
    "PnPAdaNet",
    {},
    [(1, 256, 256, 3)],
    aliases=("pnp_adanet",),
    description="PnP-AdaNet dilated residual segmenter (2.5D, 3 slices)",
)
_reg(
    "PnPAdaNetCritic",
    "pnp_adanet",
    "PnPAdaNetCritic",
    {},
    [(1, 256, 256, 32)],
    description="PnP-AdaNet multi-level feature critic (DCM)",
)
_reg(
    "PnPAdaNetMaskCritic",
    "pnp_adanet",
    "PnPAdaNetMaskCritic",
    {},
    [(1, 256, 256, 5)],
    description="PnP-AdaNet critic on the segmentation logits",
)
_reg(
    "FocusNetV2",
    "focusnet",
    "FocusNetV2",
    {"sol": True, "sos": True},
    [(1, 40, 192, 192, 1)],
    aliases=("focusnet",),
    description="FocusNetV2: S-Net + SOL heatmaps + per-organ SOS crops",
)
_reg(
    "SNet",
    "focusnet",
    "FocusNetV2",
    {"sol": False, "sos": False},
    [(1, 8, 32, 32, 1)],
    aliases=("s_net",),
    description="FocusNetV2's S-Net alone",
)
_reg(
    "ConvAE",
    "focusnet",
    "ConvAE",
    {},
    [(1, 8, 64, 64, 1)],
    description="FocusNetV2's shape autoencoder (512-d latent, 8x64x64 masks)",
)
_reg(
    "SinglePathDenseNet",
    "densenet3d",
    "SinglePathDenseNet",
    {"in_channels": 2, "num_classes": 4},
    [(1, 4, 4, 4, 2)],
    aliases=("densenet1",),
    description=f"{_ZOO}: single-path 3D DenseNet (DENSENET1)",
)
_reg(
    "DualPathDenseNet",
    "densenet3d",
    "DualPathDenseNet",
    {"in_channels": 3, "num_classes": 4},
    [(1, 4, 4, 4, 3)],
    aliases=("densenet2",),
    description=f"{_ZOO}: dual-path 3D DenseNet (DENSENET2)",
)
_reg(
    "DualSingleDenseNet",
    "densenet3d",
    "DualSingleDenseNet",
    {"in_channels": 2, "num_classes": 4},
    [(1, 4, 4, 4, 2)],
    aliases=("densenet3",),
    description=f"{_ZOO}: dual-single 3D DenseNet (DENSENET3)",
)
_reg(
    "HyperDenseNet_2Mod",
    "hyperdensenet",
    "HyperDenseNet_2Mod",
    {"in_channels": 2, "num_classes": 4},
    [(1, 19, 19, 19, 2)],
    description=f"{_ZOO}: HyperDenseNet, two modalities (HYPERDENSENET, in=2)",
)
_reg(
    "HyperDenseNet",
    "hyperdensenet",
    "HyperDenseNet",
    {"in_channels": 3, "num_classes": 4},
    [(1, 19, 19, 19, 3)],
    description=f"{_ZOO}: HyperDenseNet, three modalities (HYPERDENSENET, in=3)",
)
_reg(
    "SkipDenseNet3D",
    "skipdensenet3d",
    "SkipDenseNet3D",
    {"in_channels": 2, "num_classes": 4},
    [(1, 16, 16, 16, 2)],
    description=f"{_ZOO}: SkipDenseNet3D (SKIPDENSENET3D)",
)
_reg(
    "DenseVoxelNet",
    "densevoxelnet",
    "DenseVoxelNet",
    {"in_channels": 2, "num_classes": 4},
    [(1, 8, 8, 8, 2)],
    description=f"{_ZOO}: DenseVoxelNet, two heads (DENSEVOXELNET)",
)
