"""Registration losses of the networks in ``medjax.models``: the Estienne 2020 joint loss and VoxelMorph's.

They take a model's output dict and a batch, and return ``{"loss", <terms>}`` dicts of scalars
(``*_terms``) or the scalar loss.
"""

import jax
import jax.numpy as jnp

from medjax.losses.regularizers import displacement_l2_gradient, phi_l1
from medjax.losses.segmentation import cross_entropy
from medjax.losses.similarity import local_ncc, mse

__all__ = [
    "VOXELMORPH_SIMILARITIES",
    "background_mask",
    "joint_loss",
    "joint_loss_terms",
    "voxelmorph_loss",
    "voxelmorph_loss_terms",
]

VOXELMORPH_SIMILARITIES = ("mse", "ncc")


def background_mask(outputs):
    """Registration mask M (B, *S, 1): warped-moving AND fixed predictions are both background.

    Follows the paper: the moving segmentation is warped (``warped_seg``) before the AND. (The
    original code ANDed the *unwarped* moving prediction with the fixed one.) Gradients are stopped.
    """
    ws = jax.lax.stop_gradient(outputs["warped_seg"])
    fs = jax.lax.stop_gradient(outputs["seg_fixed"])
    m = (jnp.argmax(ws, axis=-1) == 0) & (jnp.argmax(fs, axis=-1) == 0)
    return m[..., None].astype(jnp.float32)


def joint_loss_terms(outputs, batch, *, masked=True, alpha=1e-10, beta=1.0, mask_normalize="total"):
    """All terms of the joint loss as a dict of scalars: ``loss``, ``reg``, ``seg``, ``phi_l1``.

    ``outputs``: the dict of :class:`JointRegSeg`. ``batch``: ``moving``/``fixed`` (B, *S, C) and, when
    ``beta != 0``, integer tumour labels ``tumour_moving``/``tumour_fixed`` (B, *S).
    L = L_reg + beta * L_seg + alpha * sum|Phi - 0.5|, with
    L_seg = 0.5 CE(seg_moving, tumour_moving) + 0.5 CE(seg_fixed, tumour_fixed) and L_reg the MSE
    between fixed and warped, or, when ``masked``, mean((R - D)^2 * M) over the TOTAL voxel count
    (M from :func:`background_mask`; ``mask_normalize="mask"`` divides by the mask's size instead).
    """
    for k in ("fixed",) + (("tumour_moving", "tumour_fixed") if beta else ()):
        if k not in batch:
            raise ValueError(f"batch: expected key {k!r}, got keys {sorted(batch)}")
    fixed = batch["fixed"].astype(jnp.float32)
    warped = outputs["warped"]
    if masked:
        l_reg = mse(warped, fixed, mask=background_mask(outputs), normalize=mask_normalize)
    else:
        l_reg = mse(warped, fixed)
    if beta:
        l_seg = 0.5 * cross_entropy(
            outputs["seg_moving_logits"], batch["tumour_moving"]
        ) + 0.5 * cross_entropy(outputs["seg_fixed_logits"], batch["tumour_fixed"])
    else:
        l_seg = jnp.zeros((), jnp.float32)
    l_phi = phi_l1(outputs["phi"])
    total = l_reg + beta * l_seg + alpha * l_phi
    return {"loss": total, "reg": l_reg, "seg": l_seg, "phi_l1": l_phi}


def joint_loss(outputs, batch, *, masked=True, alpha=1e-10, beta=1.0, mask_normalize="total"):
    """Scalar joint loss L = L_reg + beta * L_seg + alpha * sum|Phi - 0.5| (see :func:`joint_loss_terms`)."""
    return joint_loss_terms(
        outputs, batch, masked=masked, alpha=alpha, beta=beta, mask_normalize=mask_normalize
    )["loss"]


def voxelmorph_loss_terms(outputs, batch, *, similarity="mse", lam=0.01, ncc_window=9):
    """VoxelMorph loss terms: ``{"loss", "sim", "smooth"}`` with loss = sim + lam * smooth.

    ``sim`` is MSE(fixed, warped) or the negated local NCC (window ``ncc_window``); ``smooth`` is
    ``medjax.displacement_l2_gradient(displacement)``. ``batch["fixed"]``: (B, *S, C).
    """
    if similarity not in VOXELMORPH_SIMILARITIES:
        raise ValueError(
            f"similarity: expected one of {VOXELMORPH_SIMILARITIES}, got {similarity!r}"
        )
    if "fixed" not in batch:
        raise ValueError(f"batch: expected key 'fixed', got keys {sorted(batch)}")
    fixed = batch["fixed"].astype(jnp.float32)
    if similarity == "mse":
        sim = mse(outputs["warped"], fixed)
    else:
        sim = local_ncc(outputs["warped"], fixed, window=ncc_window)
    smooth = displacement_l2_gradient(outputs["displacement"])
    return {"loss": sim + lam * smooth, "sim": sim, "smooth": smooth}


def voxelmorph_loss(outputs, batch, *, similarity="mse", lam=0.01, ncc_window=9):
    """Scalar VoxelMorph loss: similarity + lam * mean squared displacement gradient."""
    return voxelmorph_loss_terms(
        outputs, batch, similarity=similarity, lam=lam, ncc_window=ncc_window
    )["loss"]
