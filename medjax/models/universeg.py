"""UniverSeg: universal in-context segmentation (Butoi et al., ICCV 2023), released v1 network.

A query image is segmented from a support set of (image, binary label) pairs of the same task,
without fine-tuning. Channels-last: query ``(B, H, W, 1)``, support images and labels
``(B, S, H, W, 1)`` with intensities in [0, 1] -> logits ``(B, H, W, 1)``.

``load_pytorch_weights`` converts the official PyTorch ``state_dict``
(``universeg_v1_nf64_ss64_STA.pt``) to Flax variables for ``UniverSeg()``.
"""

import functools
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.cross import CrossBlock, kaiming_linear
from medjax.ops import resize


def _is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def validate_inputs(query, support_images, support_labels, *, ndim=2, levels=4):
    """Raise ``ValueError`` unless query ``(B, *S, 1)`` and support ``(B, N, *S, 1)`` pairs fit.

    Checks the ranks, one channel each, the same batch and spatial size, ``N >= 1`` with as many
    labels as images, a spatial size divisible by ``2 ** (levels - 1)``, and (for concrete arrays)
    labels in [0, 1].
    """
    q, si, sl = (jnp.shape(a) for a in (query, support_images, support_labels))
    if len(q) != ndim + 2 or q[-1] != 1:
        raise ValueError(f"query must have shape (B, *spatial[{ndim}], 1), got shape {q}")
    if len(si) != ndim + 3 or si[-1] != 1:
        raise ValueError(
            f"support_images must have shape (B, S, *spatial[{ndim}], 1), got shape {si}"
        )
    if len(sl) != ndim + 3 or sl[-1] != 1:
        raise ValueError(
            f"support_labels must have shape (B, S, *spatial[{ndim}], 1), got shape {sl}"
        )
    if si[1] == 0 or sl[1] == 0:
        raise ValueError(
            f"support set must not be empty: expected S >= 1, got support_images shape {si} "
            f"and support_labels shape {sl}"
        )
    if si[1] != sl[1]:
        raise ValueError(
            f"support_labels must hold one label per support image: expected S={si[1]}, "
            f"got S={sl[1]} (support_labels shape {sl})"
        )
    if si != sl:
        raise ValueError(f"support_labels shape must equal support_images shape {si}, got {sl}")
    if si[0] != q[0] or si[2:-1] != q[1:-1]:
        raise ValueError(
            f"support_images must have batch {q[0]} and spatial size {q[1:-1]} like query, "
            f"got shape {si}"
        )
    div = 2 ** (levels - 1)
    if any(s % div for s in q[1:-1]):
        raise ValueError(
            f"query spatial size must be divisible by {div} ({levels} levels), got {q[1:-1]}"
        )
    if _is_concrete(support_labels):
        labels = np.asarray(support_labels)
        bad = labels[(labels != 0) & (labels != 1)]
        if bad.size:
            raise ValueError(
                "support_labels must be binary masks with values 0 and 1 (threshold soft or "
                "resized masks; for multi-class labels use one binary task per label value), "
                f"got {bad.size} other value(s), e.g. {np.unique(bad)[:5].tolist()}"
            )


class UniverSeg(nn.Module):
    """UniverSeg v1: 4 encoder + 3 decoder CrossBlocks of 64 channels, 1x1 head (logits).

    ``__call__(query, support_images, support_labels)``: query ``(B, *S, 1)``, support images
    and labels ``(B, N, *S, 1)`` in [0, 1] -> logits ``(B, *S, 1)``. ``ndim=3`` gives the native
    3D variant (trilinear upsampling). The default model has 1,182,785 parameters.
    """

    encoder_features: Sequence[int] = (64, 64, 64, 64)
    decoder_features: Sequence[int] | None = None  # default: encoder_features[-2::-1]
    ndim: int = 2
    dtype: jnp.dtype | None = None

    def apply(self, variables, *args, **kwargs):
        """``nn.Module.apply``; also accepts ``{"params": load_pytorch_weights(...)}``.

        :func:`load_pytorch_weights` returns variables ``{"params": tree}`` like ``init``, so
        ``apply(weights, ...)`` is the usual call; wrapping them once more, as one would wrap a bare
        params tree, is unwrapped here instead of failing on a missing ``enc_0``.
        """
        inner = variables.get("params") if hasattr(variables, "get") else None
        if hasattr(inner, "keys") and set(inner.keys()) == {"params"}:
            variables = {**variables, "params": inner["params"]}
        return super().apply(variables, *args, **kwargs)

    @nn.compact
    def __call__(self, query, support_images, support_labels, *, train: bool = False):
        del train  # no dropout or normalisation in UniverSeg
        nd = self.ndim
        enc = tuple(self.encoder_features)
        dec = tuple(self.decoder_features) if self.decoder_features is not None else enc[-2::-1]
        if len(dec) > len(enc) - 1:
            raise ValueError(
                f"decoder_features must have at most {len(enc) - 1} levels, got {len(dec)}"
            )
        validate_inputs(query, support_images, support_labels, ndim=nd, levels=len(enc))
        dtype = self.dtype or jnp.float32
        u = query.astype(dtype)
        v = jnp.concatenate([support_images, support_labels], axis=-1).astype(dtype)
        window = (2,) * nd

        def over_support(fn, x):
            b, n = x.shape[:2]
            y = fn(x.reshape((b * n, *x.shape[2:])))
            return y.reshape((b, n, *y.shape[1:]))

        def pool(x):
            return nn.max_pool(x, window, strides=window, padding="VALID")

        def up(x):
            return resize(x, 2, align_corners=True)

        skips = []
        for i, f in enumerate(enc):
            u, v = CrossBlock(f, ndim=nd, dtype=self.dtype, name=f"enc_{i}")(u, v)
            if i == len(enc) - 1:
                break
            skips.append((u, v))
            u, v = pool(u), over_support(pool, v)
        for i, f in enumerate(dec):
            su, sv = skips.pop()
            u = jnp.concatenate([up(u), su], axis=-1)
            v = jnp.concatenate([over_support(up, v), sv], axis=-1)
            u, v = CrossBlock(f, ndim=nd, dtype=self.dtype, name=f"dec_{i}")(u, v)
        head = nn.Conv(1, (1,) * nd, kernel_init=kaiming_linear, dtype=self.dtype, name="head")
        return head(u).astype(jnp.float32)


class UniverSeg3D(UniverSeg):
    """Native 3D UniverSeg: query ``(B, D, H, W, 1)``, support ``(B, N, D, H, W, 1)`` -> logits."""

    ndim: int = 3


# ----------------------------------------------------------------------------------------------
# Official PyTorch weights


def _torch_block_keys(prefix):
    return {
        ("cross",): f"{prefix}.cross.cross_conv",
        ("query_conv",): f"{prefix}.target.vmapped.conv",
        ("support_conv",): f"{prefix}.support.vmapped.conv",
    }


def _as_numpy_state_dict(path_or_state_dict):
    src = path_or_state_dict
    if isinstance(src, str | os.PathLike):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise ValueError(f"path_or_state_dict: file {path!r} does not exist")
        if path.endswith(".npz"):
            with np.load(path) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        try:
            import torch
        except ImportError as e:
            raise ValueError(
                f"path_or_state_dict: reading {path!r} needs torch; convert it to .npz with the "
                "same keys or install torch"
            ) from e
        src = torch.load(path, map_location="cpu", weights_only=True)
    if not hasattr(src, "items"):
        raise ValueError(
            f"path_or_state_dict must be a path (.pt/.npz) or a mapping of arrays, got {type(src)}"
        )
    out = {}
    for k, val in src.items():
        if hasattr(val, "detach"):  # torch tensor
            val = val.detach().cpu().numpy()
        out[k] = np.asarray(val, dtype=np.float32)
    return out


def load_pytorch_weights(path_or_state_dict):
    """Convert an official UniverSeg PyTorch ``state_dict`` to Flax variables ``{"params": ...}``.

    Accepts a ``.pt`` path (loaded with ``torch.load(weights_only=True)``), an ``.npz`` of the
    same keys, or a mapping ``name -> array``. Conv weights go OIHW -> HWIO. The number of
    encoder / decoder blocks is read from the keys; use the result with
    ``UniverSeg(encoder_features=...)`` of matching widths (``UniverSeg()`` for v1).
    """
    sd = _as_numpy_state_dict(path_or_state_dict)
    n_enc = len({k.split(".")[1] for k in sd if k.startswith("enc_blocks.")})
    n_dec = len({k.split(".")[1] for k in sd if k.startswith("dec_blocks.")})
    if n_enc == 0 or "out_conv.conv.weight" not in sd:
        raise ValueError(
            "path_or_state_dict: expected UniverSeg keys 'enc_blocks.<i>.cross.cross_conv.weight' "
            f"... and 'out_conv.conv.weight', got keys {sorted(sd)[:6]}..."
        )
    used = set()

    def conv(prefix):
        w, b = sd.get(prefix + ".weight"), sd.get(prefix + ".bias")
        if w is None or b is None:
            raise ValueError(f"path_or_state_dict: missing '{prefix}.weight' or '{prefix}.bias'")
        if w.ndim not in (4, 5):
            raise ValueError(
                f"path_or_state_dict: '{prefix}.weight' must be OIHW or OIDHW, got {w.shape}"
            )
        used.update((prefix + ".weight", prefix + ".bias"))
        perm = tuple(range(2, w.ndim)) + (1, 0)  # OI[D]HW -> [D]HWIO
        return {"kernel": jnp.asarray(w.transpose(perm)), "bias": jnp.asarray(b)}

    params = {}
    for kind, n, name in (("enc_blocks", n_enc, "enc"), ("dec_blocks", n_dec, "dec")):
        for i in range(n):
            keys = _torch_block_keys(f"{kind}.{i}")
            params[f"{name}_{i}"] = {sub[0]: conv(tk) for sub, tk in keys.items()}
    params["head"] = conv("out_conv.conv")
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"path_or_state_dict: unexpected keys {unused[:6]}")
    return {"params": params}


# ----------------------------------------------------------------------------------------------
# Inference helpers


@functools.partial(jax.jit, static_argnums=0)
def _sigmoid_apply(model, params, query, support_images, support_labels):
    return jax.nn.sigmoid(model.apply(params, query, support_images, support_labels))


def predict(params, query, support_images, support_labels, *, model=None):
    """Foreground probabilities ``(B, *S, 1)`` = sigmoid(UniverSeg logits), jitted per model.

    ``params`` are the Flax variables (``model.init(...)`` or ``load_pytorch_weights(...)``);
    ``model`` defaults to ``UniverSeg()``.
    """
    model = UniverSeg() if model is None else model
    levels = len(tuple(model.encoder_features))
    validate_inputs(query, support_images, support_labels, ndim=model.ndim, levels=levels)
    return _sigmoid_apply(model, params, query, support_images, support_labels)


def predict_ensemble(
    params, query, support_images, support_labels, *, key, num_subsets, subset_size, model=None
):
    """Mean probability ``(B, *S, 1)`` over ``num_subsets`` random support subsets.

    Each subset draws ``subset_size`` of the ``S`` support pairs without replacement
    (independently per subset, the same for every batch item).
    """
    s = support_images.shape[1]
    if not 1 <= subset_size <= s:
        raise ValueError(f"subset_size must be in [1, {s}], got {subset_size}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    validate_inputs(query, support_images, support_labels, ndim=query.ndim - 2, levels=1)
    total = 0.0
    for k in jax.random.split(key, num_subsets):
        idx = jax.random.permutation(k, s)[:subset_size]
        total = total + predict(
            params, query, support_images[:, idx], support_labels[:, idx], model=model
        )
    return total / num_subsets


def predict_multiclass(
    params, query, support_images, support_label_map, *, labels, model=None, threshold=0.5
):
    """Integer label map ``(B, *S)``: one binary task per value in ``labels``, then argmax.

    ``support_label_map`` ``(B, N, *S, 1)`` holds integer labels; a voxel gets the label with the
    highest probability when that probability exceeds ``threshold``, else background 0.
    """
    labels = tuple(int(v) for v in labels)
    if not labels or 0 in labels:
        raise ValueError(f"labels must be non-empty foreground values (no 0), got {labels}")
    probs = [
        predict(
            params,
            query,
            support_images,
            (support_label_map == v).astype(jnp.float32),
            model=model,
        )[..., 0]
        for v in labels
    ]
    probs = jnp.stack(probs, axis=-1)
    best = jnp.argmax(probs, axis=-1)
    lut = jnp.asarray(labels)
    return jnp.where(jnp.max(probs, axis=-1) > threshold, lut[best], 0)


def segment_volume_2d(
    model, params, volume, support_images, support_labels, *, axis=2, batch_size=8
):
    """Segment a 3D volume slice by slice along ``axis`` with a 2D support set.

    volume ``(X, Y, Z)`` or ``(X, Y, Z, 1)``; support images / labels ``(S, H, W, 1)`` where
    ``(H, W)`` is the slice shape. Returns foreground probabilities of shape ``(X, Y, Z)``.
    """
    vol = jnp.asarray(volume, jnp.float32)
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"volume must have shape (X, Y, Z) or (X, Y, Z, 1), got {volume.shape}")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    axis = axis % 3
    slices = jnp.moveaxis(vol, axis, 0)[..., None]  # (n, H, W, 1)
    si, sl = jnp.asarray(support_images), jnp.asarray(support_labels)
    if si.ndim != 4 or si.shape[1:] != slices.shape[1:]:
        raise ValueError(
            f"support_images must have shape (S, {slices.shape[1]}, {slices.shape[2]}, 1) to "
            f"match slices along axis {axis}, got {si.shape}"
        )
    validate_inputs(slices[:1], si[None], sl[None], ndim=2, levels=1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def run(q):
        b = q.shape[0]
        si_b = jnp.broadcast_to(si[None], (b, *si.shape))
        sl_b = jnp.broadcast_to(sl[None], (b, *sl.shape))
        return _sigmoid_apply(model, params, q, si_b, sl_b)[..., 0]

    n = slices.shape[0]
    outs = []
    for start in range(0, n, batch_size):
        chunk = slices[start : start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad and n > batch_size:  # keep one compiled shape
            chunk = jnp.concatenate([chunk, jnp.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outs.append(run(chunk)[: batch_size - pad if pad and n > batch_size else None])
    probs = jnp.concatenate(outs, axis=0)
    return jnp.moveaxis(probs, 0, axis)
