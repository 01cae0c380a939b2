"""A folder of real-anatomy brains in the OASIS layout, made from one real T1 scan.

    python experiments/estienne2020/real_brains.py OUT_DIR [--scan test_scan.npz] [--n 10] [--spacing 4]

The scan (VoxelMorph's ``test_scan.npz``: a 160x192x224 T1 brain at 1 mm with a FreeSurfer
segmentation, in ``shared/data/voxelmorph/``) is averaged down to ``--spacing`` mm, its
FreeSurfer labels are grouped into three tissues (1 CSF and ventricles, 2 grey matter, cortical
and deep, 3 white matter, brainstem and the rest), and each of ``--n`` subjects is the template
under its own smooth random deformation (a small affine plus Gaussian-smoothed noise, the
experiment's :func:`subject_deformation`) with a random intensity gain and noise. Written as
``OASIS_OAS1_000k_MR1/aligned_norm.nii.gz`` and ``aligned_seg4.nii.gz`` (no seg35), so that
``--config.data=oasis`` trains and evaluates on it: a check that the joint network registers real
anatomy, not only the synthetic phantoms.

Ten subjects leave one test pair in the experiment's split. For more, register held-out subjects
(another ``--seed``: other deformations of the same template) with a trained work directory:

    python experiments/estienne2020/real_brains.py HELD_OUT_DIR --seed 1 --n 20 --evaluate WORKDIR

writes the folder if it is not there, restores the model once and registers the disjoint pairs
(subject 2k moving onto 2k + 1) with the experiment's ``predict``, what ``medjax predict`` runs
(``--refine N`` passed on), warps the moving tissue labels with each predicted displacement
(nearest neighbour), and prints and writes to ``WORKDIR/held_out.json``
(``held_out_refineN.json``) the tissue Dice before and after per pair, the folding, the means and
the paired bootstrap interval of the gain (``medjax.registration.pair_metrics``,
``medjax.evaluation.stats.paired_bootstrap``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

CSF = (4, 5, 14, 15, 24, 43, 44, 72)
GREY = (3, 8, 10, 11, 12, 13, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58)


def tissues(seg):
    """FreeSurfer labels -> 0 background, 1 CSF, 2 grey matter, 3 white matter (everything else)."""
    seg = np.asarray(seg).astype(np.int64)
    out = np.where(seg > 0, 3, 0)
    out[np.isin(seg, GREY)] = 2
    out[np.isin(seg, CSF)] = 1
    return out.astype(np.int16)


def downsample(vol, seg, factor):
    """Block-average the image and take each block's most frequent tissue (crops to a multiple)."""
    shape = tuple(s // factor * factor for s in vol.shape)
    vol, seg = vol[tuple(slice(0, s) for s in shape)], seg[tuple(slice(0, s) for s in shape)]
    small = tuple(s // factor for s in shape)
    blocks = (small[0], factor, small[1], factor, small[2], factor)
    image = vol.reshape(blocks).mean(axis=(1, 3, 5))
    onehot = np.stack([(seg == c).reshape(blocks).sum(axis=(1, 3, 5)) for c in range(4)], -1)
    return image.astype(np.float32), np.argmax(onehot, -1).astype(np.int16)


def make_folder(out, scan, *, n=10, spacing=4, seed=0):
    """Write ``n`` deformed copies of ``scan`` into ``out`` (OASIS layout); returns the folders."""
    import jax.numpy as jnp
    import nibabel as nib

    from medjax import ops

    here = pathlib.Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parents[1]))
    from medjax.train.experiment import load_experiment

    task = load_experiment("estienne2020").task_module
    data = np.load(scan)
    image, labels = downsample(data["vol"], tissues(data["seg"]), int(spacing))
    affine = np.diag([float(spacing)] * 3 + [1.0])
    rng = np.random.default_rng(seed)
    out = pathlib.Path(out)
    folders = []
    for k in range(n):
        disp = task.subject_deformation(seed * 1000 + k, image.shape, (6.0, 0.06, 2.0, 1.5, 3.0))
        d = jnp.asarray(disp[None])
        img = np.asarray(ops.warp(jnp.asarray(image[None, ..., None]), d, padding="zeros"))[
            0, ..., 0
        ]
        lab = np.asarray(ops.warp(jnp.asarray(labels[None, ..., None]), d, order=0))[0, ..., 0]
        img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.01 * img.std(), img.shape)
        folder = out / f"OASIS_OAS1_{k + 1:04d}_MR1"
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(img.astype(np.float32), affine), str(folder / "aligned_norm.nii.gz")
        )
        nib.save(
            nib.Nifti1Image(np.rint(lab).astype(np.int16), affine),
            str(folder / "aligned_seg4.nii.gz"),
        )
        folders.append(folder)
    return folders


def evaluate_held_out(workdir, folder, *, refine=0, log=print):
    """Register the disjoint pairs of ``folder`` (OASIS layout, aligned_seg4) with the model of
    ``workdir`` (restored once; the experiment's ``predict``, what ``medjax predict`` runs); returns (and writes to ``workdir/held_out.json``) the
    per-pair tissue Dice before/after, their means and the paired bootstrap of the gain.
    ``refine`` > 0 passes ``refine`` to predict (test-time refinement of every field) and writes
    ``held_out_refine<N>.json`` instead."""
    import json
    import time

    import nibabel as nib

    from medjax import registration
    from medjax.evaluation.stats import paired_bootstrap
    from medjax.train.config import config_from_json
    from medjax.train.experiment import load_experiment
    from medjax.train.workdir import restore_for_eval

    subjects = sorted(pathlib.Path(folder).glob("OASIS_OAS1_*_MR1"))
    if len(subjects) < 2:
        raise SystemExit(
            f"{folder}: expected at least 2 OASIS_OAS1_*_MR1 subjects, got {len(subjects)}"
        )
    config = config_from_json(json.loads((pathlib.Path(workdir) / "config.json").read_text()))
    experiment, state, _ = restore_for_eval(load_experiment("estienne2020"), config, workdir)
    load = lambda p: np.asarray(nib.load(str(p)).dataobj)  # noqa: E731
    pairs, before, after, folding, t0 = [], [], [], [], time.perf_counter()
    name = f"held_out_refine{refine}" if refine else "held_out"
    out_root = pathlib.Path(workdir) / name
    for k in range(len(subjects) // 2):
        mov, fix = subjects[2 * k], subjects[2 * k + 1]
        out = out_root / f"pair{k}"
        inputs = [mov / "aligned_norm.nii.gz", fix / "aligned_norm.nii.gz"]
        experiment.predict(state, inputs, out, refine=int(refine))
        disp = load(out / "displacement.nii.gz").astype(np.float32)[None]
        images = [load(s / "aligned_norm.nii.gz").astype(np.float32)[..., None] for s in (mov, fix)]
        labels = [load(s / "aligned_seg4.nii.gz").astype(np.int32) for s in (mov, fix)]
        warped = load(out / "warped.nii.gz").astype(np.float32)
        warped = warped[..., None] if warped.ndim == 3 else warped
        m, _ = registration.pair_metrics(
            images[0], images[1], warped, disp, labels=labels, num_labels=4
        )
        pairs.append(f"{mov.name} -> {fix.name}")
        before.append(m["anatomical_dice_before"])
        after.append(m["anatomical_dice_after"])
        folding.append(m["folding_percent"])
        log(
            f"{pairs[-1]}: tissue Dice {before[-1]:.3f} -> {after[-1]:.3f}, "
            f"{folding[-1]:.2f} % folding"
        )
    result = {
        "workdir": str(workdir),
        "folder": str(folder),
        "refine_steps": int(refine),
        "pairs": pairs,
        "dice_before": before,
        "dice_after": after,
        "mean_before": float(np.mean(before)),
        "mean_after": float(np.mean(after)),
        "folding_percent": folding,
        "mean_folding_percent": float(np.mean(folding)),
        "gain": paired_bootstrap(before, after),
        "wall_s": time.perf_counter() - t0,
    }
    (pathlib.Path(workdir) / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    g = result["gain"]
    gain = (
        ""
        if g is None
        else (
            f", gain {g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] "
            f"({g['improved']}/{g['n']} pairs improve)"
        )
    )
    log(
        f"{len(pairs)} held-out pairs: tissue Dice {result['mean_before']:.3f} -> "
        f"{result['mean_after']:.3f}{gain}; {result['mean_folding_percent']:.2f} % folding voxels"
    )
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    default = (
        pathlib.Path(__file__).resolve().parents[3]
        / "shared"
        / "data"
        / "voxelmorph"
        / "test_scan.npz"
    )
    p.add_argument("--scan", default=str(default))
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--spacing", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--evaluate",
        metavar="WORKDIR",
        help="register OUT_DIR's disjoint pairs with this trained work directory (OUT_DIR is "
        "written first if it holds no subjects)",
    )
    p.add_argument("--refine", type=int, default=0, help="with --evaluate: predict --refine N")
    a = p.parse_args(argv)
    if not (a.evaluate and any(pathlib.Path(a.out).glob("OASIS_OAS1_*_MR1"))):
        folders = make_folder(a.out, a.scan, n=a.n, spacing=a.spacing, seed=a.seed)
        print(f"{len(folders)} subjects in {a.out}")
    if a.evaluate:
        evaluate_held_out(a.evaluate, a.out, refine=a.refine)


if __name__ == "__main__":
    main()
