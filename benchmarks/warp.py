"""Benchmark medjax.ops.warp (trilinear, 1x128^3x1) against torch grid_sample in the same run.

Usage: python benchmarks/warp.py [--size 128] [--channels 1] [--repeats 15] [--threads N]

Cases: forward; forward+backward w.r.t. the displacement only (the registration case);
forward+backward w.r.t. both image and displacement. Each is jitted and warmed up (compiled)
first, then medjax and torch ``grid_sample(align_corners=True)`` are timed in alternation,
``--repeats`` times, so that load changes hit both alike; the table shows the median (and the
fastest) wall time and the medjax/torch ratio of the medians. torch gets as many threads as XLA.

Also reported: nanoseconds per output voxel, and the compulsory memory traffic (inputs read once,
outputs written once) divided by the time, as a share of the copy bandwidth measured in the same
run. Results go to benchmarks/results/warp.json with the load average, CPU count and versions.
CPU timings are noisy when other jobs share the machine: check ``uptime`` and repeat.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "warp.json"
CASES = ("forward", "fwd+bwd (displacement)", "fwd+bwd (both)")


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--padding", default="border", choices=("border", "zeros"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="XLA and torch threads")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    # XLA reads its thread count when the backend starts, so set it before jax is imported.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if ARGS.threads > 1 else 'false'}"
        + f" intra_op_parallelism_threads={ARGS.threads}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

from medjax.ops import warp  # noqa: E402


def _once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def medjax_cases(image, disp, padding):
    """Jitted zero-argument callables for the three cases, blocking until done."""
    image, disp = jnp.asarray(image), jnp.asarray(disp)
    fwd = jax.jit(lambda i, d: warp(i, d, padding=padding))

    def loss(d, i):
        return jnp.mean(warp(i, d, padding=padding) ** 2)

    grad_disp = jax.jit(jax.value_and_grad(loss))
    grad_both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return {
        CASES[0]: lambda: jax.block_until_ready(fwd(image, disp)),
        CASES[1]: lambda: jax.block_until_ready(grad_disp(disp, image)),
        CASES[2]: lambda: jax.block_until_ready(grad_both(disp, image)),
    }


def torch_cases(torch, image, disp, padding):
    """The same three cases with torch grid_sample (channel-first, normalised (x, y, z) grid)."""
    spatial = np.array(image.shape[1:-1])
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), axis=-1)
    grid_np = (2.0 * (ident + disp) / (spatial - 1) - 1.0)[..., ::-1].astype(np.float32)
    x = torch.tensor(np.moveaxis(image, -1, 1).copy())
    grid = torch.tensor(grid_np.copy())
    sample = torch.nn.functional.grid_sample

    def forward():
        with torch.no_grad():
            sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=True)

    def backward(image_grad):
        xi = x.detach().requires_grad_(image_grad)
        g = grid.detach().requires_grad_(True)
        y = sample(xi, g, mode="bilinear", padding_mode=padding, align_corners=True)
        (y**2).mean().backward()

    return {
        CASES[0]: forward,
        CASES[1]: lambda: backward(False),
        CASES[2]: lambda: backward(True),
    }


def copy_bandwidth(nbytes=256 * 2**20, repeats=7):
    """Sustained read+write bandwidth (GB/s) of a jitted array copy: the machine's practical peak."""
    # Donated in place, so that page faults of fresh output buffers are not timed.
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = jax.block_until_ready(copy(jnp.ones((nbytes // 4,), jnp.float32)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(copy(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def compulsory_bytes(voxels, channels):
    """Bytes an ideal fused kernel must move per case: inputs read once, outputs written once."""
    image, disp, out = 4 * channels * voxels, 12 * voxels, 4 * channels * voxels
    return {
        CASES[0]: image + disp + out,
        CASES[1]: image + disp + disp,  # reads image and displacement, writes its gradient
        CASES[2]: image + disp + disp + image,  # ... and the image gradient
    }


def main(args):
    rng = np.random.default_rng(0)
    shape = (1, args.size, args.size, args.size)
    image = rng.standard_normal(shape + (args.channels,)).astype(np.float32)
    # Random displacements of a few voxels (every sample in a different cell).
    disp = (rng.standard_normal(shape + (3,)) * 2.0).astype(np.float32)

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)

    runners = {"medjax": medjax_cases(image, disp, args.padding)}
    if torch is not None:
        runners["torch"] = torch_cases(torch, image, disp, args.padding)
    times = {lib: {case: [] for case in CASES} for lib in runners}
    load_before = os.getloadavg()
    for case in CASES:
        for lib in runners:
            runners[lib][case]()  # warm-up: compilation, allocator
        for _ in range(args.repeats):
            for lib in runners:  # alternate, so that load changes hit both alike
                times[lib][case].append(_once(runners[lib][case]))
    load_after = os.getloadavg()
    bandwidth = copy_bandwidth()

    voxels = args.size**3
    traffic = compulsory_bytes(voxels, args.channels)
    rows = []
    print(
        f"warp 1x{args.size}^3x{args.channels} trilinear, padding={args.padding}, "
        f"{args.threads} threads, median (fastest) of {args.repeats}, load {load_before[0]:.1f}"
    )
    header = (
        f"{'case':<24}{'medjax ms':>17}{'torch ms':>17}{'ratio':>7}{'ns/voxel':>10}"
        f"{'GB/s':>7}{'% copy bw':>10}"
    )
    print(header)
    print("-" * len(header))
    for case in CASES:
        ms = [1e3 * t for t in times["medjax"][case]]
        med, best = statistics.median(ms), min(ms)
        gbs = traffic[case] / (med / 1e3) / 1e9
        row = {
            "case": case,
            "medjax_ms": med,
            "medjax_min_ms": best,
            "ns_per_voxel": 1e6 * med / voxels,
            "compulsory_bytes": traffic[case],
            "achieved_gb_s": gbs,
            "share_of_copy_bandwidth": gbs / bandwidth,
        }
        line = f"{case:<24}{med:>9.1f} ({best:>5.1f})"
        if "torch" in times:
            tms = [1e3 * t for t in times["torch"][case]]
            tmed, tbest = statistics.median(tms), min(tms)
            row.update(torch_ms=tmed, torch_min_ms=tbest, ratio=med / tmed, ratio_min=best / tbest)
            line += f"{tmed:>9.1f} ({tbest:>5.1f}){med / tmed:>7.2f}"
        else:
            line += f"{'-':>17}{'-':>7}"
        line += f"{row['ns_per_voxel']:>10.1f}{gbs:>7.2f}{100 * gbs / bandwidth:>9.1f}%"
        rows.append(row)
        print(line)
    print(f"copy bandwidth (jitted a + 1 over 256 MiB): {bandwidth:.1f} GB/s")

    meta = {
        "size": args.size,
        "channels": args.channels,
        "padding": args.padding,
        "repeats": args.repeats,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "copy_bandwidth_gb_s": bandwidth,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().machine,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ARGS)
