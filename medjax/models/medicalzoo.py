"""The MedicalZoo registry keys and the one entry point to import an original MedicalZoo checkpoint.

``load_pytorch_weights(name, path_or_state_dict, **model_kwargs) -> variables`` takes the
original's registry key (``UNET3D``, ``VNET``, ``VNET2``, ``DENSENET1``-``DENSENET3``,
``HYPERDENSENET`` (2 or 3 modalities, read from the keys), ``SKIPDENSENET3D``, ``DENSEVOXELNET``,
``RESNET3DVAE``, ``RESNETMED3D``, ``HIGHRESNET``, ``UNET2D``) and a ``.pt`` file (read with
``torch.load(weights_only=True)``), an ``.npz`` of the same keys, or a mapping. The network's
settings (channels, classes, and the like) are read from the checkpoint's shapes unless given;
the result is ``{"params", ["batch_stats"]}`` for ``network_class(name)(**settings)``. A checkpoint
that does not fit the network raises ``ValueError`` naming the first missing, unexpected or
mis-shaped key with both shapes.
"""

from __future__ import annotations

import importlib

__all__ = ["KEYS", "load_pytorch_weights", "network_class"]

#: original registry key -> (medjax module, class or None when the loader picks it, loader kwargs)
KEYS = {
    "UNET3D": ("unet3d", "UNet3D", {}),
    "VNET": ("vnet", "VNet", {"light": False}),
    "VNET2": ("vnet", "VNetLight", {"light": True}),
    "DENSENET1": ("densenet3d", "SinglePathDenseNet", {"network": "SinglePathDenseNet"}),
    "DENSENET2": ("densenet3d", "DualPathDenseNet", {"network": "DualPathDenseNet"}),
    "DENSENET3": ("densenet3d", "DualSingleDenseNet", {"network": "DualSingleDenseNet"}),
    "HYPERDENSENET": ("hyperdensenet", None, {}),
    "SKIPDENSENET3D": ("skipdensenet3d", "SkipDenseNet3D", {}),
    "DENSEVOXELNET": ("densevoxelnet", "DenseVoxelNet", {}),
    "RESNET3DVAE": ("resnet3d_vae", "ResNet3dVAE", {}),
    "RESNETMED3D": ("resnet_med3d", "ResNetMed3D", {}),
    "HIGHRESNET": ("highresnet", "HighResNet3D", {}),
    "UNET2D": ("unet2d", "Unet", {}),
}


def _key(name):
    key = str(name).upper()
    if key not in KEYS:
        raise ValueError(
            f"name: unknown MedicalZoo model {name!r}; expected one of {', '.join(KEYS)}"
        )
    return key


def network_class(name, *, in_channels=None):
    """The medjax class of a MedicalZoo key (``HYPERDENSENET`` needs ``in_channels``: 2 or 3)."""
    module, cls, _ = KEYS[_key(name)]
    if cls is None:
        if in_channels not in (2, 3):
            raise ValueError(
                f"in_channels: HYPERDENSENET is HyperDenseNet_2Mod (2) or HyperDenseNet (3), got {in_channels}"
            )
        cls = "HyperDenseNet_2Mod" if in_channels == 2 else "HyperDenseNet"
    return getattr(importlib.import_module(f"medjax.models.{module}"), cls)


def load_pytorch_weights(name, path_or_state_dict, **model_kwargs):
    """Flax variables from an original MedicalZoo checkpoint of registry key ``name`` (module docstring)."""
    from medjax.models.torch_import import read_state_dict

    module, _, kwargs = KEYS[_key(name)]
    sd = read_state_dict(path_or_state_dict)
    loader = importlib.import_module(f"medjax.models.{module}").load_torch_state_dict
    return loader(sd, **{**kwargs, **model_kwargs})
