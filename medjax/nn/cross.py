"""UniverSeg cross-convolution blocks (Butoi et al., ICCV 2023), channels-last, 2D or 3D.

``CrossConv`` applies ONE shared kernel to ``[query || support_i]`` for every support element
``i``, written as ``jax.vmap`` over the support axis, so it accepts any support size and is
equivariant to permutations of the support set. ``CrossBlock`` is the released v1 block: no
nonlinearity after the cross conv, the query path takes the mean over the support, and separate
(unshared) query / support convs are each followed by LeakyReLU(0.01).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kaiming-normal, fan-in. The official code calls torch ``kaiming_normal_(w, nonlinearity="leaky_relu")``
# with the default slope a=0, so the gain is sqrt(2); linear layers (cross conv, head) use gain 1.
kaiming_leaky_relu = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
kaiming_linear = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

_DIMENSION_NUMBERS = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _check_ndim(ndim):
    if ndim not in _DIMENSION_NUMBERS:
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")


class CrossConv(nn.Module):
    """Shared-kernel conv of ``[query || support_i]`` for every support element ``i``.

    ``__call__(query, support)``: query ``(B, *S, Cq)``, support ``(B, N, *S, Cs)`` ->
    ``(B, N, *S, features)``. Query channels come first in the concatenation (as upstream).
    """

    features: int
    kernel_size: int = 3
    ndim: int = 2
    kernel_init: Callable = kaiming_linear
    bias_init: Callable = nn.initializers.zeros
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query, support):
        _check_ndim(self.ndim)
        nd = self.ndim
        if query.ndim != nd + 2:
            raise ValueError(
                f"query must have shape (B, *spatial[{nd}], C), got shape {tuple(query.shape)}"
            )
        if support.ndim != nd + 3:
            raise ValueError(
                f"support must have shape (B, N, *spatial[{nd}], C), got shape {tuple(support.shape)}"
            )
        if support.shape[0] != query.shape[0] or support.shape[2:-1] != query.shape[1:-1]:
            raise ValueError(
                f"support batch/spatial shape must match query (B={query.shape[0]}, "
                f"spatial={tuple(query.shape[1:-1])}), got support shape {tuple(support.shape)}"
            )
        in_features = query.shape[-1] + support.shape[-1]
        k = (self.kernel_size,) * nd
        kernel = self.param(
            "kernel", self.kernel_init, (*k, in_features, self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(query.dtype, support.dtype, self.param_dtype)
        query = query.astype(dtype)
        kernel, bias = kernel.astype(dtype), bias.astype(dtype)
        pad = self.kernel_size // 2

        def pair_conv(v):  # v: (B, *S, Cs), one support element per batch item
            x = jnp.concatenate([query, v.astype(dtype)], axis=-1)
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1,) * nd,
                padding=[(pad, pad)] * nd,
                dimension_numbers=_DIMENSION_NUMBERS[nd],
            )
            return y + bias

        return jax.vmap(pair_conv, in_axes=1, out_axes=1)(support)


class CrossConv3D(CrossConv):
    """3D ``CrossConv``: query ``(B, D, H, W, Cq)``, support ``(B, N, D, H, W, Cs)``."""

    ndim: int = 3


class CrossBlock(nn.Module):
    """UniverSeg v1 CrossBlock.

    ``__call__(query, support)``: query ``(B, *S, Cq)``, support ``(B, N, *S, Cs)`` ->
    ``(query' (B, *S, F), support' (B, N, *S, F))`` with ``F = conv_features or features``.
    """

    features: int
    conv_features: int | None = None
    ndim: int = 2
    negative_slope: float = 0.01
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, query, support):
        _check_ndim(self.ndim)
        nd = self.ndim
        out = self.conv_features or self.features
        z = CrossConv(self.features, ndim=nd, dtype=self.dtype, name="cross")(query, support)
        u = jnp.mean(z, axis=1)

        def conv(name):
            return nn.Conv(
                out,
                (3,) * nd,
                padding="SAME",
                kernel_init=kaiming_leaky_relu,
                bias_init=nn.initializers.zeros,
                dtype=self.dtype,
                name=name,
            )

        u = nn.leaky_relu(conv("query_conv")(u), self.negative_slope)
        b, n = z.shape[:2]
        v = conv("support_conv")(z.reshape((b * n, *z.shape[2:])))
        v = nn.leaky_relu(v, self.negative_slope).reshape((b, n, *v.shape[1:]))
        return u, v


class CrossBlock3D(CrossBlock):
    """3D ``CrossBlock``: query ``(B, D, H, W, Cq)``, support ``(B, N, D, H, W, Cs)``."""

    ndim: int = 3
