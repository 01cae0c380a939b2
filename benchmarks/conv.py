"""Benchmark medjax.nn.conv's CPU lowerings against lax.conv_general_dilated and torch, same run.

Usage: python benchmarks/conv.py [--repeats 7] [--threads N] [--no-model]

Layer cases are the 3D convolutions of the Estienne 2020 quick network (32^3, batch 2, f = 4) and
a few wider ones around the dispatch thresholds. Each is timed forward and forward+backward (input
and kernel gradients) three ways, alternating so that load changes hit all alike: XLA's
convolution (``lax.conv_general_dilated``), medjax's lowering (``medjax.nn.conv``, which falls
back to XLA where its rule says so: the "lowering" column), and ``torch.nn.functional.conv3d`` /
``conv_transpose3d`` (channels-first, float32, as many threads). The table gives medians, GFLOP/s
(2 * MACs / time; backward counted as twice the forward) and the medjax/XLA and medjax/torch ratios.

Then (unless --no-model) one training step of the joint registration network of the quick config
(``experiments/estienne2020``, forward + backward + Adam) with the lowerings off and on.

Results: benchmarks/results/conv.json and conv.md, with the load average and versions.
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

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "conv.json"

# (name, spatial size, batch, C_in, C_out, kernel, stride, transposed)
CASES = (
    ("enc lift/level 0, 3^3 4->4", 32, 2, 4, 4, 3, 1, False),
    ("dec level 0, 3^3 8->4", 32, 2, 8, 4, 3, 1, False),
    ("down 2^3/2 4->8", 32, 2, 4, 8, 2, 2, False),
    ("level 1, 3^3 8->8", 16, 2, 8, 8, 3, 1, False),
    ("dec level 1, 3^3 16->8", 16, 2, 16, 8, 3, 1, False),
    ("up 2^3/2 8->4 (transposed)", 16, 2, 8, 4, 2, 2, True),
    ("level 2, 3^3 16->16", 8, 2, 16, 16, 3, 1, False),
    ("3^3 8->8 at 32^3", 32, 2, 8, 8, 3, 1, False),
    ("3^3 16->16 at 32^3 (XLA by rule)", 32, 2, 16, 16, 3, 1, False),
    ("3^3 32->32 at 16^3 (XLA by rule)", 16, 2, 32, 32, 3, 1, False),
)


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="XLA and torch threads")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-network step")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if ARGS.threads > 1 else 'false'}"
        + f" intra_op_parallelism_threads={ARGS.threads}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from medjax.nn import conv  # noqa: E402


def _time(fn, repeats):
    fn()  # compile / warm up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _layer_fns(size, batch, cin, cout, k, stride, transposed):
    spatial = (size,) * 3
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *spatial, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, k, cin, cout)) * 0.1, jnp.float32)
    specs = conv._specs(5)
    if transposed:

        def xla(x, w):
            return lax.conv_transpose(x, w, (k,) * 3, "VALID", dimension_numbers=specs)

        def ours(x, w):
            return conv.conv_transpose_patch(x, w)

        how = "patch (transposed)" if jax.default_backend() == "cpu" else "xla"
    else:

        def xla(x, w):
            return lax.conv_general_dilated(x, w, (stride,) * 3, "SAME", dimension_numbers=specs)

        def ours(x, w):
            return conv.conv_general_dilated(x, w, (stride,) * 3, "SAME", dimension_numbers=specs)

        how = conv.choose(x.shape, w.shape, (stride,) * 3, "SAME", dimension_numbers=specs)
    fns = {}
    for name, f in (("xla", xla), ("medjax", ours)):
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
        fns[name] = (
            lambda fwd=fwd: jax.block_until_ready(fwd(x, w)),
            lambda grad=grad: jax.block_until_ready(grad(x, w)),
        )
    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(xla(x, w)), rtol=1e-3, atol=1e-3)
    out_voxels = batch * (size * stride if transposed else size // stride) ** 3
    macs = out_voxels * (k**3 if not transposed else 1) * cin * cout
    return fns, how, macs, (x, w)


def _torch_fns(x, w, k, stride, transposed, torch):
    tx = torch.tensor(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous().requires_grad_(True)
    if transposed:
        tw = (
            torch.tensor(np.asarray(w)[::-1, ::-1, ::-1].copy()).permute(3, 4, 0, 1, 2).contiguous()
        )
    else:
        tw = torch.tensor(np.asarray(w)).permute(4, 3, 0, 1, 2).contiguous()
    tw.requires_grad_(True)
    pad = 0 if stride > 1 else k // 2

    def op():
        if transposed:
            return torch.nn.functional.conv_transpose3d(tx, tw, stride=k)
        return torch.nn.functional.conv3d(tx, tw, stride=stride, padding=pad)

    def fwd():
        with torch.no_grad():
            op()

    def both():
        tx.grad = tw.grad = None
        (op() ** 2).sum().backward()

    return fwd, both


def _model_step(repeats):
    """Seconds per training step of the quick joint network, lowerings off and on."""
    sys.path.insert(0, str(HERE.parent))
    from medjax.train import load_config, load_experiment

    config = load_config("estienne2020", "quick")
    task = load_experiment("estienne2020").task_module
    out = {}
    for enabled in (False, True):
        conv.enabled = enabled
        exp = task.Experiment(config)
        state = exp.init_state(jax.random.key(0))
        batch = next(exp.train_iterator())
        batch = {k: jnp.asarray(v) for k, v in batch.items() if not k.startswith("_")}
        step = jax.jit(exp.train_step)

        def run(step=step, state=state, batch=batch):
            jax.block_until_ready(step(state, batch))

        out["medjax" if enabled else "xla"] = _time(run, repeats)
    conv.enabled = True
    return out


def main():
    args = ARGS
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
        print("torch not installed: no torch column (pip install torch for the reference)")
    rows = []
    print(
        f"{len(CASES)} layer cases, {args.repeats} repeats, {args.threads} threads; load {os.getloadavg()[0]:.2f}"
    )
    for name, size, batch, cin, cout, k, stride, transposed in CASES:
        fns, how, macs, (x, w) = _layer_fns(size, batch, cin, cout, k, stride, transposed)
        refs = _torch_fns(x, w, k, stride, transposed, torch) if torch else None
        row = {
            "case": name,
            "shape": [batch, size, size, size, cin],
            "kernel": k,
            "stride": stride,
            "cout": cout,
            "lowering": how,
            "gflop_fwd": 2 * macs / 1e9,
        }
        for mode, idx in (("fwd", 0), ("fwd+bwd", 1)):
            times = {"xla": [], "medjax": [], "torch": []}
            for fn in (fns["xla"][idx], fns["medjax"][idx]):
                fn()
            if refs:
                refs[idx]()
            for _ in range(args.repeats):  # alternate
                for name_, fn in (("xla", fns["xla"][idx]), ("medjax", fns["medjax"][idx])) + (
                    (("torch", refs[idx]),) if refs else ()
                ):
                    t0 = time.perf_counter()
                    fn()
                    times[name_].append(time.perf_counter() - t0)
            flop = 2 * macs * (3 if mode == "fwd+bwd" else 1)
            for name_, ts in times.items():
                if ts:
                    med = statistics.median(ts)
                    row[f"{mode} {name_} ms"] = med * 1e3
                    row[f"{mode} {name_} GFLOP/s"] = flop / med / 1e9
        rows.append(row)
        print(
            f"  {name:34s} {how:18s} fwd {row['fwd medjax ms']:7.1f} ms (XLA {row['fwd xla ms']:7.1f})"
            f"  fwd+bwd {row['fwd+bwd medjax ms']:7.1f} ms (XLA {row['fwd+bwd xla ms']:7.1f}"
            + (f", torch {row['fwd+bwd torch ms']:6.1f})" if refs else ")"),
            flush=True,
        )
    model = None
    if not args.no_model:
        print("joint network training step (quick config), lowerings off / on ...", flush=True)
        m = _model_step(args.repeats)
        model = {k: statistics.median(v) for k, v in m.items()}
        print(
            f"  XLA convolutions {model['xla']:.3f} s/step, medjax lowerings {model['medjax']:.3f} s/step"
            f" ({model['xla'] / model['medjax']:.2f}x faster)"
        )
    result = {
        "benchmark": "conv",
        "rows": rows,
        "model_step_s": model,
        "repeats": args.repeats,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": getattr(torch, "__version__", None),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _markdown(r):
    has_torch = r["torch"] is not None
    head = "| case | lowering | fwd XLA | fwd medjax | fwd+bwd XLA | fwd+bwd medjax | medjax/XLA (fwd+bwd) |"
    sep = "|---|---|---|---|---|---|---|"
    if has_torch:
        head += " fwd+bwd torch | medjax/torch |"
        sep += "---|---|"
    lines = [
        f"Convolution lowerings on CPU ({r['cpu_count']} cores, {r['threads']} threads, load "
        f"{r['load_average'][0]:.2f}, jax {r['jax']}, torch {r['torch']}, {r['date']}); medians of "
        f"{r['repeats']}, ms (GFLOP/s).",
        "",
        head,
        sep,
    ]
    for row in r["rows"]:

        def cell(key, row=row):
            return f"{row[key + ' ms']:.1f} ({row[key + ' GFLOP/s']:.1f})"

        line = (
            f"| {row['case']} | {row['lowering']} | {cell('fwd xla')} | {cell('fwd medjax')} | "
            f"{cell('fwd+bwd xla')} | {cell('fwd+bwd medjax')} | "
            f"{row['fwd+bwd medjax ms'] / row['fwd+bwd xla ms']:.2f} |"
        )
        if has_torch:
            line += f" {cell('fwd+bwd torch')} | {row['fwd+bwd medjax ms'] / row['fwd+bwd torch ms']:.2f} |"
        lines.append(line)
    if r["model_step_s"]:
        m = r["model_step_s"]
        lines += [
            "",
            f"Joint network training step (Estienne 2020 quick, 32^3, batch 2, f = 4): "
            f"{m['xla']:.3f} s with XLA's convolutions, {m['medjax']:.3f} s with medjax's lowerings "
            f"({m['xla'] / m['medjax']:.2f}x).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
