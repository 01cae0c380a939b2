"""Time to first step of ``medjax train``, with an empty and with a filled compilation cache.

Usage: python benchmarks/first_step.py [--experiments estienne2020,pnp_adanet2018,...] [--timeout 900]

A user who types ``medjax train EXPERIMENT --variant quick`` waits for the data to be built and
the first step to be compiled before the first progress line. The ``medjax`` command keeps JAX's
persistent compilation cache (``~/.cache/medjax/jax``, or ``$JAX_COMPILATION_CACHE_DIR``), so a
second run of the same programs (a resumed run, another seed's work directory, a row of
``medjax compare`` with the same shapes) should start without compiling them again.

For each experiment the quick variant is started three times in a fresh work directory with
``--config.log_every=1``, and the wall time from the process's start to its first ``step 1/``
progress line is read off its stderr, after which the process is stopped:

- ``no cache``: ``MEDJAX_COMPILATION_CACHE=0`` (the behaviour before the cache);
- ``empty cache``: a new, empty cache folder (the first run ever: compile and write the cache);
- ``filled cache``: the same folder again, now filled by the previous run.

The cache saves only compilation: the data, the process start and the imports stay. Each run is
its own process, so nothing is shared but the cache folder. Results:
``benchmarks/results/first_step.json`` and ``.md``, with the load average before and after (run it
on an otherwise idle machine).
"""

import argparse
import json
import os
import pathlib
import platform
import selectors
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "first_step.json"
EXPERIMENTS = (
    "estienne2020",
    "universeg2023",
    "medicalzoo",
    "pnp_adanet2018",
    "focusnet2021",
    "cotraining2020",
)
MODES = ("no cache", "empty cache", "filled cache")


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def time_to_first_step(experiment, workdir, env, timeout):
    """Seconds from starting ``medjax train`` to its first ``step 1/`` line (None if it never came),
    and the last lines of its output."""
    cmd = [
        sys.executable,
        "-m",
        "medjax.cli",
        "train",
        experiment,
        "--variant",
        "quick",
        "--workdir",
        str(workdir),
        "--config.log_every=1",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        start_new_session=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    tail, found = [], None
    try:
        while time.perf_counter() - t0 < timeout:
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            tail = (tail + [line.rstrip()])[-8:]
            if line.startswith("step 1/"):
                found = time.perf_counter() - t0
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return found, tail


def main(args):
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"--experiments: unknown {unknown}; the experiments are {EXPERIMENTS}")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medjax_first_step_") as tmp:
        tmp = pathlib.Path(tmp)
        for name in names:
            cache = tmp / f"cache_{name}"
            row = {"experiment": name}
            for k, mode in enumerate(MODES):
                env = dict(os.environ)
                env.pop("JAX_COMPILATION_CACHE_DIR", None)
                if mode == "no cache":
                    env["MEDJAX_COMPILATION_CACHE"] = "0"
                else:
                    env["MEDJAX_COMPILATION_CACHE"] = "1"
                    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
                seconds, tail = time_to_first_step(name, tmp / f"{name}_{k}", env, args.timeout)
                row[mode] = seconds
                if seconds is None:
                    row[f"{mode} output"] = tail
                shown = "no step line" if seconds is None else f"{seconds:.1f} s"
                print(f"{name:16s} {mode:13s} {shown}", flush=True)
            files = list(cache.rglob("*")) if cache.exists() else []
            row["cache_mib"] = sum(f.stat().st_size for f in files if f.is_file()) / 2**20
            rows.append(row)
    import jax

    record = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


def _cell(v):
    return "-" if v is None else f"{v:.1f}"


def markdown(record):
    """The results as a markdown table (written beside the JSON)."""
    m = record["meta"]
    lines = [
        f"## Time to first step of `medjax train EXPERIMENT --variant quick` ({m['date']}, "
        f"{m['cpus']} CPUs, load {m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after)",
        "",
        "Seconds from the process's start to its first progress line (data built, first step "
        "compiled and run). `filled cache` is a second run with the cache the first one wrote.",
        "",
        "| experiment | no cache (s) | empty cache (s) | filled cache (s) | saved | cache MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        base, warm = r.get("no cache"), r.get("filled cache")
        saved = "-" if base is None or warm is None else f"{base - warm:.1f} s ({base / warm:.1f}x)"
        lines.append(
            f"| {r['experiment']} | {_cell(base)} | {_cell(r.get('empty cache'))} | {_cell(warm)} "
            f"| {saved} | {r['cache_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(_parse())
