"""Estienne et al. 2020 ablation: train and evaluate variants (a)-(g) and (d'), write one comparison table.

    python experiments/estienne2020/compare.py --variant quick --workdir runs/estienne2020_compare

Variants: (a) joint, subtraction merge, tumour-masked loss (the paper's model); (b) joint,
concatenation merge; (c) joint without the mask; (d) the VoxelMorph-style baseline (λ = 0.01) and
(d') the same with λ = 0.1 (regularity matched to z-scored images); (e) the
segmentation-only V-Net; (f) the identity (no registration); (g) a reference that is not learned:
every test pair registered by its own 300-step optimisation of a free displacement. Each trains with ``medjax.train.fit``
in ``<workdir>/<name>`` (rerun the command to resume; finished variants are not retrained and
their ``results.json`` is reused) and is evaluated on the same synthetic test pairs. Writes
``<workdir>/comparison.md`` and ``comparison.json`` (mean +- std over test pairs) and
``<workdir>/figures/compare_*.png``; ``--export_figures DIR`` also copies the figures there.
``--only a,d,f`` runs a subset; ``--config.KEY=VALUE`` overrides apply to every variant (e.g.
``--config.num_steps=200``).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
NAME = "estienne2020"

# key -> (label, config overrides)
VARIANTS = {
    "a_joint_sub_masked": (
        "(a) joint, subtraction, masked",
        ["model.kind=joint", "model.merge=subtract", "model.masked=True"],
    ),
    "b_joint_concat": (
        "(b) joint, concatenation, masked",
        ["model.kind=joint", "model.merge=concat", "model.masked=True"],
    ),
    "c_joint_nomask": (
        "(c) joint, subtraction, no mask",
        ["model.kind=joint", "model.merge=subtract", "model.masked=False"],
    ),
    "d_voxelmorph": ("(d) VoxelMorph", ["model.kind=voxelmorph"]),
    # VoxelMorph's MSE weight 0.01 is for intensities in [0, 1]; these images are z-scored (about 16x
    # the variance), so (d') scales it to 0.1, the per-pair reference's weight: regularity matched.
    "d2_voxelmorph_smooth": (
        "(d') VoxelMorph, λ = 0.1",
        ["model.kind=voxelmorph", "loss.vxm_lambda=0.1"],
    ),
    "e_segonly": ("(e) segmentation only (V-Net)", ["model.kind=segonly"]),
    "f_identity": ("(f) identity", ["model.kind=identity"]),
    "g_optimise": ("(g) per-pair optimisation (reference)", ["model.kind=optimise"]),
}

# table columns: (header, results key)
COLUMNS = [
    ("Anat. Dice", "anatomical_dice_after"),
    ("Dice near tumour", "dice_near_tumour_after"),
    ("Dice far from tumour", "dice_far_tumour_after"),
    ("Tumour Dice NCR", "tumour_dice_ncr"),
    ("Tumour Dice ED", "tumour_dice_ed"),
    ("Tumour Dice ET", "tumour_dice_et"),
    ("Tumour Dice whole", "tumour_dice_whole"),
    ("Image MSE", "image_mse_after"),
    ("% folding", "folding_percent"),
    ("Jacobian std", "jacobian_std"),
]


def _fmt(mean, std, digits=3):
    if mean is None or not math.isfinite(mean):
        return "-"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _select(only):
    if not only:
        return list(VARIANTS)
    keys = []
    for item in only.split(","):
        item = item.strip()
        match = [k for k in VARIANTS if k == item or k.split("_")[0] == item]
        if not match:
            raise SystemExit(
                f"--only: expected variant letters or names from {list(VARIANTS)}, got {item!r}"
            )
        keys += match
    return keys


def run_variant(spec, key, variant, overrides, root, log=print):
    """Train (resumably) and evaluate one variant; returns its results dict (also in results.json)."""
    import jax

    from medjax.train.config import load_config
    from medjax.train.loop import fit

    label, own = VARIANTS[key]
    config = load_config(NAME, variant, own + list(overrides), directory=HERE.parent)
    workdir = root / key
    workdir.mkdir(parents=True, exist_ok=True)
    experiment = spec.build(config)
    timing_path = workdir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    if config.model.kind in spec.task_module.UNTRAINED:
        from medjax.train.config import config_to_json

        (workdir / "config.json").write_text(config_to_json(config) + "\n")
        state, step = None, 0
        train_wall = 0.0
    else:
        log(f"{label}: training {config.num_steps} steps in {workdir}")
        state, summary = fit(experiment, config, workdir)
        step = int(summary["step"])
        if summary["step"] > summary["start_step"]:
            timing["train_wall_s"] = timing.get("train_wall_s", 0.0) + summary["wall_s"]
            timing["train_steps"] = step
        train_wall = timing.get("train_wall_s", float("nan"))
    res_path = workdir / "results.json"
    if res_path.is_file():
        old = json.loads(res_path.read_text())
        if old.get("checkpoint_step") == step and old.get("compare_overrides") == list(overrides):
            log(f"{label}: reusing {res_path}")
            return old
    log(f"{label}: evaluating on the test pairs")
    t0 = time.perf_counter()
    results = experiment.evaluate(state, workdir)
    results.update(
        label=label,
        variant_key=key,
        checkpoint_step=step,
        compare_overrides=list(overrides),
        train_wall_s=train_wall,
        eval_total_s=time.perf_counter() - t0,
    )
    first = next(iter(experiment.data.test_pairs()))
    out = experiment.forward(state, first["moving"][None], first["fixed"][None])
    np.savez_compressed(
        workdir / "pair0.npz", displacement=out["displacement"][0], warped=out["warped"][0]
    )
    timing_path.write_text(json.dumps(timing))
    if jax.process_index() == 0:
        res_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def table(rows, gain_fn):
    """Markdown table of the variants' results (mean ± std over test pairs).

    ``gain_fn(before, after)`` gives the paired anatomical Dice change (see ``task.paired_gain``).
    """
    head = ["Variant", COLUMNS[0][0], "Dice gain [95% CI] (pairs improved)"]
    head += [h for h, _ in COLUMNS[1:]] + ["Train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per = r.get("per_pair", {})
        g = gain_fn(per.get("anatomical_dice_before", []), per.get("anatomical_dice_after", []))
        gain = "-"
        if g is not None and (g["mean"] or g["improved"]):
            lo, hi = g["ci95"]
            gain = f"{g['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({g['improved']}/{g['n']})"
        cells = [r["label"]]
        for i, (_, k) in enumerate(COLUMNS):
            if i == 1:
                cells.append(gain)
            digits = 4 if k == "image_mse_after" else (2 if k == "folding_percent" else 3)
            cells.append(_fmt(r.get(k), r.get(f"{k}_std"), digits))
        tw = r.get("train_wall_s", float("nan"))
        cells.append(f"{tw:.0f}" if math.isfinite(tw) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(rows, root, fig_dir):
    """compare_dice.png (bar chart) and compare_pair0.png (warped pair 0 for every variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medjax import metrics, ops

    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    keys = [
        ("overall", "anatomical_dice_after"),
        ("near tumour", "dice_near_tumour_after"),
        ("far from tumour", "dice_far_tumour_after"),
    ]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(keys)
    x = np.arange(len(rows))
    for i, (name, k) in enumerate(keys):
        m = [r.get(k, np.nan) for r in rows]
        s = [r.get(f"{k}_std", np.nan) for r in rows]
        ax.bar(x + (i - 1) * width, m, width, yerr=s, capsize=2, label=name)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("anatomical Dice after warping")
    lo = np.nanmin([r.get(k, np.nan) for r in rows for _, k in keys])
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "compare_dice.png", dpi=110)
    plt.close(fig)
    written.append(fig_dir / "compare_dice.png")

    shown = [r for r in rows if (root / r["variant_key"] / "pair0.npz").is_file()]
    if not shown:
        return written
    spec_data = _pair0(root, shown[0])
    if spec_data is None:
        return written
    fixed, anat_f, anat_m, z, ch = spec_data
    fig, axes = plt.subplots(2, len(shown), figsize=(2.6 * len(shown), 5.4), squeeze=False)
    for j, r in enumerate(shown):
        d = np.load(root / r["variant_key"] / "pair0.npz")
        disp = d["displacement"]
        lab = np.asarray(ops.warp(anat_m[None, ..., None], disp[None], order=0))[0, ..., 0]
        ax = axes[0, j]
        ax.imshow(d["warped"][:, :, z, ch].T, cmap="gray", origin="lower")
        ax.contour(
            anat_f[:, :, z].T,
            levels=np.arange(0.5, anat_f.max() + 1),
            colors="yellow",
            linewidths=0.4,
            origin="lower",
        )
        ax.contour(
            lab[:, :, z].T,
            levels=np.arange(0.5, anat_f.max() + 1),
            colors="red",
            linewidths=0.4,
            origin="lower",
        )
        ax.set_title(r["label"], fontsize=7)
        ax.axis("off")
        det = np.asarray(metrics.jacobian_determinant(disp[None]))[0]
        axes[1, j].imshow(det[:, :, z].T, cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
        axes[1, j].set_title(f"Jacobian det. (fold {100 * np.mean(det <= 0):.2f}%)", fontsize=7)
        axes[1, j].axis("off")
    fig.suptitle(
        "test pair 0: warped moving image; red = warped moving labels, yellow = fixed labels",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(fig_dir / "compare_pair0.png", dpi=110)
    plt.close(fig)
    written.append(fig_dir / "compare_pair0.png")
    return written


def _pair0(root, row):
    cfg_path = root / row["variant_key"] / "config.json"
    if not cfg_path.is_file():
        return None
    from medjax.train.config import config_from_json
    from medjax.train.experiment import load_experiment

    spec = load_experiment(NAME, directory=HERE.parent)
    config = config_from_json(json.loads(cfg_path.read_text()))
    if config.data != "synthetic":
        return None
    first = next(iter(spec.task_module.make_data(config).test_pairs()))
    fixed = first["fixed"]
    tf = first["tumour_fixed"]
    z = int(np.argmax((tf > 0).sum(axis=(0, 1)))) if tf.any() else fixed.shape[2] // 2
    ch = min(3, fixed.shape[-1] - 1)
    return fixed, first["anatomy_fixed"], first["anatomy_moving"], z, ch


def main(argv=None):
    """Run the comparison; returns the list of results rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="quick", help="config variant (quick | paper)")
    p.add_argument("--workdir", required=True, help="output folder (rerun to resume)")
    p.add_argument("--only", default="", help="comma list of variant letters/names (default: all)")
    p.add_argument("--export_figures", default="", help="also copy the figures into this folder")
    args, extra = p.parse_known_args(argv)
    overrides = []
    for item in extra:
        if not item.startswith("--config.") or "=" not in item:
            p.error(f"unrecognized argument {item!r} (expected --config.KEY=VALUE)")
        overrides.append(item[len("--config.") :])

    from medjax.train.experiment import load_experiment

    spec = load_experiment(NAME, directory=HERE.parent)
    root = pathlib.Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    keys = _select(args.only)
    rows = []
    t_all = time.perf_counter()
    for i, key in enumerate(keys, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(keys)}] {VARIANTS[key][0]}", flush=True)
        r = run_variant(
            spec, key, args.variant, overrides, root, log=lambda s: print("   " + s, flush=True)
        )
        rows.append(r)
        print(
            f"   anatomical Dice {r.get('anatomical_dice_before', float('nan')):.3f} -> "
            f"{r.get('anatomical_dice_after', float('nan')):.3f}, tumour Dice (whole) "
            f"{r.get('tumour_dice_whole', float('nan')):.3f}  [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    md = table(rows, spec.task_module.paired_gain)
    n = rows[0].get("num_test_pairs", 0) if rows else 0
    header = (
        f"Estienne 2020 comparison ({args.variant}, {n} test pairs, mean ± std over pairs; "
        f"overrides: {' '.join(overrides) or 'none'})"
    )
    (root / "comparison.md").write_text(f"{header}\n\n{md}\n")
    keep = [
        "label",
        "checkpoint_step",
        "num_test_pairs",
        "train_wall_s",
        "eval_total_s",
        "anatomical_dice_before",
    ]
    keep += [k for _, k in COLUMNS] + [f"{k}_std" for _, k in COLUMNS]
    summary = {
        "variant": args.variant,
        "overrides": overrides,
        "rows": {r["variant_key"]: {k: r.get(k) for k in keep if k in r} for r in rows},
        "total_wall_s": time.perf_counter() - t_all,
    }
    (root / "comparison.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    written = []
    try:
        written = figures(rows, root, root / "figures")
    except Exception as e:  # a figure must never lose the table
        print(f"compare: figures failed: {type(e).__name__}: {e}")
    if args.export_figures:
        dest = pathlib.Path(args.export_figures)
        dest.mkdir(parents=True, exist_ok=True)
        for f in written:
            shutil.copy(f, dest / f.name)
        main_fig = root / "a_joint_sub_masked" / "figures"
        for f in sorted(main_fig.glob("*.png")) if main_fig.is_dir() else ():
            shutil.copy(f, dest / f.name)
    print()
    print(header)
    print(md)
    print(f"\ntable: {root / 'comparison.md'} and comparison.json; figures: {root / 'figures'}")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    main()
