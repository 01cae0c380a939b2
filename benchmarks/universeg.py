"""Benchmark UniverSeg v1 (64 channels, 1,182,785 parameters) against a PyTorch re-creation.

Usage: python benchmarks/universeg.py [--repeats 5] [--train-repeats 3] [--threads N] [--no-torch]

Cases: inference (logits) at B=1, 128x128, support size S in {1, 8, 16, 64}; one training step
(forward, backward, Adam update; soft Dice on sigmoid logits) at B=4, S=16, 128x128.

Each (case, library) runs in a fresh subprocess, medjax then torch for the same case, so that load
changes hit both alike as far as possible. In it the step is warmed up once (compilation for
medjax), then timed ``--repeats`` times; the table shows the median (and fastest) wall time and
the medjax/torch ratio of the medians.

Peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess after the timed runs
minus the same value just before the warm-up (after imports, weights and inputs exist): the extra
resident memory the case needed at its peak. For medjax the XLA buffer plan of the compiled step
(``compiled.memory_analysis()``: temporaries + outputs) is reported too. The torch network is the
re-creation of the official ``JJGO/UniverSeg`` module used by the weight-import parity test
(``tests/models/test_universeg.py``), with torch given as many threads as XLA.

Throughput: XLA's own FLOP count of the compiled medjax step (``compiled.cost_analysis()``) divided
by each library's median time (the two run the same network, so the count serves both), and its
share of this machine's peak measured in the same run: a jitted 2048x2048 float32 matmul, and a
3x3 64->64 conv on 16x128x128 (the shape that dominates UniverSeg) under XLA and torch.

Results go to benchmarks/results/universeg.json with the load average, CPU count and versions.
CPU timings are noisy when other jobs share the machine: check the recorded load and repeat.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "universeg.json"
SIZE = 128
CASES = {  # name -> (kind, batch, support)
    "infer S=1": ("infer", 1, 1),
    "infer S=8": ("infer", 1, 8),
    "infer S=16": ("infer", 1, 16),
    "infer S=64": ("infer", 1, 64),
    "train B=4 S=16": ("train", 4, 16),
}


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per inference case")
    p.add_argument("--train-repeats", type=int, default=3, help="timed runs of the train step")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="XLA and torch threads")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch re-creation")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", nargs=2, metavar=("LIB", "CASE"), help=argparse.SUPPRESS)
    return p.parse_args()


def _inputs(b, s, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    q = rng.random((b, SIZE, SIZE, 1), dtype=np.float32)
    si = rng.random((b, s, SIZE, SIZE, 1), dtype=np.float32)
    sl = (rng.random((b, s, SIZE, SIZE, 1)) > 0.5).astype(np.float32)
    y = (rng.random((b, SIZE, SIZE, 1)) > 0.5).astype(np.float32)
    return q, si, sl, y


def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _time(fn, repeats):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def medjax_worker(kind, b, s, repeats):
    """Time the medjax case; returns (seconds list, extra dict)."""
    import jax
    import jax.numpy as jnp
    import optax

    from medjax.losses import soft_dice_loss
    from medjax.models import UniverSeg

    model = UniverSeg()
    q, si, sl, y = (jnp.asarray(a) for a in _inputs(b, s))
    params = model.init(jax.random.key(0), q, si, sl)["params"]
    if kind == "infer":
        fn = jax.jit(lambda p, q, si, sl: model.apply({"params": p}, q, si, sl))
        args = (params, q, si, sl)
        compiled = fn.lower(*args).compile()

        def run():
            jax.block_until_ready(compiled(*args))

    else:
        tx = optax.adam(1e-4)

        def step(p, o, q, si, sl, y):
            def loss_fn(p):
                logits = model.apply({"params": p}, q, si, sl)
                return soft_dice_loss(logits, y, activation="sigmoid", reduction="sample")

            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, o = tx.update(g, o, p)
            return optax.apply_updates(p, upd), o, loss

        fn = jax.jit(step, donate_argnums=(0, 1))
        state = {"p": params, "o": tx.init(params)}
        compiled = fn.lower(state["p"], state["o"], q, si, sl, y).compile()

        def run():
            state["p"], state["o"], loss = compiled(state["p"], state["o"], q, si, sl, y)
            jax.block_until_ready(loss)

    rss0 = _maxrss_mib()
    times = _time(run, repeats)
    extra = {"peak_rss_increase_mib": _maxrss_mib() - rss0, "peak_rss_mib": _maxrss_mib()}
    ma = compiled.memory_analysis()
    if ma is not None:
        extra["xla_temp_plus_output_mib"] = (
            ma.temp_size_in_bytes + ma.output_size_in_bytes
        ) / 2**20
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost and cost.get("flops"):
        extra["flops"] = float(cost["flops"])
    extra["version"] = jax.__version__
    return times, extra


def peak_worker(threads):
    """GFLOP/s of a 2048^2 matmul (XLA) and a 3x3 64->64 conv at 16x128x128 (XLA and torch)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = {}
    n = 2048
    a = jnp.asarray(np.random.default_rng(0).random((n, n), dtype=np.float32))
    mm = jax.jit(lambda x: x @ x)
    out["xla_matmul_gflops"] = (
        2 * n**3 / statistics.median(_time(lambda: mm(a).block_until_ready(), 5)) / 1e9
    )
    x = jnp.asarray(np.random.default_rng(1).random((16, 128, 128, 64), dtype=np.float32))
    w = jnp.asarray(np.random.default_rng(2).random((3, 3, 64, 64), dtype=np.float32))
    conv = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    conv_flops = 2 * 16 * 128 * 128 * 64 * 64 * 9
    t = statistics.median(_time(lambda: conv(x, w).block_until_ready(), 5))
    out["xla_conv_gflops"] = conv_flops / t / 1e9
    try:
        import torch
    except ImportError:
        return out
    torch.set_num_threads(threads)
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
    with torch.no_grad():
        t = statistics.median(_time(lambda: torch.nn.functional.conv2d(tx, tw, padding=1), 5))
    out["torch_conv_gflops"] = conv_flops / t / 1e9
    return out


def torch_worker(kind, b, s, repeats, threads):
    """Time the PyTorch re-creation on the same case; returns (seconds list, extra dict)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.models.test_universeg import _torch_universeg

    torch.set_num_threads(threads)
    net = _torch_universeg(torch)
    q, si, sl, y = _inputs(b, s)
    q = torch.from_numpy(q.transpose(0, 3, 1, 2).copy())
    si = torch.from_numpy(si.transpose(0, 1, 4, 2, 3).copy())
    sl = torch.from_numpy(sl.transpose(0, 1, 4, 2, 3).copy())
    y = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2)))
    if kind == "infer":
        net.eval()

        def run():
            with torch.no_grad():
                net(q, si, sl)

    else:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            p = torch.sigmoid(net(q, si, sl))
            inter = (p * y).sum(dim=(1, 2, 3))
            denom = p.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3))
            loss = (1 - 2 * inter / denom.clamp_min(1e-5)).mean()
            loss.backward()
            opt.step()

    rss0 = _maxrss_mib()
    times = _time(run, repeats)
    extra = {"peak_rss_increase_mib": _maxrss_mib() - rss0, "peak_rss_mib": _maxrss_mib()}
    extra["version"] = torch.__version__
    return times, extra


def _worker(args):
    lib, case = args.worker
    if lib == "peak":
        print("RESULT " + json.dumps(peak_worker(args.threads)))
        return
    kind, b, s = CASES[case]
    repeats = args.train_repeats if kind == "train" else args.repeats
    if lib == "medjax":
        times, extra = medjax_worker(kind, b, s, repeats)
    else:
        times, extra = torch_worker(kind, b, s, repeats, args.threads)
    print("RESULT " + json.dumps({"times_s": times, **extra}))


def _run_worker(lib, case, args):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}"
        + f" intra_op_parallelism_threads={args.threads}"
    )
    cmd = [sys.executable, __file__, "--worker", lib, case]
    cmd += ["--repeats", str(args.repeats), "--train-repeats", str(args.train_repeats)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{lib} {case} failed:\n{out.stderr[-3000:]}")


def main(args):
    has_torch = False
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            has_torch = True
        except ImportError:
            pass
    libs = ["medjax"] + (["torch"] if has_torch else [])
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    raw = {lib: {} for lib in libs}
    peak = _run_worker("peak", "-", args)
    for case in CASES:
        for lib in libs:
            raw[lib][case] = _run_worker(lib, case, args)
    load_after = os.getloadavg()
    matmul_peak = peak["xla_matmul_gflops"]

    rows = []
    print(
        f"UniverSeg v1 (64 ch), {SIZE}x{SIZE}, {args.threads} threads, median (fastest) of "
        f"{args.repeats} inference / {args.train_repeats} train runs, load {load_before[0]:.1f}"
    )
    print(
        f"measured peak: XLA matmul {matmul_peak:.0f} GFLOP/s, XLA 3x3 conv "
        f"{peak['xla_conv_gflops']:.0f} GFLOP/s, torch 3x3 conv "
        f"{peak.get('torch_conv_gflops', float('nan')):.0f} GFLOP/s"
    )
    header = f"{'case':<16}{'medjax ms':>18}{'torch ms':>18}{'ratio':>7}{'medjax MiB':>12}"
    header += f"{'torch MiB':>11}{'GFLOP':>8}{'mj GF/s':>9}{'%peak':>7}{'th GF/s':>9}"
    print(header)
    print("-" * len(header))
    for case, (kind, b, s) in CASES.items():
        m = raw["medjax"][case]
        ms = [1e3 * t for t in m["times_s"]]
        row = {
            "case": case,
            "kind": kind,
            "batch": b,
            "support": s,
            "medjax_ms": statistics.median(ms),
            "medjax_min_ms": min(ms),
            "medjax_peak_rss_increase_mib": m["peak_rss_increase_mib"],
            "medjax_xla_temp_plus_output_mib": m.get("xla_temp_plus_output_mib"),
        }
        line = f"{case:<16}{row['medjax_ms']:>10.0f} ({row['medjax_min_ms']:>5.0f})"
        if has_torch:
            t = raw["torch"][case]
            tms = [1e3 * v for v in t["times_s"]]
            row.update(
                torch_ms=statistics.median(tms),
                torch_min_ms=min(tms),
                torch_peak_rss_increase_mib=t["peak_rss_increase_mib"],
            )
            row["ratio"] = row["medjax_ms"] / row["torch_ms"]
            line += f"{row['torch_ms']:>10.0f} ({row['torch_min_ms']:>5.0f}){row['ratio']:>7.2f}"
        else:
            line += f"{'-':>18}{'-':>7}"
        line += f"{row['medjax_peak_rss_increase_mib']:>12.0f}"
        line += f"{row.get('torch_peak_rss_increase_mib', float('nan')):>11.0f}"
        if m.get("flops"):
            row["gflop"] = m["flops"] / 1e9
            row["medjax_gflops"] = row["gflop"] / (row["medjax_ms"] / 1e3)
            row["medjax_share_of_matmul_peak"] = row["medjax_gflops"] / matmul_peak
            line += f"{row['gflop']:>8.1f}{row['medjax_gflops']:>9.1f}"
            line += f"{100 * row['medjax_share_of_matmul_peak']:>6.0f}%"
            if has_torch:
                row["torch_gflops"] = row["gflop"] / (row["torch_ms"] / 1e3)
                row["torch_share_of_matmul_peak"] = row["torch_gflops"] / matmul_peak
                line += f"{row['torch_gflops']:>9.1f}"
        rows.append(row)
        print(line)

    meta = {
        "size": SIZE,
        "model": "UniverSeg v1, 4x64 encoder + 3x64 decoder CrossBlocks, 1,182,785 parameters",
        "train_step": "forward + backward + Adam; soft Dice (sigmoid), per-sample mean",
        "repeats": args.repeats,
        "train_repeats": args.train_repeats,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_s": time.perf_counter() - t_start,
        "memory": "peak RSS increase (ru_maxrss after timed runs - before warm-up) of a fresh "
        "subprocess per case; medjax also: XLA temp + output buffers of the compiled step",
        "peak_gflops": peak,
        "flops": "XLA cost_analysis() of the compiled medjax step, used for both libraries",
        "reference": "PyTorch re-creation of JJGO/UniverSeg v1 (tests/models/test_universeg.py)"
        if has_torch
        else None,
        "versions": {
            "python": platform.python_version(),
            **{
                {"medjax": "jax"}.get(lib, lib): raw[lib][next(iter(CASES))]["version"]
                for lib in libs
            },
        },
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "rows": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record) + "\n")
    print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}; -> {out}")


def markdown(record):
    """The results as a markdown table (written beside the JSON as ``universeg.md``)."""
    meta, rows = record["meta"], record["rows"]
    peak = meta.get("peak_gflops", {})
    lines = [
        f"UniverSeg v1 (64 channels), {meta['size']}x{meta['size']}, {meta['threads']} threads, "
        f"median of {meta['repeats']} inference / {meta['train_repeats']} training runs "
        f"(load average {meta['load_average_before'][0]:.1f} before, "
        f"{meta['load_average_after'][0]:.1f} after; {meta['time']})",
        "",
        "| case | medjax ms | PyTorch ms | medjax / PyTorch | GFLOP | medjax GFLOP/s "
        "(share of matmul peak) | PyTorch GFLOP/s | medjax XLA buffers MiB | "
        "medjax peak RSS increase MiB | PyTorch peak RSS increase MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def num(key, fmt, r=r):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, int | float) else "-"

        share = r.get("medjax_share_of_matmul_peak")
        gfs = num("medjax_gflops", ".1f") + (f" ({100 * share:.0f} %)" if share else "")
        lines.append(
            f"| {r['case']} | {num('medjax_ms', '.0f')} | {num('torch_ms', '.0f')} | "
            f"{num('ratio', '.2f')} | {num('gflop', '.1f')} | {gfs} | {num('torch_gflops', '.1f')} | "
            f"{num('medjax_xla_temp_plus_output_mib', '.0f')} | "
            f"{num('medjax_peak_rss_increase_mib', '.0f')} | "
            f"{num('torch_peak_rss_increase_mib', '.0f')} |"
        )
    lines += [
        "",
        "XLA buffers: temporaries + outputs of the compiled step (its own memory plan). Peak RSS "
        "increase: the high-water mark after the timed runs minus the one before the warm-up, so "
        "0 means the peak was reached earlier (e.g. while building the inputs).",
    ]
    if peak:
        lines += [
            "",
            f"Peak measured in the same run: XLA matmul {peak['xla_matmul_gflops']:.0f} GFLOP/s, "
            f"a 3x3 64->64 conv at 16x128x128 {peak['xla_conv_gflops']:.0f} GFLOP/s under XLA and "
            f"{peak.get('torch_conv_gflops', float('nan')):.0f} GFLOP/s under PyTorch.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    ARGS = _parse()
    if ARGS.worker:
        _worker(ARGS)
    else:
        main(ARGS)
