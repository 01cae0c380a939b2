"""Pairwise registration around any model: per-pair optimisation, test-time refinement, pair metrics
and the file side of registering two scans.

- :func:`objective`: ``mse(warp(moving, u), fixed) + lam * ||grad u||^2`` of a displacement ``u``.
- :func:`optimise_displacement`: Adam on a free displacement field (the classical per-pair
  registration that learned models are measured against), optionally from a model's field and
  keeping the best iterate; :func:`refine` is its jitted test-time-refinement form (uniGradICON
  offers its users the same): never worse than the field it starts from, on that objective.
- :func:`pair_metrics`: what a registered pair is judged by (image MSE before/after, folding, the
  Jacobian's spread, mean Dice of warped labels before/after, inside optional regions).
- :func:`load_pair`: two scans brought onto the fixed scan's grid through both affines, as
  registration tools do before anything else; :func:`write_pair_outputs` writes the results there.

Displacements are in voxels of the fixed grid, ``(B, *S, ndim)``, as everywhere in medjax.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics, ops
from medjax.losses import displacement_l2_gradient, mse

__all__ = [
    "load_pair",
    "objective",
    "optimise_displacement",
    "pair_metrics",
    "refine",
    "write_pair_outputs",
]


def objective(moving, fixed, u, lam):
    """The per-pair objective ``mse(warp(moving, u), fixed) + lam * ||grad u||^2`` (a scalar)."""
    return mse(ops.warp(moving, u), fixed) + lam * displacement_l2_gradient(u)


def optimise_displacement(moving, fixed, *, steps, lr, lam, init=None, keep_best=False):
    """Adam on a free displacement ``(B, *S, ndim)`` minimising :func:`objective` for ``steps`` steps.

    Starts from ``init`` (zero by default). With ``keep_best`` the iterate of the lowest objective
    is returned, ``init`` included, so the result is never worse than where it started.
    Jit-friendly (a ``lax.fori_loop``).
    """
    import optax

    tx = optax.adam(lr)
    value_and_grad = jax.value_and_grad(lambda u: objective(moving, fixed, u, lam))

    def body(_, carry):
        u, opt, best_u, best = carry
        value, grads = value_and_grad(u)
        better = value < best
        best_u = jnp.where(better, u, best_u)
        best = jnp.where(better, value, best)
        updates, opt = tx.update(grads, opt, u)
        return optax.apply_updates(u, updates), opt, best_u, best

    if init is None:
        init = jnp.zeros(moving.shape[:-1] + (moving.ndim - 2,), jnp.float32)
    carry = (init, tx.init(init), init, jnp.asarray(jnp.inf, jnp.float32))
    u, _, best_u, best = jax.lax.fori_loop(0, steps, body, carry)
    if not keep_best:
        return u
    final = objective(moving, fixed, u, lam)
    return jnp.where(final < best, u, best_u)


@functools.partial(jax.jit, static_argnames=("steps",))
def refine(moving, fixed, init, *, steps, lr, lam):
    """Test-time refinement of a field: ``(refined displacement, objective before, objective after)``.

    :func:`optimise_displacement` from ``init`` keeping the best iterate: the objective after is
    never above the objective before.
    """
    before = objective(moving, fixed, init, lam)
    u = optimise_displacement(moving, fixed, steps=steps, lr=lr, lam=lam, init=init, keep_best=True)
    return u, before, objective(moving, fixed, u, lam)


def mean_dice(pred, target, num_classes, region=None):
    """Mean Dice over the foreground labels present in ``target`` (inside ``region`` if given)."""
    from medjax.evaluation.segmentation import case_metrics

    if region is not None:
        pred, target = np.where(region, pred, 0), np.where(region, target, 0)
    return case_metrics(pred, target, num_classes=num_classes, surface=False)["mean_dice"]


def pair_metrics(
    moving, fixed, warped, displacement, *, labels=None, num_labels=None, regions=None
):
    """The metrics of one registered pair: ``(metrics dict, warped moving labels or None)``.

    ``moving``, ``fixed``, ``warped``: ``(*S, C)`` images; ``displacement``: ``(1, *S, ndim)``.
    Always ``image_mse_before/after``, ``folding_percent`` (non-positive Jacobian determinant),
    ``jacobian_std`` and ``displacement_mean_abs``. With ``labels = (moving_labels,
    fixed_labels)`` (``(*S)`` int, ``num_labels`` classes): ``anatomical_dice_before/after`` (the
    moving labels warped by nearest neighbour) and, for each ``regions[name]`` boolean mask,
    ``dice_<name>_before/after`` inside it.
    """
    det = np.asarray(metrics.jacobian_determinant(displacement))[0]
    m = {
        "image_mse_before": float(np.mean((moving - fixed) ** 2)),
        "image_mse_after": float(np.mean((warped - fixed) ** 2)),
        "folding_percent": float(100.0 * np.mean(det <= 0)),
        "jacobian_std": float(np.std(det)),
        "displacement_mean_abs": float(np.mean(np.abs(displacement))),
    }
    if labels is None:
        return m, None
    lm, lf = labels
    warped_lab = np.asarray(ops.warp(lm[None, ..., None], displacement, order=0))[0, ..., 0]
    m["anatomical_dice_before"] = mean_dice(lm, lf, num_labels)
    m["anatomical_dice_after"] = mean_dice(warped_lab, lf, num_labels)
    for name, region in (regions or {}).items():
        m[f"dice_{name}_before"] = mean_dice(lm, lf, num_labels, region)
        m[f"dice_{name}_after"] = mean_dice(warped_lab, lf, num_labels, region)
    return m, warped_lab


def load_pair(moving_path, fixed_path, *, channels=None):
    """``(moving, fixed, resampled)``: two scans as :class:`medjax.data.io.Image` s on one grid.

    When their grids differ (shape or affine), the moving scan is resampled onto the fixed scan's
    grid through both affines (:func:`medjax.data.io.resample_to`); ``resampled`` says so.
    ``channels`` checks both scans' channel count (``ValueError`` naming the file otherwise).
    """
    from medjax.data.io import load_image, resample_to, same_grid

    mov, fix = load_image(moving_path), load_image(fixed_path)
    for name, im, path in (("moving", mov, moving_path), ("fixed", fix, fixed_path)):
        if im.array.ndim != 4 or (channels is not None and im.array.shape[-1] != channels):
            raise ValueError(
                f"inputs ({name} {path}): expected a 3D volume with {channels} channel(s), "
                f"got array shape {im.array.shape}"
            )
    resampled = not same_grid(mov, fix)
    if resampled:
        mov = resample_to(mov, fix)
    return mov, fix, resampled


def write_pair_outputs(out_dir, fixed, moving, displacement, segmentations=None):
    """Write a registered pair on the fixed grid (the fixed scan's affine and header): paths.

    ``displacement.nii.gz`` ``(*S, ndim)`` in fixed-grid voxels and ``warped.nii.gz`` (the moving
    scan, in its own intensities, warped by it); each ``segmentations[name]`` ``(*S)`` int label
    map as ``<name>.nii.gz``.
    """
    from medjax.data.io import save_image

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    disp = np.asarray(displacement)
    warped = np.asarray(ops.warp(moving.array[None], disp[None], order=1, padding="border"))[0]
    written = [
        save_image(out_dir / "displacement.nii.gz", disp, like=fixed),
        save_image(out_dir / "warped.nii.gz", warped, like=fixed),
    ]
    for name, seg in (segmentations or {}).items():
        written.append(
            save_image(out_dir / f"{name}.nii.gz", np.asarray(seg, np.int32), like=fixed)
        )
    return [pathlib.Path(p) for p in written]


# ------------------------------------------------------------------------------------ reports

#: the pair metrics in a report: (label, key without the _before/_after/_refined suffix)
REPORT_ROWS = (
    ("anatomical Dice", "anatomical_dice"),
    ("image MSE", "image_mse"),
)


def _cell(results, key, digits=3):
    from medjax.evaluation.report import mean_std

    return mean_std(results.get(key), results.get(f"{key}_std"), digits)


def report(results, *, title, rows=REPORT_ROWS, extra_rows=(), refine_steps=0):
    """Markdown report of a registration evaluation: before (identity) / after (/ refined).

    ``rows`` are ``(label, key)`` pairs of ``key_before``/``key_after``/``key_refined`` means;
    folding and the Jacobian's spread follow; ``extra_rows`` are ``(label, key)`` of one-column
    results (e.g. a segmentation's Dice). Then the paired change of the anatomical Dice over the
    pairs (``results["per_pair"]``) and, with refinement, what it added.
    """
    from medjax.evaluation.report import gain_cell, markdown_table, paired_gain

    n = results.get("num_test_pairs", 0)
    refined = "anatomical_dice_refined" in results
    header = ["metric", "before (identity)", "after"]
    if refined:
        header.append(f"after + {refine_steps}-step refinement")
    body = []
    for label, key in rows:
        if f"{key}_after" in results:
            line = [label, _cell(results, f"{key}_before"), _cell(results, f"{key}_after")]
            body.append(line + ([_cell(results, f"{key}_refined")] if refined else []))
    for label, key in (("% folding voxels", "folding_percent"), ("Jacobian std", "jacobian_std")):
        line = [label, "0.000", _cell(results, key)]
        body.append(line + ([_cell(results, f"{key}_refined")] if refined else []))
    for label, key in extra_rows:
        if key in results:
            body.append([label, "-", _cell(results, key)] + (["-"] if refined else []))
    lines = [title, "", markdown_table(header, body)]
    gain = paired_gain(results, "anatomical_dice_before", "anatomical_dice_after")
    if gain is not None:
        lo, hi = gain["ci95"]
        lines += [
            "",
            f"anatomical Dice after - before, paired over test pairs: {gain['mean']:+.3f} "
            f"(95 % bootstrap CI {lo:+.3f} to {hi:+.3f}); it improves on {gain['improved']} "
            f"of {gain['n']} pairs",
        ]
    elif n < 2:
        lines += ["", f"these numbers rest on {n} test pair(s): no interval can be given"]
    if refined:
        g = paired_gain(results, "anatomical_dice_after", "anatomical_dice_refined")
        lines += [
            "",
            f"test-time refinement ({refine_steps} Adam steps per pair, "
            f"{results.get('refine_s', float('nan')):.2f} s per pair): anatomical Dice "
            f"{gain_cell(g) if g else '-'} over the network's field; objective "
            f"{results.get('refine_objective_before', float('nan')):.4f} -> "
            f"{results.get('refine_objective_after', float('nan')):.4f}",
        ]
    return "\n".join(lines)


def compare_table(rows, columns):
    """The comparison table of registration rows: means ± stds per ``(header, key[, digits])`` of
    ``columns`` (the first is the anatomical Dice), the paired Dice gain over the identity, the
    training time, and for a row evaluated with refinement a second line of its refined numbers."""
    from medjax.evaluation.report import gain_cell, markdown_table, mean_std, paired_gain

    head = ["Variant", columns[0][0], "Dice gain [95% CI] (pairs improved)"]
    head += [c[0] for c in columns[1:]] + ["Train (s)"]
    body = []
    for r in rows.values():
        for refined in (False, True):
            if refined and "anatomical_dice_refined" not in r:
                continue
            suffix = "_refined" if refined else "_after"
            g = paired_gain(r, "anatomical_dice_before", f"anatomical_dice{suffix}")
            label = r.get("label", r.get("row"))
            if refined:
                steps = r.get("config", {}).get("eval", {}).get("refine_steps", "?")
                label = f"{label} + {steps}-step refinement"
            cells = [label]
            for i, col in enumerate(columns):
                if i == 1:
                    cells.append(gain_cell(g) if g and (g["mean"] or g["improved"]) else "-")
                key = col[1]
                if refined:  # the refined twin of a registration metric, if there is one
                    base = key.removesuffix("_after")
                    key = f"{base}_refined" if f"{base}_refined" in r else None
                digits = col[2] if len(col) > 2 else 3
                cells.append(mean_std(r.get(key), r.get(f"{key}_std"), digits) if key else "-")
            if refined:
                cells.append(f"+{r.get('refine_s', float('nan')):.1f}/pair")
            else:
                tw = r.get("train_wall_s")
                cells.append(f"{tw:.0f}" if isinstance(tw, int | float) else "-")
            body.append(cells)
    return markdown_table(head, body)
