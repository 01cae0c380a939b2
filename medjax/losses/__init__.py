"""Losses: pure functions ``(pred, target, ...) -> scalar``; logits and images are channels-last.

Segmentation (logits (B, *S, C); targets int (B, *S) or one-hot/soft (B, *S, C)):
``soft_dice_loss``, ``generalized_dice_loss``, ``cross_entropy``, ``soft_cross_entropy``,
``focal_loss``, ``adaptive_tversky_loss``, ``dice_ce_loss``; MedicalZoo's ``bce_dice_loss``
(``binary_cross_entropy`` + its Dice) and ``weighted_cross_entropy`` (weights from the predictions).
MedicalZoo's Dice is ``soft_dice_loss(squared=True, eps=1e-6)`` (softmax; ``activation="sigmoid"`` as
the original).
Similarity: ``mse``, ``local_ncc`` (negative NCC), ``heatmap_mse``.
Regularisers: ``phi_l1``, ``displacement_l2_gradient``.
Adversarial: ``wgan_critic_loss``, ``wgan_generator_loss``.
VAE (ResNet3dVAE's regulariser): ``vae_loss`` / ``vae_loss_terms``.
Registration (model output dicts): ``joint_loss`` / ``joint_loss_terms`` / ``background_mask``
(Estienne 2020), ``voxelmorph_loss`` / ``voxelmorph_loss_terms``.
"""

from medjax.losses.adversarial import wgan_critic_loss, wgan_generator_loss
from medjax.losses.registration import (
    background_mask,
    joint_loss,
    joint_loss_terms,
    voxelmorph_loss,
    voxelmorph_loss_terms,
)
from medjax.losses.regularizers import displacement_l2_gradient, phi_l1
from medjax.losses.segmentation import (
    adaptive_tversky_loss,
    bce_dice_loss,
    binary_cross_entropy,
    cross_entropy,
    dice_ce_loss,
    focal_loss,
    generalized_dice_loss,
    soft_cross_entropy,
    soft_dice_loss,
    weighted_cross_entropy,
)
from medjax.losses.similarity import heatmap_mse, local_ncc, mse
from medjax.losses.vae import vae_loss, vae_loss_terms

__all__ = [
    "adaptive_tversky_loss",
    "background_mask",
    "bce_dice_loss",
    "binary_cross_entropy",
    "cross_entropy",
    "dice_ce_loss",
    "displacement_l2_gradient",
    "focal_loss",
    "generalized_dice_loss",
    "heatmap_mse",
    "joint_loss",
    "joint_loss_terms",
    "local_ncc",
    "mse",
    "phi_l1",
    "soft_cross_entropy",
    "soft_dice_loss",
    "vae_loss",
    "vae_loss_terms",
    "voxelmorph_loss",
    "voxelmorph_loss_terms",
    "wgan_critic_loss",
    "wgan_generator_loss",
    "weighted_cross_entropy",
]
