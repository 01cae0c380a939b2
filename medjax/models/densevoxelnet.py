"""MedicalZoo's DenseVoxelNet (``DenseVoxelNet.py``; Yu et al., MICCAI 2017).

Main path: ``conv_init`` (1^3 conv, **stride 2**, no bias, -> 16), ``dense_1`` (12 layers of BN,
ReLU, 3^3 conv to 12 without bias, dropout, ``[x, new]``: 16 -> 160), ``trans`` (BN, ReLU, 1^3
conv 160 -> 160 with a bias, giving ``k``; then 2^3 max pooling), ``dense_2`` (160 -> 304) and
``up_block`` (BN, ReLU, 1^3 conv 304 -> 304 without bias, then transposed convs 2^3 stride 2 to
128 and to 64, with biases and no activation between them). Auxiliary path: ``transpose``
(transposed conv 2^3 stride 2, 160 -> 64) of ``k``. **One** ``conv_final`` (1^3, 64 -> classes,
no bias) classifies both, as the original (``DenseVoxelNet.py:132,136``).

``(B, D, H, W, in_channels) -> (y1, y2)``, both ``(B, D, H, W, num_classes)`` logits (main and
auxiliary); D, H, W multiples of 4.

How it differs from the original, and why:

- A spatial size that is not a multiple of 4 raises ``ValueError``: the original runs on it but
  returns another size (3^3 gives 4^3). An input whose channels differ from ``in_channels``
  raises ``ValueError`` too.
- The dense layers' dropout rate (0.2, element-wise) is the field ``drop_rate``; it runs only
  with ``train=True`` and needs the ``"dropout"`` rng. The original applies it **twice** to each
  layer's new features (its ``_DenseLayer`` is an ``nn.Sequential`` that registers
  ``drop_layer`` as a child, so the Sequential's forward runs it and ``forward`` runs it again:
  zeroed with probability 1 - 0.8^2 = 0.36, survivors scaled by 1/0.64). ``dropout_twice=True``
  (the default) keeps that; ``False`` drops once.
- Initialisation is Flax's defaults, not the original's N(0, 0.01) (its ``init_weights`` is never
  applied by the model); imported weights replace it.

1,783,296 parameters at the factory's settings (2 channels, 4 classes); 1,783,216 at the class's
defaults (1 channel, 3 classes), the original's counts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models._medzoo import DenseBlock, batch_norm, load
from medjax.models.torch_import import read_state_dict
from medjax.nn.blocks import ConvNormAct
from medjax.nn.layers import Conv, ConvTranspose, max_pool
from medjax.nn.norm import BatchNorm

__all__ = ["DenseVoxelNet", "load_torch_state_dict", "torch_spec"]

Dtype = Any

INIT_FEATURES = 16
NUM_LAYERS = 12
GROWTH = 12
UP_FEATURES = (128, 64)
#: input spatial sizes must be multiples of this (stride-2 conv_init, then 2^3 pooling).
SIZE_MULTIPLE = 4


class _Upsampling(nn.Module):
    """BN, ReLU, 1^3 conv (no bias), then transposed convs 2^3 stride 2 to 128 and 64 (biases)."""

    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="norm")(x, train=train))
        x = Conv(x.shape[-1], 1, padding=0, use_bias=False, dtype=self.dtype, name="conv")(x)
        x = ConvTranspose(UP_FEATURES[0], 2, 2, dtype=self.dtype, name="transp_conv_1")(x)
        return ConvTranspose(UP_FEATURES[1], 2, 2, dtype=self.dtype, name="transp_conv_2")(x)


class DenseVoxelNet(nn.Module):
    """DenseVoxelNet: ``(B, D, H, W, in_channels) -> (y1, y2)``, both ``(B, D, H, W, num_classes)``.

    Submodules ``conv_init``, ``dense_1``/``dense_2`` (layers ``layer_i``), ``trans`` (``norm``,
    ``conv``), ``up_block`` (``norm``, ``conv``, ``transp_conv_1``, ``transp_conv_2``),
    ``transpose`` and the shared ``conv_final``. See the module docstring. ``axis_name``
    (medjax; default None) synchronises every BatchNorm over a ``pmap`` axis.
    """

    in_channels: int = 2
    num_classes: int = 4
    drop_rate: float = 0.2
    dropout_twice: bool = True
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if x.ndim != 5:
            raise ValueError(
                f"x: DenseVoxelNet expects (B, D, H, W, C), got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x: DenseVoxelNet was built for in_channels={self.in_channels}, got {x.shape[-1]}"
            )
        if any(s % SIZE_MULTIPLE for s in x.shape[1:4]):
            raise ValueError(
                f"x: DenseVoxelNet needs spatial sizes that are multiples of {SIZE_MULTIPLE} (else "
                f"its outputs have another size), got {tuple(x.shape[1:4])}"
            )

        def dense(name):
            return DenseBlock(
                NUM_LAYERS,
                GROWTH,
                drop_rate=self.drop_rate,
                dropout_twice=self.dropout_twice,
                dtype=self.dtype,
                norm=batch_norm(self.axis_name),
                name=name,
            )

        x = Conv(
            INIT_FEATURES,
            1,
            strides=2,
            padding=0,
            use_bias=False,
            dtype=self.dtype,
            name="conv_init",
        )(x)
        x = dense("dense_1")(x, train)
        k = ConvNormAct(
            x.shape[-1],
            1,
            padding=0,
            use_bias=True,
            norm=batch_norm(self.axis_name),
            order="pre",
            dtype=self.dtype,
            name="trans",
        )(x, train)
        x = dense("dense_2")(max_pool(k, 2), train)
        x = _Upsampling(self.dtype, self.axis_name, name="up_block")(x, train)
        conv_final = Conv(
            self.num_classes, 1, padding=0, use_bias=False, dtype=self.dtype, name="conv_final"
        )
        t = ConvTranspose(UP_FEATURES[1], 2, 2, dtype=self.dtype, name="transpose")(k)
        return conv_final(x), conv_final(t)


# ------------------------------------------------------------------------------------------------
# The original's PyTorch checkpoints


def torch_spec(model: DenseVoxelNet) -> list[tuple[str, str, str]]:
    """The ``(flax_path, torch_prefix, kind)`` spec of the original's ``state_dict``.

    ``conv_init``, ``dense_{1,2}.denselayer<j>.norm1/conv1``, ``trans.conv.0`` (BN) and
    ``trans.conv.2`` (conv), ``up_block.norm/conv/transp_conv_1/transp_conv_2``, ``transpose``,
    ``conv_final``.
    """
    if not isinstance(model, DenseVoxelNet):
        raise ValueError(f"model: expected a DenseVoxelNet, got {type(model).__name__}")
    spec = [("conv_init", "conv_init", "conv")]
    for block in ("dense_1", "dense_2"):
        if block == "dense_2":
            spec += [
                ("trans/norm", "trans.conv.0", "batch_norm"),
                ("trans/conv", "trans.conv.2", "conv"),
            ]
        for j in range(NUM_LAYERS):
            f, t = f"{block}/layer_{j}/layer", f"{block}.denselayer{j + 1}"
            spec += [(f"{f}/norm", f"{t}.norm1", "batch_norm"), (f"{f}/conv", f"{t}.conv1", "conv")]
    spec += [
        ("up_block/norm", "up_block.norm", "batch_norm"),
        ("up_block/conv", "up_block.conv", "conv"),
        ("up_block/transp_conv_1", "up_block.transp_conv_1", "conv_transpose"),
        ("up_block/transp_conv_2", "up_block.transp_conv_2", "conv_transpose"),
        ("transpose", "transpose", "conv_transpose"),
        ("conv_final", "conv_final", "conv"),
    ]
    return spec


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` from an original DenseVoxelNet checkpoint.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path (``module.`` prefixes stripped).
    ``in_channels`` (``conv_init``'s input width) and ``num_classes`` (``conv_final``'s rows) are
    read from the shapes when not given. A missing, unexpected or mis-shaped key raises
    ``ValueError`` naming it.
    """
    sd = read_state_dict(state_dict)
    kw = dict(model_kwargs)
    for field, key, axis in (
        ("in_channels", "conv_init.weight", 1),
        ("num_classes", "conv_final.weight", 0),
    ):
        if field not in kw:
            if key not in sd:
                raise ValueError(
                    f"state_dict: missing key {key} (expected a DenseVoxelNet checkpoint)"
                )
            kw[field] = sd[key].shape[axis]
    model = DenseVoxelNet(**kw)
    return load(model, sd, torch_spec(model), (1,) + (SIZE_MULTIPLE,) * 3 + (model.in_channels,))
