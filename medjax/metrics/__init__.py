"""Evaluation metrics.

Overlap (JAX): ``dice`` (B, C) with MONAI semantics, ``confusion_matrix``.
Surface (host-side NumPy/SciPy): ``hausdorff_distance`` (percentile HD, default HD95),
``surface_distance`` (ASSD when symmetric).
Deformation (JAX): ``jacobian_determinant``, ``folding_fraction``.
"""

from medjax.metrics.deformation import folding_fraction, jacobian_determinant
from medjax.metrics.overlap import confusion_matrix, dice
from medjax.metrics.surface import hausdorff_distance, surface_distance

__all__ = [
    "confusion_matrix",
    "dice",
    "folding_fraction",
    "hausdorff_distance",
    "jacobian_determinant",
    "surface_distance",
]
