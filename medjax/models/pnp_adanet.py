"""PnP-AdaNet (Dou et al., IJCAI 2018): the dilated residual segmenter, its DAM split and the critics.

A port of the TensorFlow 1 code of ``carrenD/Medical-Cross-Modality-Domain-Adaptation``
(``source_segmenter.py``, ``adversarial.py``, ``layers.py``, ``ops.py``), channels-last 2D:

- :class:`PnPAdaNet`: the segmenter, groups ``group_1`` .. ``group_10`` and ``output``
  (``(B, H, W, 3) -> (B, H, W, 5)`` logits; 39,318,520 trainable parameters at the defaults).
- :class:`PnPAdaNetFront` / :class:`PnPAdaNetBack`: groups ``1..depth`` and ``depth+1..10`` plus
  ``output``, with the same parameter paths as the full segmenter, so the domain adaptation
  module (DAM, a front) is initialised with :func:`dam_params_from_segmenter`.
- :class:`PnPAdaNetCritic` (the DCM, ``cls_1`` .. ``cls_6``, ``cls_out``) on
  :func:`critic_inputs`, and :class:`PnPAdaNetMaskCritic` (``mask_cls_1`` .. ``mask_cls_4``,
  ``m_cls_out``) on the logits; :func:`clip_mask` / :func:`clip_critic_weights` for WGAN clipping.
- :func:`tf_pixel_shuffle`: the original's ``ops.PS`` sub-pixel order (batch > 1).

Choices (each where the original is ambiguous or broken; see the class docstrings for the rest):

- **Batch norm** (``tf.contrib.layers.batch_norm``, decay 0.9, default epsilon 1e-3,
  ``updates_collections=None``): in TF 1.x that call takes the fused path
  (``fused=None`` means True, and non-default ``updates_collections`` selects
  ``_fused_batch_norm``), and the fused kernel's ``batch_variance`` output, which feeds the moving
  average, carries Bessel's correction (``variance * n / (n - 1)`` in ``fused_batch_norm_op.cc``)
  while the normalisation uses the biased variance. So the segmenter uses
  ``BatchNorm(momentum=0.9, epsilon=1e-3, unbiased_running_var=True)``.
- **Pixel shuffle**: one order for every batch size, the original's batch > 1 order
  (:func:`tf_pixel_shuffle`).
- **Padding**: TF ``'SAME'`` is :class:`medjax.nn.layers.Conv`'s ``"SAME"`` (lax pads
  ``total // 2`` low and the rest high, as TF: ``(0, 1)`` for k3 s2 and k5 s4 on even sizes,
  ``(1, 2)`` for k5 s2); ``'SYMMETRIC'`` is ``"SYMMETRIC"`` (edge-including mirror of ``k // 2``,
  then a valid convolution, strided where the original strides).
- **Initialisation**: medjax's lecun-normal, not the original's truncated normals (std 0.01 in the
  segmenter, 0.1 in the adversarial graph); every convolution but group 1's first, group 10's
  and the output's is followed by a batch norm, so the scale matters only there and in the
  critics' final linear layers.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.blocks import ConvNormAct, ResidualBlock
from medjax.nn.layers import Conv, Dropout, leaky_relu, max_pool
from medjax.nn.norm import BatchNorm
from medjax.ops.resize import pixel_shuffle

__all__ = [
    "FEATURE_NAMES",
    "PnPAdaNet",
    "PnPAdaNetBack",
    "PnPAdaNetCritic",
    "PnPAdaNetFront",
    "PnPAdaNetMaskCritic",
    "clip_critic_weights",
    "clip_mask",
    "critic_inputs",
    "dam_params_from_segmenter",
    "tf_pixel_shuffle",
]

Dtype = Any

#: the intermediate tensors the feature critic reads (``adversarial.py:320-335``): group outputs
FEATURE_NAMES = {4: "block4_2", 6: "block6_2", 7: "block7_2", 9: "conv9_2"}

# Output width of groups 1..9 in units of the base width f; groups 1-3 end with a 2x2 max pool.
_WIDTH = {1: 1, 2: 2, 3: 4, 4: 8, 5: 16, 6: 16, 7: 32, 8: 32, 9: 32}
_POOLED = (1, 2, 3)
_PS = 8  # group 10's pixel shuffle factor (local_size = 8 * 8)

LEAK = 0.2  # tf.nn.leaky_relu's default slope
_lrelu = leaky_relu(LEAK)
_seg_norm = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-3, unbiased_running_var=True)


def tf_pixel_shuffle(x, r: int):
    """The original's ``ops.PS`` for batch > 1: ``(B, H, W, C * r * r) -> (B, H * r, W * r, C)``.

    ``out[b, h * r + dy, w * r + dx, k] = x[b, h, w, k * r * r + dx * r + dy]``: within each of the
    C consecutive chunks of r² channels, the sub-pixel column index varies slowest. This is the
    transpose of torch's ``pixel_shuffle`` / :func:`medjax.ops.pixel_shuffle` (``dy * r + dx``), and
    is computed as that after transposing each r x r sub-block of the channels.

    The original's ``_phase_shift`` gives this order whenever the batch is larger than one, and
    ``dy * r + dx`` for batch 1 (where it also swaps the spatial sizes of a non-square map). Every
    training and test graph of the released code ran with batch > 1 (10 for the segmenter, 6 for
    the GAN), so weights trained by it assume this order for group 10's channels and the critic
    inputs; medjax uses it for every batch size so that one network has one meaning.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x: expected (B, H, W, C * r * r), got shape {x.shape}")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r: expected a positive int, got {r!r}")
    b, h, w, ch = x.shape
    if ch % (r * r):
        raise ValueError(f"x: expected channels divisible by r * r = {r * r}, got {ch}")
    c = ch // (r * r)
    x = x.reshape(b, h, w, c, r, r).swapaxes(-1, -2).reshape(b, h, w, ch)
    return pixel_shuffle(x, r)


def _check_rank4(name, x):
    if x.ndim != 4:
        raise ValueError(f"{name}: expected (B, H, W, C), got shape {x.shape}")


def _check_depth(depth):
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or not 1 <= depth <= 9:
        raise ValueError(
            f"depth: expected an int in 1..9 (groups replaced by the DAM), got {depth!r}"
        )


def _check_image(x, in_channels):
    _check_rank4("x", x)
    h, w, c = x.shape[1:]
    if c != in_channels:
        raise ValueError(f"x: expected {in_channels} channels (adjacent slices), got {c}")
    if h % 8 or w % 8:
        raise ValueError(
            f"x: expected H and W multiples of 8 (three 2x2 pools, then a x8 pixel shuffle), "
            f"got {(h, w)}"
        )


class _Group(nn.Module):
    """Segmenter group ``index`` (1..10) as ``source_segmenter.py:91-201``; see :class:`PnPAdaNet`."""

    index: int
    features: int = 16
    num_classes: int = 5
    dropout: float = 0.25
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, f = self.index, self.features
        drop = functools.partial(Dropout, self.dropout)
        norm = functools.partial(_seg_norm, axis_name=self.axis_name)
        if k == 10:
            c = _PS * _PS * 8 * self.num_classes
            y = Conv(c, 3, padding="SYMMETRIC", use_bias=False, dtype=self.dtype, name="conv")(x)
            return tf_pixel_shuffle(drop(name="dropout")(y, train), _PS)
        width = _WIDTH[k] * f
        if k == 9:
            for i in (1, 2):
                x = ConvNormAct(
                    width,
                    3,
                    norm=norm,
                    act=_lrelu,
                    dropout=self.dropout,
                    dtype=self.dtype,
                    name=f"conv_{i}",
                )(x, train)
            return x
        if k == 1:
            # w1_1: convolution and dropout only; its raw output is block 1's input and shortcut.
            x = Conv(f, 3, use_bias=False, dtype=self.dtype, name="conv")(x)
            x = drop(name="dropout")(x, train)
        blocks = 1 if k in (1, 2) else 2
        dilation = 2 if k == 8 else 1
        for i in range(1, blocks + 1):
            x = ResidualBlock(
                width,
                dilations=(dilation, dilation),
                norm=norm,
                act=_lrelu,
                shortcut="pad",
                dropout=self.dropout,
                use_bias=False,
                dtype=self.dtype,
                name=f"block_{i}",
            )(x, train)
        if k in _POOLED:
            x = max_pool(x, 2)
        return x


def _run_groups(module, x, first, last, train, feats):
    """Apply groups ``first..last`` (9 at most) as children of ``module``, recording critic features."""
    for k in range(first, last + 1):
        x = _Group(
            k,
            module.features,
            module.num_classes,
            module.dropout,
            module.dtype,
            module.axis_name,
            name=f"group_{k}",
        )(x, train)
        if k in FEATURE_NAMES:
            feats[FEATURE_NAMES[k]] = x
    return x


def _head(module, x, train):
    """Group 10 and the 5x5 output convolution (no dropout: keep_prob 1, ``:206``): the logits."""
    x = _Group(
        10,
        module.features,
        module.num_classes,
        module.dropout,
        module.dtype,
        module.axis_name,
        name="group_10",
    )(x, train)
    return Conv(
        module.num_classes,
        5,
        padding="SYMMETRIC",
        use_bias=False,
        dtype=module.dtype,
        name="output",
    )(x)


class PnPAdaNet(nn.Module):
    """The PnP-AdaNet segmenter: ``(B, H, W, in_channels) -> (B, H, W, num_classes)`` logits.

    H and W must be multiples of 8 (``ValueError``). Groups (f = ``features``, K = ``num_classes``;
    every convolution is 3x3 without bias, followed by dropout, then BN, then leaky ReLU 0.2 unless
    said otherwise; a residual block is lrelu(BN(conv)), BN(conv), lrelu(shortcut + .)):

    - ``group_1``: ``conv`` to f (dropout only: no BN, no activation; its raw output is
      ``block_1``'s input and shortcut), ``block_1``, 2x2 max pool -> H/2, width f.
    - ``group_2``: ``block_1`` widening to 2f, max pool -> H/4.
    - ``group_3``: ``block_1`` widening to 4f, ``block_2``, max pool -> H/8.
    - ``group_4``: ``block_1`` widening to 8f, ``block_2`` (output ``block4_2``).
    - ``group_5``: ``block_1`` widening to 16f, ``block_2``.
    - ``group_6``: ``block_1``, ``block_2`` at 16f (output ``block6_2``).
    - ``group_7``: ``block_1`` widening to 32f, ``block_2`` (output ``block7_2``).
    - ``group_8``: ``block_1``, ``block_2`` at 32f, both convolutions dilated (rate 2, pad 2).
    - ``group_9``: ``conv_1``, ``conv_2`` (conv-dropout-BN-lrelu) at 32f (output ``conv9_2``).
    - ``group_10``: ``conv`` to 64·8·K channels (2560; SYMMETRIC padding, no BN/activation),
      dropout, :func:`tf_pixel_shuffle` x8 -> H, width 8K.
    - ``output``: 5x5 convolution to K (SYMMETRIC padding, no dropout): the logits.

    A widening block's shortcut is its input zero-padded by C/2 channels on each side, no
    projection. Residual blocks are :class:`medjax.nn.blocks.ResidualBlock` (children ``conv1``,
    ``norm1``, ``conv2``, ``norm2``), group 9's layers :class:`~medjax.nn.blocks.ConvNormAct`
    (``conv``, ``norm``); BN is ``BatchNorm(momentum=0.9, epsilon=1e-3, unbiased_running_var=True)``
    (TF1 fused batch norm; module docstring). Dropout (rate ``dropout``, the original's keep_prob
    0.75) acts only with ``train=True`` and needs the ``"dropout"`` rng; ``train=True`` also
    normalises with batch statistics and updates ``batch_stats`` (``mutable=["batch_stats"]``).

    TF variable names (for an importer): ``group_k/Variable[_i]`` are the group's kernels in call
    order (``conv``, then ``block_1/conv1``, ``block_1/conv2``, ``block_2/conv1``, ...; group 9:
    ``conv_1/conv``, ``conv_2/conv``); the batch norms ``group_k/pred_k_b_j`` (``adversarial.py``'s
    names) are ``block_b/norm{j}``, group 9's ``pred_9_j`` is ``conv_j/norm``, with ``beta`` ->
    ``bias``, ``gamma`` -> ``scale``, ``moving_mean`` -> ``mean``, ``moving_variance`` -> ``var``;
    ``output/Variable`` is ``output/kernel``. The DAM's ``adapt_k`` are the same within a front.

    ``return_features=True`` returns ``(logits, feats)`` with ``feats`` the outputs of groups 4, 6,
    7 and 9 under :data:`FEATURE_NAMES` (``block4_2 (B, H/8, W/8, 8f)``, ``block6_2 (.., 16f)``,
    ``block7_2 (.., 32f)``, ``conv9_2 (.., 32f)``) and ``"logits"``.

    ``axis_name`` (None) synchronises every batch norm's training statistics over a ``jax.pmap``
    axis, so a pmapped step normalises with the global batch as one device does (the front, the
    back and the critics take the same field).

    Differences from the original: the pixel shuffle has the batch > 1 order for every batch size
    (the original's batch-1 graph differs); lecun-normal initialisation. The released
    ``source_segmenter.py`` does not parse and ``Full_DRN`` does not build (ORIGINALS 3.5); the
    structure is the one both files spell out.
    """

    num_classes: int = 5
    features: int = 16
    in_channels: int = 3
    dropout: float = 0.25
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        _check_image(x, self.in_channels)
        feats: dict = {}
        h = _run_groups(self, x, 1, 9, train, feats)
        logits = _head(self, h, train)
        if not return_features:
            return logits
        feats["logits"] = logits
        return logits, feats


class PnPAdaNetFront(nn.Module):
    """Groups ``1..depth`` of :class:`PnPAdaNet` (the DAM): ``(B, H, W, in_channels) -> group output``.

    The output is group ``depth``'s: ``(B, H/2, W/2, f)`` for depth 1, ``(B, H/4, W/4, 2f)`` for 2,
    else ``(B, H/8, W/8, w)`` with w = 4f, 8f, 16f, 16f, 32f, 32f, 32f for depths 3..9. Parameters
    are ``group_1`` .. ``group_{depth}``, the same paths as the full segmenter's (initialise with
    :func:`dam_params_from_segmenter`). ``depth`` must be in 1..9 and H, W multiples of 8
    (``ValueError``). The released code's DAM is depth 6 (``adapt_1`` .. ``adapt_6``; 5,093,488
    trainable parameters). ``return_features=True`` returns ``(out, feats)`` with the
    :data:`FEATURE_NAMES` entries of groups ``<= depth``.
    """

    depth: int = 6
    num_classes: int = 5
    features: int = 16
    in_channels: int = 3
    dropout: float = 0.25
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        _check_depth(self.depth)
        _check_image(x, self.in_channels)
        feats: dict = {}
        out = _run_groups(self, x, 1, self.depth, train, feats)
        return (out, feats) if return_features else out


class PnPAdaNetBack(nn.Module):
    """Groups ``depth+1..10`` and ``output`` of :class:`PnPAdaNet`: group ``depth``'s output -> logits.

    Input: ``(B, h, w, C)`` with C group ``depth``'s width (see :class:`PnPAdaNetFront`) and h, w
    divisible by the pooling still ahead (4 after depth 1, 2 after depth 2); output the logits at
    the segmenter's input resolution, ``(B, s·h, s·w, num_classes)`` with s = 2, 4, 8 after depth
    1, 2, >= 3. Parameters ``group_{depth+1}`` ..
    ``group_10`` and ``output``, the same paths as the full segmenter's, so ``apply`` accepts the
    full segmenter's variables. ``return_features=True`` returns ``(logits, feats)`` with the
    :data:`FEATURE_NAMES` entries of groups ``> depth`` and ``"logits"``.
    """

    depth: int = 6
    num_classes: int = 5
    features: int = 16
    dropout: float = 0.25
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, h, *, train: bool = False, return_features: bool = False):
        _check_depth(self.depth)
        _check_rank4("h", h)
        width = _WIDTH[self.depth] * self.features
        if h.shape[-1] != width:
            raise ValueError(
                f"h: expected group {self.depth}'s output width {width} channels, got {h.shape[-1]}"
            )
        factor = {1: 4, 2: 2}.get(self.depth, 1)
        if h.shape[1] % factor or h.shape[2] % factor:
            raise ValueError(
                f"h: expected H and W multiples of {factor} after group {self.depth}, "
                f"got {h.shape[1:3]}"
            )
        feats: dict = {}
        x = _run_groups(self, h, self.depth + 1, 9, train, feats)
        logits = _head(self, x, train)
        if not return_features:
            return logits
        feats["logits"] = logits
        return logits, feats


def dam_params_from_segmenter(variables: Mapping, depth: int = 6) -> dict:
    """The DAM's initial variables: copies of groups ``1..depth`` of a trained segmenter.

    ``variables`` is :class:`PnPAdaNet`'s (or any superset's) variables dict, ``{"params": ...,
    "batch_stats": ...}``; returns the same collections restricted to ``group_1`` ..
    ``group_{depth}``, ready for :class:`PnPAdaNetFront` ``(depth=depth)``. The arrays are copied
    (new buffers), so a train step that donates the DAM's state cannot delete the frozen
    segmenter's. Raises ``ValueError`` for a depth outside 1..9 or a missing group.
    """
    _check_depth(depth)
    groups = {f"group_{k}" for k in range(1, depth + 1)}
    out = {}
    for col, tree in variables.items():
        if col == "params":
            missing = sorted(groups - set(tree))
            if missing:
                raise ValueError(
                    f"variables: expected params for {missing}, got keys {sorted(tree)}"
                )
        sub = {g: tree[g] for g in sorted(groups, key=lambda g: int(g[6:])) if g in tree}
        if sub:
            out[col] = jax.tree.map(jnp.copy, sub)
    if "params" not in out:
        raise ValueError(f"variables: expected a 'params' collection, got {sorted(variables)}")
    return out


# ------------------------------------------------------------------------------------------------
# Critics


class _BatchStatNorm(nn.Module):
    """Batch norm that always normalises with the batch statistics (TF ``is_training=True``).

    Parameters ``scale`` (gamma) and ``bias`` (beta); no running statistics: the critics' moving
    averages are updated by the original but never read. Biased variance, epsilon 1e-3.
    ``axis_name`` averages the statistics over a ``pmap`` axis (the global batch's statistics).
    """

    epsilon: float = 1e-3
    dtype: Dtype | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axes)
        mean_sq = jnp.mean(jnp.square(xf), axes)
        if self.axis_name is not None and not self.is_initializing():
            mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return y.astype(self.dtype or x.dtype)


class _CriticStage(nn.Module):
    """``cls_k`` / ``mask_cls_k``: ``block`` (residual, zero-padded shortcut) then ``down`` (strided conv-BN-lrelu)."""

    width: int
    down_features: int
    kernel_size: int
    strides: int
    dropout: float = 0.25
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ResidualBlock(
            self.width,
            norm=functools.partial(_BatchStatNorm, axis_name=self.axis_name),
            act=_lrelu,
            shortcut="pad",
            dropout=self.dropout,
            use_bias=False,
            dtype=self.dtype,
            name="block",
        )(x, train)
        return _critic_conv(
            self, self.down_features, self.kernel_size, self.strides, "SAME", "down"
        )(x, train)


def _critic_conv(module, features, k, s, padding, name):
    return ConvNormAct(
        features,
        k,
        strides=s,
        padding=padding,
        norm=functools.partial(_BatchStatNorm, axis_name=module.axis_name),
        act=_lrelu,
        dropout=module.dropout,
        dtype=module.dtype,
        name=name,
    )


def _flatten_linear(x, name):
    # NHWC flatten per sample, then a bias-free linear layer to one score.
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(1, use_bias=False, name=name)(x.astype(jnp.float32))


class PnPAdaNetCritic(nn.Module):
    """The feature critic (DCM, ``adversarial.py:337-400``): ``(B, H, W, C) -> (B, 1)`` WGAN scores.

    The input is :func:`critic_inputs` (32 channels at 256² for the paper). With b = ``features``
    (16): ``cls_1`` .. ``cls_5`` are a residual block (``block``, zero-padded shortcut when the
    width doubles) then a strided conv-BN-lrelu ``down`` with TF ``'SAME'`` padding:

    =====  ======================  =====================  ==========
    stage  block                   down                   TF padding
    =====  ======================  =====================  ==========
    cls_1  2b -> 4b                3x3 s2                 (0, 1)
    cls_2  4b -> 8b                5x5 s2                 (1, 2)
    cls_3  8b -> 16b               3x3 s2                 (0, 1)
    cls_4  16b -> 32b              3x3 s2                 (0, 1)
    cls_5  32b -> 32b              5x5 s4                 (0, 1)
    =====  ======================  =====================  ==========

    then ``cls_6`` (3x3 s2 conv-BN-lrelu, SYMMETRIC padding) and ``cls_out``, a bias-free linear
    layer on the NHWC-flattened map (``(2·2·32b, 1)`` = ``(2048, 1)`` at 256²; 21,739,136
    trainable parameters). Every convolution is bias-free and followed by dropout (rate
    ``dropout``) in training; every BN normalises with the batch's statistics in training and
    evaluation alike, as the original's critics (``cls_bn`` is always True), and keeps no running
    statistics (over the ``axis_name`` pmap axis too, when given).

    ``in_channels`` None means the original's 2b; another value (a reduced-width experiment's
    :func:`critic_inputs`, at most 4b) is zero-padded to 4b in ``cls_1``'s shortcut, low side
    ``(4b - C) // 2``, which is the original's C/2 on each side when C = 2b.

    TF names: ``cls_k/Variable``, ``Variable_1``, ``Variable_2`` are ``cls_k/block/conv1``,
    ``block/conv2``, ``down/conv``; BN ``cls_k/cls_k_1``, ``cls_k_2``, ``cls_k_3`` are
    ``block/norm1``, ``block/norm2``, ``down/norm`` (``cls_6``: ``conv``, ``norm``);
    ``cls_out/Variable`` is ``cls_out/kernel``. The mask critic follows the same pattern
    (``mask_cls_k/Variable[_i]``, BN ``m_cls_k_j``, ``m_cls_out/Variable``).

    Differences: the linear layer's input size follows the final map (the original hard-codes
    ``reshape(-1, 2048)``, which mixes samples at other sizes); dropout only with ``train=True``
    (the original's critics always drop, keep_prob 0.75, and every use of them is a training step).
    """

    features: int = 16
    in_channels: int | None = None
    dropout: float = 0.25
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        _check_rank4("x", x)
        b = self.features
        c_in = 2 * b if self.in_channels is None else self.in_channels
        if c_in > 4 * b:
            raise ValueError(
                f"in_channels: expected at most 4 * features = {4 * b} (cls_1's padded shortcut), "
                f"got {c_in}"
            )
        if x.shape[-1] != c_in:
            raise ValueError(f"x: expected {c_in} channels (in_channels), got {x.shape[-1]}")
        stages = ((4, 3, 2), (8, 5, 2), (16, 3, 2), (32, 3, 2), (32, 5, 4))
        for i, (w, k, s) in enumerate(stages, start=1):
            x = _CriticStage(
                w * b, w * b, k, s, self.dropout, self.dtype, self.axis_name, name=f"cls_{i}"
            )(x, train)
        x = _critic_conv(self, 32 * b, 3, 2, "SYMMETRIC", "cls_6")(x, train)
        return _flatten_linear(x, "cls_out")


class PnPAdaNetMaskCritic(nn.Module):
    """The mask critic (``adversarial.py:402-443``): logits ``(B, H, W, num_classes) -> (B, 1)``.

    With b = ``features`` (16): ``mask_cls_1`` 3x3 s2 conv-BN-lrelu to b (TF pad (0, 1));
    ``mask_cls_2`` residual block b -> b then 5x5 s4 to 2b (``down``, pad (0, 1)); ``mask_cls_3``
    residual block 2b -> 4b (zero-padded shortcut) then 5x5 s4 to 8b (pad (0, 1)); ``mask_cls_4``
    5x5 s4 conv-BN-lrelu to 16b with SYMMETRIC padding; ``m_cls_out`` bias-free linear on the
    NHWC-flattened map (``(2·2·16b, 1)`` = ``(1024, 1)`` at 256²; 1,099,632 trainable parameters).
    BN, dropout and the linear layer's size as :class:`PnPAdaNetCritic`.
    """

    num_classes: int = 5
    features: int = 16
    dropout: float = 0.25
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        _check_rank4("x", x)
        if x.shape[-1] != self.num_classes:
            raise ValueError(
                f"x: expected the segmenter's {self.num_classes} logit channels, got {x.shape[-1]}"
            )
        b = self.features
        x = _critic_conv(self, b, 3, 2, "SAME", "mask_cls_1")(x, train)
        ax = self.axis_name
        x = _CriticStage(b, 2 * b, 5, 4, self.dropout, self.dtype, ax, name="mask_cls_2")(x, train)
        x = _CriticStage(4 * b, 8 * b, 5, 4, self.dropout, self.dtype, ax, name="mask_cls_3")(
            x, train
        )
        x = _critic_conv(self, 16 * b, 5, 4, "SYMMETRIC", "mask_cls_4")(x, train)
        return _flatten_linear(x, "m_cls_out")


def _shuffle_to(x, r, name, repeat_to_fill):
    c = x.shape[-1]
    if c % (r * r):
        if not repeat_to_fill:
            raise ValueError(
                f"features[{name!r}]: expected channels divisible by {r * r} (pixel shuffle x{r} "
                f"to the logits' resolution; a segmenter width that is a multiple of 8), got {c}; "
                f"pass repeat_to_fill=True for reduced widths"
            )
        n = -(-c // (r * r)) * r * r
        x = jnp.take(x, jnp.arange(n) % c, axis=-1)
    return tf_pixel_shuffle(x, r)


def critic_inputs(features: Mapping, logits, *, repeat_to_fill: bool = False):
    """The feature critic's input (``adversarial.py:320-335``): ``(B, H, W, 3·n4 + n6 + n7 + n9 + K + 1)``.

    ``features`` holds ``block4_2``, ``block6_2``, ``block7_2`` and ``conv9_2`` (``(B, H/r, W/r,
    C)``, as :class:`PnPAdaNet` returns them; other keys are ignored) and ``logits`` is ``(B, H, W,
    K)``. Each feature map is :func:`tf_pixel_shuffle`\\ d by r (8 for the segmenter) into n = C / r²
    channels; the result concatenates, in this order, ``tile x3`` of PS(block4_2) (channels
    ``[a, b, a, b, a, b]``), PS(block6_2), PS(block7_2), PS(conv9_2), the logits and the float
    argmax of the logits. At the paper's width: 6 + 4 + 8 + 8 + 5 + 1 = 32 channels.

    A channel count that is not a multiple of r² (segmenter widths that are not multiples of 8)
    raises ``ValueError``; ``repeat_to_fill=True`` (a medjax extension for reduced-width
    experiments, never used at the paper's width) first repeats the channels cyclically up to the
    next multiple of r².
    """
    logits = jnp.asarray(logits)
    _check_rank4("logits", logits)
    parts = []
    for name in FEATURE_NAMES.values():
        if name not in features:
            raise ValueError(
                f"features: expected {list(FEATURE_NAMES.values())}, got {sorted(features)}"
            )
        x = jnp.asarray(features[name])
        _check_rank4(f"features[{name!r}]", x)
        hf, wf = x.shape[1:3]
        r = logits.shape[1] // hf
        if x.shape[0] != logits.shape[0] or (hf * r, wf * r) != logits.shape[1:3]:
            raise ValueError(
                f"features[{name!r}]: expected batch {logits.shape[0]} and a spatial size that "
                f"divides the logits' {logits.shape[1:3]} by one integer factor, got {x.shape}"
            )
        parts.append(_shuffle_to(x, r, name, repeat_to_fill).astype(logits.dtype))
    parts[0] = jnp.tile(parts[0], (1, 1, 1, 3))
    argmax = jnp.argmax(logits, axis=-1)[..., None].astype(logits.dtype)
    return jnp.concatenate(parts + [logits, argmax], axis=-1)


def _is_critic_kernel(path) -> bool:
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    names = [str(n) for n in names if n is not None]
    return bool(names) and names[-1] == "kernel" and any("cls" in n for n in names[:-1])


def clip_mask(params):
    """A pytree of bools like ``params``: True on the critics' convolution and linear kernels.

    The original clips every critic variable whose name contains ``"cls"`` and ``"Variable"``
    (``adversarial.py:654``): the weights of both critics, not their BN gamma/beta. Here a leaf is
    True when it is a ``kernel`` under a module whose name contains ``"cls"`` (``cls_*``,
    ``mask_cls_*``, ``m_cls_out``), so ``params`` may be one critic's or a dict holding critics and
    segmenters (whose leaves stay False). Usable as an ``optax.masked`` mask.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_critic_kernel(path), params)


def clip_critic_weights(params, limit: float = 0.03):
    """``params`` with the :func:`clip_mask` leaves clipped to ``[-limit, limit]`` (the WGAN step)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.clip(p, -limit, limit) if _is_critic_kernel(path) else p, params
    )
