"""Pure array operations without parameters, channels-last, displacements in voxels.

``warp`` (spatial transformer), ``identity_grid`` / ``displacement_to_grid`` / ``grid_to_displacement``,
``integrate_gradients`` / ``integrate_velocity`` (deformation integration), ``resize`` (torch
``interpolate`` semantics, align_corners), ``pixel_shuffle``, ``one_hot``, ``gaussian_heatmap``,
``spatial_gradient`` / ``forward_differences``, ``crop_at`` / ``paste_at`` (boxes around traced centres).
"""

from medjax.ops.crop import crop_at, paste_at
from medjax.ops.integrate import integrate_gradients, integrate_velocity
from medjax.ops.misc import forward_differences, gaussian_heatmap, one_hot, spatial_gradient
from medjax.ops.resize import pixel_shuffle, resize
from medjax.ops.warp import displacement_to_grid, grid_to_displacement, identity_grid, warp

__all__ = [
    "warp",
    "identity_grid",
    "displacement_to_grid",
    "grid_to_displacement",
    "integrate_gradients",
    "integrate_velocity",
    "resize",
    "pixel_shuffle",
    "one_hot",
    "gaussian_heatmap",
    "spatial_gradient",
    "forward_differences",
    "crop_at",
    "paste_at",
]
