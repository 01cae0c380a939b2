"""MedicalZoo's ``VNET`` and ``VNET2``: V-Net (Milletari et al. 2016) and its light variant.

A port of ``lib/medzoo/Vnet.py``: residual stages of 5^3 convolutions with batch norm, k2 s2
down-convolutions and transposed up-convolutions, per-channel PReLU (the factory's ``elu=False``)
or ELU. :func:`load_torch_state_dict` imports a checkpoint of the original (its own key names).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import _medzoo
from medjax.nn.layers import Conv, ConvTranspose, Dropout, PReLU
from medjax.nn.norm import BatchNorm

__all__ = ["VNet", "VNetLight", "load_torch_state_dict", "torch_spec"]

Dtype = Any


def _act(elu: bool, name: str, x):
    """The original's ``ELUCons``: ELU, or a per-channel PReLU module named ``name``."""
    return jax.nn.elu(x) if elu else PReLU(channelwise=True, name=name)(x)


def _bn(name, axis_name=None):
    return BatchNorm(momentum=0.9, epsilon=1e-5, axis_name=axis_name, name=name)


class _LUConv(nn.Module):
    """conv 5^3 (pad 2, bias), BN, activation (``relu1``)."""

    elu: bool
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        y = Conv(x.shape[-1], 5, padding=2, dtype=self.dtype, name="conv1")(x)
        return _act(self.elu, "relu1", _bn("bn1", self.axis_name)(y, train=train))


class _InputTransition(nn.Module):
    """act(BN(conv 5^3 -> 16) + the input tiled to 16 channels)."""

    elu: bool
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        y = _bn("bn1", self.axis_name)(
            Conv(16, 5, padding=2, dtype=self.dtype, name="conv1")(x), train=train
        )
        tiled = jnp.take(x, jnp.arange(16) % x.shape[-1], axis=-1)
        return _act(self.elu, "relu1", y + tiled.astype(y.dtype))


class _DownTransition(nn.Module):
    """down = act(BN(conv k2 s2 -> 2C)); act(n x LUConv(dropout(down)) + down)."""

    n_convs: int
    elu: bool
    dropout: bool
    rate: float
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        c = 2 * x.shape[-1]
        down = Conv(c, 2, strides=2, padding=0, dtype=self.dtype, name="down_conv")(x)
        down = _act(self.elu, "relu1", _bn("bn1", self.axis_name)(down, train=train))
        out = down
        if self.dropout:
            out = Dropout(self.rate, channelwise=True, name="do1")(out, train)
        for i in range(self.n_convs):
            out = _LUConv(self.elu, self.dtype, self.axis_name, name=f"ops_{i}")(out, train)
        return _act(self.elu, "relu2", out + down)


class _UpTransition(nn.Module):
    """up = act(BN(convT k2 s2 -> out/2)); cat = [up, dropout(skip)]; act(n x LUConv(cat) + cat)."""

    out_chans: int
    n_convs: int
    elu: bool
    dropout: bool
    rate: float
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, skip, train: bool):
        if self.dropout:
            x = Dropout(self.rate, channelwise=True, name="do1")(x, train)
        skip = Dropout(self.rate, channelwise=True, name="do2")(skip, train)
        up = ConvTranspose(self.out_chans // 2, 2, strides=2, dtype=self.dtype, name="up_conv")(x)
        up = _act(self.elu, "relu1", _bn("bn1", self.axis_name)(up, train=train))
        cat = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
        out = cat
        for i in range(self.n_convs):
            out = _LUConv(self.elu, self.dtype, self.axis_name, name=f"ops_{i}")(out, train)
        return _act(self.elu, "relu2", out + cat)


class _OutputTransition(nn.Module):
    """conv 5^3 -> classes, BN, act, conv 1^3 (no softmax)."""

    classes: int
    elu: bool
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        y = Conv(self.classes, 5, padding=2, dtype=self.dtype, name="conv1")(x)
        y = _act(self.elu, "relu1", _bn("bn1", self.axis_name)(y, train=train))
        return Conv(self.classes, 1, padding=0, dtype=self.dtype, name="conv2")(y)


# (name, n_convs, dropout) of the down transitions, and (name, out_chans, n_convs, dropout) of
# the up transitions, as ``Vnet.py`` builds them.
_DOWN = (("down_tr32", 1, False), ("down_tr64", 2, False), ("down_tr128", 3, True))
_DOWN_256 = ("down_tr256", 2, True)
_UP = (("up_tr64", 64, 1, False), ("up_tr32", 32, 1, False))
_UP_FULL = (("up_tr256", 256, 2, True), ("up_tr128", 128, 2, True))
_UP_LIGHT = (("up_tr128", 128, 2, True),)


def _stages(light: bool):
    down = _DOWN if light else _DOWN + (_DOWN_256,)
    up = (_UP_LIGHT if light else _UP_FULL) + _UP
    return down, up


class VNet(nn.Module):
    """V-Net: ``(B, D, H, W, in_channels) -> logits (B, D, H, W, num_classes)``.

    Spatial sizes must be multiples of 16 (four k2 s2 down-convolutions); ``ValueError``
    otherwise. Widths 16-32-64-128-256 with 1, 2, 3, 2 LUConvs down and 2, 2, 1, 1 up.

    As the original built by MedicalZoo's factory (``elu=False``): every activation is a
    separate per-channel PReLU (``relu1``/``relu2``, slope 0.25 at init); ``elu=True`` uses ELU
    (no parameters) everywhere instead. Every conv and transposed conv has a bias; BatchNorm uses
    torch's defaults (``train=True``: batch statistics; update them with
    ``mutable=["batch_stats"]``). Channel dropout (``Dropout3d``, ``dropout_rate`` 0.5, rng
    collection ``"dropout"``) sits where the original has it: in ``down_tr128``/``down_tr256`` on
    the LUConvs' input (the residual adds the undropped tensor), on the input of the dropout up
    transitions, and on every skip (``do2``, always). The up transitions concatenate ``[up, skip]``. ``dropout_rate`` is a
    medjax field (the original fixes torch's default p = 0.5; 0 turns dropout off).

    Deviation: the original adds the input repeated ``16 / in_channels`` times along channels to
    the first convolution's output, and so fails unless ``in_channels`` divides 16. Here the tile
    has channel ``k = input channel k mod in_channels`` for any count, which is the original's
    tile whenever the original runs.
    """

    in_channels: int = 2
    num_classes: int = 4
    elu: bool = False
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    light: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        down, up = _stages(self.light)
        factor = 2 ** len(down)
        _medzoo.check_input(
            type(self).__name__, x, ndim=3, channels=self.in_channels, multiple=factor
        )
        kw = dict(elu=self.elu, dtype=self.dtype, axis_name=self.axis_name)
        out = _InputTransition(name="in_tr", **kw)(x, train)
        skips = [out]
        for name, n, drop in down:
            out = _DownTransition(n, dropout=drop, rate=self.dropout_rate, name=name, **kw)(
                out, train
            )
            skips.append(out)
        skips.pop()
        for name, c, n, drop in up:
            out = _UpTransition(c, n, dropout=drop, rate=self.dropout_rate, name=name, **kw)(
                out, skips.pop(), train
            )
        return _OutputTransition(self.num_classes, name="out_tr", **kw)(out, train)


class VNetLight(VNet):
    """The light V-Net (``VNET2``): :class:`VNet` without the 256-channel level.

    ``up_tr128`` takes the 128-channel bottleneck directly. Spatial sizes must be multiples of 8.
    Everything else (PReLU/ELU, dropout sites, the tiled input) as :class:`VNet`.
    """

    light: ClassVar[bool] = True


def torch_spec(*, light: bool = False, elu: bool = False):
    """``(flax_path, torch_prefix, kind)`` for :class:`VNet` (``light=True``: :class:`VNetLight`).

    With ``elu=False`` every ``relu1``/``relu2`` PReLU weight is included; with ELU there are none.
    """
    spec = []

    def unit(path, prefix, convs, kind="conv", relus=("relu1",)):
        for c in convs:
            spec.append((f"{path}/{c}", f"{prefix}.{c}", kind))
        spec.append((f"{path}/bn1", f"{prefix}.bn1", "batch_norm"))
        if not elu:
            spec.extend((f"{path}/{r}", f"{prefix}.{r}", "prelu") for r in relus)

    def ops(path, prefix, n):
        for i in range(n):
            unit(f"{path}/ops_{i}", f"{prefix}.ops.{i}", ["conv1"])

    down, up = _stages(light)
    unit("in_tr", "in_tr", ["conv1"])
    for name, n, _ in down:
        unit(name, name, ["down_conv"], relus=("relu1", "relu2"))
        ops(name, name, n)
    for name, _, n, _ in up:
        unit(name, name, ["up_conv"], kind="conv_transpose", relus=("relu1", "relu2"))
        ops(name, name, n)
    unit("out_tr", "out_tr", ["conv1", "conv2"])
    return spec


def load_torch_state_dict(state_dict, *, light: bool | None = None, **model_kwargs):
    """Flax variables ``{"params", "batch_stats"}`` of :class:`VNet`/:class:`VNetLight`.

    ``state_dict``: the original's, as a mapping, ``.pt``/``.pth`` or ``.npz`` path. ``light``
    (VNetLight) is read from the keys (no ``down_tr256``) unless given; ``in_channels``,
    ``num_classes`` and ``elu`` (no PReLU weights) from the shapes unless in ``model_kwargs``.
    A missing, unexpected or mis-shaped key raises ``ValueError`` naming it.
    """
    sd = _medzoo.read(state_dict)
    if light is None:
        light = not any(k.startswith("down_tr256.") for k in sd)
    cls = VNetLight if light else VNet
    name = cls.__name__
    model_kwargs.setdefault("in_channels", _medzoo.weight_shape(sd, "in_tr.conv1.weight", name)[1])
    model_kwargs.setdefault("num_classes", _medzoo.weight_shape(sd, "out_tr.conv2.weight", name)[0])
    model_kwargs.setdefault("elu", "in_tr.relu1.weight" not in sd)
    model = cls(**model_kwargs)
    spec = torch_spec(light=light, elu=model.elu)
    shape = (1, 16, 16, 16, model.in_channels)
    return _medzoo.load(model, sd, spec, shape, name=name)
