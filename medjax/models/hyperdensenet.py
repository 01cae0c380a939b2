"""MedicalZoo's HyperDenseNet (``HyperDensenet.py``; Dolz et al., IEEE TMI 2018): 2 and 3 modalities.

One path per modality, each a stack of nine unpadded 3^3 units (BN, PReLU, conv with a bias; the
first unit has no BN and applies its PReLU to the raw modality), densely connected *across* paths:
the input of unit k+1 of a path is ``[crop(input_k), out_k of this path, out_k of the other paths
in the order top, (middle,) bottom]``, where ``crop`` removes the voxel each unit loses per side.
The first concatenation is ``[y1 of this path, y1 of the others in that order]``. The per-path
outputs are concatenated (top, (middle,) bottom) and go through ``fully_1`` (-> 400),
``fully_2`` (-> 200), ``fully_3`` (-> 150) and ``final`` (-> classes): 1^3 convs with biases and
**no nonlinearity between them**, as the original (``HyperDensenet.py:408-412``).

``(B, D, H, W, C) -> (B, D - 18, H - 18, W - 18, num_classes)`` logits; every spatial size must be
at least 19.

How it differs from the original, and why:

- The original's ``croppCenter`` computes the border from axis D only (``:237-245``); every axis
  shrinks by 2 per unit, so cropping one voxel per side of every axis is the same thing.
- Each unit's ``nn.Dropout(p=0.0)`` (the original never passes another rate) is the identity and
  is not built. The forward's shape print is dropped.
- The original asserts ``in_channels`` (2 or 3) at construction and crashes deep inside on a
  small input; here a wrong ``in_channels``, an input with other channels, a spatial size below
  19 or a non-3D input raise ``ValueError`` naming the constraint.
- ``axis_name`` (medjax; default None) synchronises every BatchNorm over a ``pmap`` axis; None
  keeps the network, and its parameter tree, as the original.

Parameter counts (4 classes): HyperDenseNet_2Mod 10,361,922; HyperDenseNet 23,173,431 (the
original's, nothing dead).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from medjax.models._medzoo import load
from medjax.models.torch_import import read_state_dict
from medjax.nn.layers import Conv, PReLU
from medjax.nn.norm import BatchNorm

__all__ = [
    "HyperDenseNet",
    "HyperDenseNet_2Mod",
    "MIN_SIZE",
    "load_torch_state_dict",
    "torch_spec",
]

Dtype = Any

#: output channels of the nine units of a path.
GROWTHS = (25, 25, 25, 50, 50, 50, 75, 75, 75)
HEAD_WIDTHS = (400, 200, 150)
#: smallest spatial size (each of the nine unpadded 3^3 units removes 2 voxels per axis).
MIN_SIZE = 2 * len(GROWTHS) + 1


class _Unit(nn.Module):
    """The original's ``convBlock``: (BN ->) PReLU (one slope) -> unpadded 3^3 conv with a bias."""

    features: int
    batch_norm: bool
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.batch_norm:
            x = BatchNorm(axis_name=self.axis_name, name="norm")(x, train=train)
        x = PReLU(channelwise=False, name="act")(x)
        return Conv(self.features, 3, padding="VALID", dtype=self.dtype, name="conv")(x)


def _crop(x):
    return x[:, 1:-1, 1:-1, 1:-1, :]


class _HyperDense(nn.Module):
    """Shared body of the 2- and 3-path networks; ``PATHS`` names the paths in order."""

    PATHS: ClassVar[tuple[str, ...]] = ()

    in_channels: int
    num_classes: int = 4
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        name, n = type(self).__name__, len(self.PATHS)
        if self.in_channels != n:
            other = {2: "HyperDenseNet_2Mod", 3: "HyperDenseNet"}.get(self.in_channels)
            hint = f"; use {other}" if other else " (only 2 or 3 modalities are defined)"
            raise ValueError(
                f"in_channels: {name} takes exactly {n} modalities, got {self.in_channels}{hint}"
            )
        if x.ndim != 5:
            raise ValueError(f"x: {name} expects (B, D, H, W, C), got shape {tuple(x.shape)}")
        if x.shape[-1] != n:
            raise ValueError(
                f"x: {name} expects {n} channels (one per modality), got {x.shape[-1]}"
            )
        if min(x.shape[1:4]) < MIN_SIZE:
            raise ValueError(
                f"x: {name} needs every spatial size >= {MIN_SIZE} (nine unpadded 3^3 convs "
                f"remove 18 voxels per axis), got {tuple(x.shape[1:4])}"
            )
        # inputs[p]: the input of path p's current unit; outs[p]: that unit's output.
        outs = [
            _Unit(GROWTHS[0], False, self.dtype, self.axis_name, name=f"conv1_{path}")(
                x[..., p : p + 1], train
            )
            for p, path in enumerate(self.PATHS)
        ]
        inputs = [jnp.concatenate([outs[p]] + outs[:p] + outs[p + 1 :], -1) for p in range(n)]
        for k, growth in enumerate(GROWTHS[1:], start=2):
            outs = [
                _Unit(growth, True, self.dtype, self.axis_name, name=f"conv{k}_{path}")(
                    inputs[p], train
                )
                for p, path in enumerate(self.PATHS)
            ]
            inputs = [
                jnp.concatenate([_crop(inputs[p]), outs[p]] + outs[:p] + outs[p + 1 :], -1)
                for p in range(n)
            ]
        y = jnp.concatenate(inputs, -1)
        for i, width in enumerate(HEAD_WIDTHS, start=1):
            y = Conv(width, 1, padding=0, dtype=self.dtype, name=f"fully_{i}")(y)
        return Conv(self.num_classes, 1, padding=0, dtype=self.dtype, name="final")(y)


class HyperDenseNet_2Mod(_HyperDense):  # noqa: N801 (the original's name)
    """HyperDenseNet, 2 modalities: ``(B, D, H, W, 2) -> (B, D - 18, H - 18, W - 18, num_classes)``.

    Paths ``Top`` (channel 0) and ``Bottom`` (channel 1); submodules ``conv{k}_{Top,Bottom}``
    (``norm``, ``act``, ``conv``), ``fully_1..3``, ``final``. See the module docstring.
    """

    PATHS: ClassVar[tuple[str, ...]] = ("Top", "Bottom")

    in_channels: int = 2


class HyperDenseNet(_HyperDense):
    """HyperDenseNet, 3 modalities: ``(B, D, H, W, 3) -> (B, D - 18, H - 18, W - 18, num_classes)``.

    Paths ``Top``, ``Middle``, ``Bottom`` (channels 0, 1, 2); each puts its own features first,
    then the others in that order. Submodules as :class:`HyperDenseNet_2Mod`.
    """

    PATHS: ClassVar[tuple[str, ...]] = ("Top", "Middle", "Bottom")

    in_channels: int = 3


# ------------------------------------------------------------------------------------------------
# The original's PyTorch checkpoints


def torch_spec(model) -> list[tuple[str, str, str]]:
    """The ``(flax_path, torch_prefix, kind)`` spec of the original's ``state_dict``.

    ``conv1_<Path>.0`` (PReLU) and ``.2`` (conv); ``conv<k>_<Path>.0`` (BN), ``.1`` (PReLU), ``.3``
    (conv) for k >= 2; ``fully_1..3`` and ``final``.
    """
    if not isinstance(model, _HyperDense):
        raise ValueError(f"model: expected a HyperDenseNet, got {type(model).__name__}")
    spec = []
    for path in model.PATHS:
        spec += [
            (f"conv1_{path}/act", f"conv1_{path}.0", "prelu"),
            (f"conv1_{path}/conv", f"conv1_{path}.2", "conv"),
        ]
        for k in range(2, len(GROWTHS) + 1):
            u = f"conv{k}_{path}"
            spec += [
                (f"{u}/norm", f"{u}.0", "batch_norm"),
                (f"{u}/act", f"{u}.1", "prelu"),
                (f"{u}/conv", f"{u}.3", "conv"),
            ]
    spec += [(f"fully_{i}", f"fully_{i}", "conv") for i in (1, 2, 3)]
    return spec + [("final", "final", "conv")]


def load_torch_state_dict(state_dict, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` from an original HyperDenseNet checkpoint.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path (``module.`` prefixes stripped).
    ``in_channels`` (2 if there is no ``conv1_Middle``, else 3) and ``num_classes`` (``final``'s
    rows) are read from the keys when not given; the network is :class:`HyperDenseNet_2Mod` for 2
    and :class:`HyperDenseNet` for 3. A missing, unexpected or mis-shaped key raises
    ``ValueError`` naming it.
    """
    sd = read_state_dict(state_dict)
    kw = dict(model_kwargs)
    kw.setdefault("in_channels", 3 if any(k.startswith("conv1_Middle.") for k in sd) else 2)
    if "num_classes" not in kw:
        if "final.weight" not in sd:
            raise ValueError(
                "state_dict: missing key final.weight (expected a HyperDenseNet checkpoint)"
            )
        kw["num_classes"] = sd["final.weight"].shape[0]
    if kw["in_channels"] not in (2, 3):
        raise ValueError(
            f"in_channels: HyperDenseNet takes 2 or 3 modalities, got {kw['in_channels']}"
        )
    model = (HyperDenseNet_2Mod if kw["in_channels"] == 2 else HyperDenseNet)(**kw)
    return load(model, sd, torch_spec(model), (1,) + (MIN_SIZE,) * 3 + (model.in_channels,))
