"""MedicalZoo's 3D DenseNets (``Densenet3D.py``; after HyperDenseNet, Dolz et al. 2018): DENSENET1/2/3.

- :class:`SinglePathDenseNet` (DENSENET1): one dense block of 9 pre-activation layers (BN, ReLU,
  3^3 conv without bias, dropout, then ``[x, new]``) growing by 25, 25, 25, 50, 50, 50, 75, 75, 75,
  then three 1^3 convs to 400, 200 and 150 channels (no bias, **no norm or activation between
  them**, only dropout 0.5) and a 1^3 classifier. No down-sampling: any spatial size runs.
- :class:`DualPathDenseNet` (DENSENET2): late fusion, one SinglePath stream per modality (its
  150-channel features, no classifier), concatenated (or summed) and classified.
- :class:`DualSingleDenseNet` (DENSENET3): early fusion, a dense layer (1 -> 26 channels) per
  modality, concatenated, then an 8-layer SinglePath net (growths 25, 25, 50, 50, 50, 75, 75, 75)
  with its classifier.

All are channels-last ``(B, D, H, W, C) -> (B, D, H, W, num_classes)`` logits.

How they differ from the original, and why:

- **Channel counts are computed, not hard-coded.** The original fixes the width after the dense
  block (452 or 451; 477, 426 or 503 for the early-fusion block, ``Densenet3D.py:82-97``), so
  SinglePath runs only for 1-2 input channels, DualPath only for 3 and DualSingle only for 2-3.
  Here the width is the input's plus the block's growth, which equals the original wherever the
  original runs and also works for other counts. The two multi-modality networks need at least
  two modalities (one stream or early conv per modality; with one, use SinglePathDenseNet) and
  raise ``ValueError`` otherwise; every network raises ``ValueError`` when the input's channels
  differ from ``in_channels`` (the original prints a line and returns None).
- **DualPathDenseNet** with 2 modalities uses the early-fusion (8-layer) block in each stream and
  3 or more modalities the 9-layer block, as the original's 2- and 3-stream branches build them
  (its 2-stream branch fails in forward, 426 vs 503 channels). Its streams' classifiers (150 ->
  classes each, 1,800 parameters at 3 modalities and 4 classes) are never called by the original
  and are not built here; :func:`load_torch_state_dict` accepts and ignores their keys.
- **DualSingleDenseNet** with 2 modalities applies the original's ``early_conv_1`` to **both**
  modalities (``Densenet3D.py:280-281``) with dropout ``drop_rate``, so ``early_conv_2`` (677
  parameters) is never called: it is not built, and its keys are accepted and ignored. With 3
  modalities the original gives each its own early conv without dropout; any other count >= 2
  follows that 3-modality branch here (the one without the dead layer). The original's
  shape prints are dropped.
- The dropout rate after the 1^3 convs (0.5 in the original) is the field ``head_drop_rate``; the
  dense-layer dropout is ``drop_rate`` (element-wise, as ``F.dropout``). Dropout runs only with
  ``train=True`` and needs the ``"dropout"`` rng.
- DualPathDenseNet keeps the original's ``fusion`` option (``"concat"``, the default, or ``"sum"``).
- ``axis_name`` (medjax; default None) synchronises every BatchNorm over a ``pmap`` axis; None
  keeps the networks, and their parameter trees, as described here.

Parameter counts (``jax.eval_shape``, the original's factory calls, 4 classes): SinglePath (2
channels) 2,697,811; DualPath (3) 8,055,729 = 8,057,529 - 1,800; DualSingle (2) 2,994,409 =
2,995,086 - 677; DualSingle (3) 3,304,929 (nothing dead).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models._medzoo import batch_norm, load
from medjax.models.torch_import import read_state_dict
from medjax.nn.dense import DenseBlock
from medjax.nn.layers import Conv, Dropout

__all__ = [
    "DualPathDenseNet",
    "DualSingleDenseNet",
    "SinglePathDenseNet",
    "load_torch_state_dict",
    "torch_ignored_prefixes",
    "torch_spec",
]

Dtype = Any

#: growth of each layer of the dense block (``_HyperDenseBlock``) and of the early-fusion block.
GROWTHS = (25, 25, 25, 50, 50, 50, 75, 75, 75)
EARLY_FUSION_GROWTHS = (25, 25, 50, 50, 50, 75, 75, 75)
#: widths of the three 1^3 convolutions after the block.
HEAD_WIDTHS = (400, 200, 150)
#: channels one early-fusion dense layer gives a modality (1 + 25).
EARLY_WIDTH = 26


def _check_input(name, x, channels):
    if x.ndim != 5:
        raise ValueError(f"x: {name} expects (B, D, H, W, C), got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        raise ValueError(
            f"x: {name} was built for in_channels={channels}, got {x.shape[-1]} input channels"
        )


def _check_modalities(name, in_channels):
    if in_channels < 2:
        raise ValueError(
            f"in_channels: {name} needs one stream per modality and at least 2 modalities, got "
            f"{in_channels} (use SinglePathDenseNet for one)"
        )


class SinglePathDenseNet(nn.Module):
    """DENSENET1: ``(B, D, H, W, in_channels) -> (B, D, H, W, num_classes)`` logits.

    ``return_logits=False`` returns the 150-channel features instead (and builds no classifier);
    ``early_fusion=True`` uses the 8-layer block. Submodules ``denseblock1`` (layers ``layer_i``),
    ``conv1x1_1..3`` and ``classifier``. See the module docstring for the differences.
    """

    in_channels: int = 2
    num_classes: int = 4
    drop_rate: float = 0.1
    head_drop_rate: float = 0.5
    early_fusion: bool = False
    return_logits: bool = True
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.in_channels < 1:
            raise ValueError(f"in_channels: expected >= 1, got {self.in_channels}")
        _check_input(type(self).__name__, x, self.in_channels)
        growths = EARLY_FUSION_GROWTHS if self.early_fusion else GROWTHS
        x = DenseBlock(
            growths,
            norm=batch_norm(self.axis_name),
            dropout=self.drop_rate,
            dtype=self.dtype,
            name="denseblock1",
        )(x, train)
        for i, width in enumerate(HEAD_WIDTHS, start=1):
            x = Conv(width, 1, padding=0, use_bias=False, dtype=self.dtype, name=f"conv1x1_{i}")(x)
            x = Dropout(self.head_drop_rate, name=f"drop_{i}")(x, train)
        if not self.return_logits:
            return x
        return Conv(
            self.num_classes, 1, padding=0, use_bias=False, dtype=self.dtype, name="classifier"
        )(x)


class DualPathDenseNet(nn.Module):
    """DENSENET2 (late fusion): ``(B, D, H, W, in_channels) -> (B, D, H, W, num_classes)`` logits.

    Modality ``c`` goes through ``stream_{c+1}`` (a :class:`SinglePathDenseNet` returning its
    150-channel features; the 8-layer block when there are 2 modalities, else the 9-layer one);
    the streams are concatenated in order (``fusion="concat"``) or summed (``"sum"``) and
    classified by ``classifier`` (1^3, no bias).
    """

    in_channels: int = 3
    num_classes: int = 4
    drop_rate: float = 0.0
    head_drop_rate: float = 0.5
    fusion: str = "concat"
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        name = type(self).__name__
        _check_modalities(name, self.in_channels)
        if self.fusion not in ("concat", "sum"):
            raise ValueError(f"fusion: expected 'concat' or 'sum', got {self.fusion!r}")
        _check_input(name, x, self.in_channels)
        feats = [
            SinglePathDenseNet(
                1,
                self.num_classes,
                drop_rate=self.drop_rate,
                head_drop_rate=self.head_drop_rate,
                early_fusion=self.in_channels == 2,
                return_logits=False,
                dtype=self.dtype,
                axis_name=self.axis_name,
                name=f"stream_{c + 1}",
            )(x[..., c : c + 1], train=train)
            for c in range(self.in_channels)
        ]
        y = jnp.concatenate(feats, axis=-1) if self.fusion == "concat" else sum(feats)
        return Conv(
            self.num_classes, 1, padding=0, use_bias=False, dtype=self.dtype, name="classifier"
        )(y)


class DualSingleDenseNet(nn.Module):
    """DENSENET3 (early fusion): ``(B, D, H, W, in_channels) -> (B, D, H, W, num_classes)`` logits.

    Each modality goes through a dense layer (BN, ReLU, 3^3 conv to 25, ``[x, new]``): with 2
    modalities the one shared ``early_conv_1`` (dropout ``drop_rate``), otherwise its own
    ``early_conv_{c+1}`` (no dropout), as the original. The ``26 * in_channels`` channels go to
    ``stream_1``, an early-fusion :class:`SinglePathDenseNet` with its classifier.
    """

    in_channels: int = 2
    num_classes: int = 4
    drop_rate: float = 0.1
    head_drop_rate: float = 0.5
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        name = type(self).__name__
        _check_modalities(name, self.in_channels)
        _check_input(name, x, self.in_channels)

        def early(i, rate):
            return DenseBlock(
                (EARLY_WIDTH - 1,),
                norm=batch_norm(self.axis_name),
                dropout=rate,
                dtype=self.dtype,
                name=f"early_conv_{i}",
            )

        if self.in_channels == 2:
            shared = early(1, self.drop_rate)
            ys = [shared(x[..., c : c + 1], train) for c in range(2)]
        else:
            ys = [early(c + 1, 0.0)(x[..., c : c + 1], train) for c in range(self.in_channels)]
        return SinglePathDenseNet(
            EARLY_WIDTH * self.in_channels,
            self.num_classes,
            drop_rate=self.drop_rate,
            head_drop_rate=self.head_drop_rate,
            early_fusion=True,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name="stream_1",
        )(jnp.concatenate(ys, axis=-1), train=train)


# ------------------------------------------------------------------------------------------------
# The original's PyTorch checkpoints


def _dense_layer_spec(flax_prefix, torch_prefix):
    return [
        (f"{flax_prefix}/layer/norm", f"{torch_prefix}.norm1", "batch_norm"),
        (f"{flax_prefix}/layer/conv", f"{torch_prefix}.conv1", "conv"),
    ]


def _single_path_spec(flax_prefix, torch_prefix, *, early_fusion, return_logits):
    f = f"{flax_prefix}/" if flax_prefix else ""
    t = f"{torch_prefix}." if torch_prefix else ""
    n = len(EARLY_FUSION_GROWTHS if early_fusion else GROWTHS)
    spec = []
    for i in range(n):
        spec += _dense_layer_spec(
            f"{f}denseblock1/layer_{i}", f"{t}features.denseblock1.denselayer{i + 1}"
        )
    spec += [(f"{f}conv1x1_{i}", f"{t}features.conv1x1_{i}", "conv") for i in (1, 2, 3)]
    if return_logits:
        spec.append((f"{f}classifier", f"{t}classifier.classifier", "conv"))
    return spec


def torch_spec(model) -> list[tuple[str, str, str]]:
    """The ``(flax_path, torch_prefix, kind)`` spec of ``model``'s original PyTorch ``state_dict``.

    Torch keys are the original's (``features.denseblock1.denselayer1.norm1``, ``stream_1....``,
    ``early_conv_1.conv1``, ``classifier.classifier``); see :func:`torch_ignored_prefixes` for the
    keys of never-called submodules.
    """
    if isinstance(model, SinglePathDenseNet):
        return _single_path_spec(
            "", "", early_fusion=model.early_fusion, return_logits=model.return_logits
        )
    if isinstance(model, DualPathDenseNet):
        spec = []
        for c in range(1, model.in_channels + 1):
            spec += _single_path_spec(
                f"stream_{c}",
                f"stream_{c}",
                early_fusion=model.in_channels == 2,
                return_logits=False,
            )
        return spec + [("classifier", "classifier.classifier", "conv")]
    if isinstance(model, DualSingleDenseNet):
        n = 1 if model.in_channels == 2 else model.in_channels
        spec = []
        for c in range(1, n + 1):
            spec += _dense_layer_spec(f"early_conv_{c}/layer_0", f"early_conv_{c}")
        return spec + _single_path_spec(
            "stream_1", "stream_1", early_fusion=True, return_logits=True
        )
    raise ValueError(
        f"model: expected a SinglePath/DualPath/DualSingleDenseNet, got {type(model).__name__}"
    )


def torch_ignored_prefixes(model) -> tuple[str, ...]:
    """Prefixes of the original's keys that belong to submodules its forward never calls.

    DualPathDenseNet: each stream's classifier (``stream_c.classifier.classifier``);
    DualSingleDenseNet with 2 modalities: ``early_conv_2``. Nothing for SinglePathDenseNet.
    """
    if isinstance(model, DualPathDenseNet):
        return tuple(f"stream_{c}.classifier." for c in range(1, model.in_channels + 1))
    if isinstance(model, DualSingleDenseNet) and model.in_channels == 2:
        return ("early_conv_2.",)
    return ()


_NETWORKS = {
    "SinglePathDenseNet": SinglePathDenseNet,
    "DualPathDenseNet": DualPathDenseNet,
    "DualSingleDenseNet": DualSingleDenseNet,
}


def _numbered(sd, pattern):
    return {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}


def _infer(sd, network, kwargs):
    """The network class and its keyword arguments, filled in from ``sd``'s shapes where not given."""

    def shape(key):
        if key not in sd:
            raise ValueError(
                f"state_dict: missing key {key} (expected a {network.__name__} checkpoint)"
            )
        return sd[key].shape

    kw = dict(kwargs)
    if network is SinglePathDenseNet:
        kw.setdefault("in_channels", shape("features.denseblock1.denselayer1.norm1.weight")[0])
        kw.setdefault("early_fusion", "features.denseblock1.denselayer9.norm1.weight" not in sd)
        if "return_logits" not in kw:
            kw["return_logits"] = "classifier.classifier.weight" in sd
        if kw["return_logits"]:
            kw.setdefault("num_classes", shape("classifier.classifier.weight")[0])
    elif network is DualPathDenseNet:
        if "in_channels" not in kw:
            shape("stream_1.features.denseblock1.denselayer1.norm1.weight")
            kw["in_channels"] = len(_numbered(sd, r"stream_(\d+)\."))
        c_in = shape("classifier.classifier.weight")
        kw.setdefault("num_classes", c_in[0])
        kw.setdefault(
            "fusion", "sum" if c_in[1] == HEAD_WIDTHS[-1] and kw["in_channels"] > 1 else "concat"
        )
    else:
        width = shape("stream_1.features.denseblock1.denselayer1.norm1.weight")[0]
        kw.setdefault("in_channels", width // EARLY_WIDTH)
        kw.setdefault("num_classes", shape("stream_1.classifier.classifier.weight")[0])
    return kw


def load_torch_state_dict(state_dict, network=None, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` from an original MedicalZoo DenseNet checkpoint.

    ``state_dict``: a mapping, ``.pt``/``.pth`` or ``.npz`` path (``module.`` prefixes stripped).
    ``network``: the class or its name; inferred from the keys when None (``early_conv_1`` ->
    DualSingle, ``stream_1`` -> DualPath, else SinglePath). ``model_kwargs`` are the network's
    fields; ``in_channels``, ``num_classes`` (and ``early_fusion``/``fusion``) are read from the
    shapes when not given. Keys of never-called submodules (:func:`torch_ignored_prefixes`) are
    accepted and ignored; any other missing, unexpected or mis-shaped key raises ``ValueError``
    naming it. Use the result with ``network(**model_kwargs)`` of the same settings.
    """
    sd = read_state_dict(state_dict)
    if network is None:
        if any(k.startswith("early_conv_") for k in sd):
            network = DualSingleDenseNet
        elif any(k.startswith("stream_") for k in sd):
            network = DualPathDenseNet
        else:
            network = SinglePathDenseNet
    elif isinstance(network, str):
        if network not in _NETWORKS:
            raise ValueError(f"network: expected one of {sorted(_NETWORKS)}, got {network!r}")
        network = _NETWORKS[network]
    model = network(**_infer(sd, network, model_kwargs))
    return load(
        model,
        sd,
        torch_spec(model),
        (1, 1, 1, 1, model.in_channels),
        ignore_prefixes=torch_ignored_prefixes(model),
    )
