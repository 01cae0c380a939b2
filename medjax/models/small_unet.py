"""A small U-Net: the plain supervised baseline that several experiments train per task or per dataset.

Three levels by default (two 2^d max-pools), two 3^d conv + ReLU per level, upsampling by linear
interpolation (``medjax.ops.resize``, align_corners) and skip concatenation, a 1^d head to
``out_channels`` logits. 2D or 3D (the kernel rank follows the input). UniverSeg's per-task
supervised baseline is ``SmallUNet(16)`` on 2D slices.

``norm`` (default None: no normalisation, the network above exactly) inserts a norm between each
3^d conv (then without a bias, which the norm would cancel) and its ReLU: a name (``"batch"``, ``"instance"``, ``"group"``) or a module factory, e.g.
``functools.partial(medjax.nn.norm.BatchNorm, axis_name="batch")`` for synchronised BatchNorm
under ``pmap`` (see :func:`medjax.nn.norm.make_norm`). BatchNorm keeps running statistics in the
``batch_stats`` collection: apply with ``train=True, mutable=["batch_stats"]`` to train.
``axis_name`` (with ``norm="batch"``) synchronises its statistics over a ``pmap`` axis, as every
batch-normed network of the registry does.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.nn.norm import BatchNorm, make_norm
from medjax.ops import resize

__all__ = ["SmallUNet"]


class SmallUNet(nn.Module):
    """``(B, *S, C) -> logits (B, *S, out_channels)``; spatial sizes divisible by ``2**(levels-1)``."""

    features: int = 16
    out_channels: int = 1
    levels: int = 3
    norm: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        n = x.ndim - 2
        factor = 2 ** (self.levels - 1)
        if any(s % factor for s in x.shape[1:-1]):
            raise ValueError(
                f"x: expected spatial sizes divisible by {factor} for {self.levels} levels, "
                f"got {tuple(x.shape[1:-1])}"
            )
        norm = None if self.norm is None else make_norm(self.norm)
        if self.axis_name is not None and norm is BatchNorm:
            norm = make_norm(norm, axis_name=self.axis_name)

        def block(h, f):
            for _ in range(2):
                h = nn.Conv(f, (3,) * n, use_bias=norm is None)(h)
                if norm is not None:
                    h = norm()(h, train=train)
                h = nn.relu(h)
            return h

        skips, h = [], x
        for level in range(self.levels - 1):
            h = block(h, self.features * 2**level)
            skips.append(h)
            h = nn.max_pool(h, (2,) * n, (2,) * n)
        h = block(h, self.features * 2 ** (self.levels - 1))
        for level in reversed(range(self.levels - 1)):
            h = block(jnp.concatenate([resize(h, 2), skips[level]], -1), self.features * 2**level)
        return nn.Conv(self.out_channels, (1,) * n)(h)
