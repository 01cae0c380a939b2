"""Equal-time step budgets for ``medjax compare medicalzoo``: each row's step, timed here.

For every row of ``experiments/medicalzoo/config.py``'s comparison this builds the row's config
(the quick variant with the row's overrides), compiles its training step as the engine compiles it
(``MedicalZoo.step_profile``: the same mesh, donation and batch, so the persistent compilation
cache then serves the comparison's own runs) and times it, fastest of ``--repeats`` runs. It prints
and writes the seconds per step and the steps that fill ``--seconds`` of training::

    python benchmarks/zoo_budgets.py --seconds 200            # every row
    python benchmarks/zoo_budgets.py --only unet3d,vnet

Results: ``benchmarks/results/zoo_budgets.{json,md}``. Run it on an idle machine: the budgets are
only as equal as the timings are clean.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=200.0, help="training time per row")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default="", help="comma list of rows")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo_budgets"))
    args = p.parse_args(argv)

    import jax

    # the medjax command's compilation cache (MEDJAX_COMPILATION_CACHE=0 turns it off)
    from medjax.cli import _compilation_cache

    _compilation_cache()
    from medjax.train.config import load_config
    from medjax.train.experiment import load_experiment

    spec = load_experiment("medicalzoo")
    rows = spec.config_module.compare_rows("quick")
    chosen = [r.strip() for r in args.only.split(",") if r.strip()] or list(rows)
    unknown = [r for r in chosen if r not in rows]
    if unknown:
        raise SystemExit(f"--only: {unknown} are not rows; the rows are {', '.join(rows)}")
    out = {"seconds": args.seconds, "repeats": args.repeats, "cpus": os.cpu_count(), "rows": {}}
    for row in chosen:
        label, overrides = rows[row]
        overrides = [o for o in overrides if not o.startswith("num_steps=")]
        config = load_config("medicalzoo", "quick", overrides)
        exp = spec.build(config)
        t0 = time.perf_counter()
        state = exp.init_state(jax.random.key_data(jax.random.key(int(config.seed))))
        prof = exp.step_profile(state, repeats=args.repeats)
        steps = max(1, int(args.seconds // prof["step_s"]))
        out["rows"][row] = {
            "label": label,
            "crop": list(config.crop),
            "batch_size": int(config.batch_size),
            **prof,
            "steps": steps,
            "wall_s": time.perf_counter() - t0,
        }
        print(
            f"{row:>15}: {prof['step_s']:.2f} s/step (compile {prof['step_compile_s']:.0f} s, "
            f"plan {prof.get('step_memory_mib', 0):.0f} MiB) -> {steps} steps",
            flush=True,
        )
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"Training step of each comparison row, fastest of {args.repeats}, on {os.cpu_count()} "
        f"CPUs; steps = {args.seconds:.0f} s / step time.",
        "",
        "| row | crop | s/step | compile (s) | plan (MiB) | steps |",
        "|---|---|---|---|---|---|",
    ]
    for row, r in out["rows"].items():
        crop = "x".join(map(str, r["crop"]))
        lines.append(
            f"| {row} | {crop} | {r['step_s']:.2f} | {r['step_compile_s']:.0f} | "
            f"{r.get('step_memory_mib', 0):.0f} | {r['steps']} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
