"""Input validation shared by the metrics (not public)."""

import jax
import numpy as np


def is_concrete(x):
    """True when ``x`` holds values (not a tracer inside jit/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_label_maps(pred, target, num_classes):
    """Validate a pair of integer label maps (B, *S) with labels in [0, num_classes)."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    for name, x in (("pred", pred), ("target", target)):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must be an integer label map (B, *spatial) of rank >= 2; got shape {tuple(x.shape)}"
            )
    if pred.shape != target.shape:
        raise ValueError(
            f"target must have pred's shape {tuple(pred.shape)}; got {tuple(target.shape)}"
        )
    for name, x in (("pred", pred), ("target", target)):
        if not is_concrete(x):
            continue
        a = np.asarray(x)
        if a.dtype == bool:
            a = a.astype(np.int64)
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise ValueError(f"{name} must hold integer labels; got dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating):
            if np.isnan(a).any():
                raise ValueError(f"{name} contains NaN; expected integer labels")
            if (a != np.round(a)).any():
                raise ValueError(f"{name} contains non-integer values; expected integer labels")
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}); got range [{a.min()}, {a.max()}]"
            )


def check_displacement(disp, name="disp"):
    """Validate a displacement field (B, *S, ndim) with ndim in {2, 3}; return it as float."""
    if disp.ndim not in (4, 5) or disp.shape[-1] != disp.ndim - 2:
        raise ValueError(
            f"{name} must have shape (B, *spatial, ndim) with 2 or 3 spatial axes and ndim = number of "
            f"spatial axes; got {tuple(disp.shape)}"
        )
    if any(s < 2 for s in disp.shape[1:-1]):
        raise ValueError(
            f"{name} needs >= 2 voxels along every spatial axis; got {tuple(disp.shape)}"
        )
    if is_concrete(disp) and np.isnan(np.asarray(disp)).any():
        raise ValueError(f"{name} contains NaN")
