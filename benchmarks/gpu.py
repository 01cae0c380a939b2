"""Accelerator benchmark: every registered network's training step and the warp, in float32 and
bfloat16, against the device's roofline; and the cost of deterministic scatters for exact resume.

Usage (on a machine with a GPU; see benchmarks/gpu.sh, which installs what is missing first):

    python benchmarks/gpu.py [--out DIR] [--budget-s 420] [--models unet3d,vnet,...]

For each network of ``medjax.models.registry`` at its example input (batch 2), one training step
(forward, a softmax cross-entropy or MSE loss on random targets, backward, Adam) is compiled and
timed (median of 10 after warm-up) with float32 and with bfloat16 compute (parameters float32).
XLA's cost analysis of the compiled step gives its FLOPs and bytes accessed, so each row states
its arithmetic intensity and the share of the roofline it reaches: min(peak FLOP/s, bandwidth x
intensity), with the peaks measured in the same run (a large matmul in each dtype, a large copy).
The warp row times ``medjax.ops.warp`` forward and backward at 1x128^3. The determinism row times
the joint registration network's step with and without ``--xla_gpu_deterministic_ops`` (in a
subprocess, since XLA reads flags at start-up) and checks that two deterministic runs agree bit
for bit. Results: ``DIR/gpu.json`` and ``DIR/gpu.md`` (default ``benchmarks/results``). It stops
starting new rows once ``--budget-s`` is spent, so it always ends inside a device lease.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--models", default="", help="comma list of registry names (default: all)")
    p.add_argument("--determinism-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def _median_time(fn, *args, n=10):
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peaks():
    import jax
    import jax.numpy as jnp

    out = {}
    size = 8192 if jax.default_backend() == "gpu" else 1024
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((size, size), dtype)
        t = _median_time(jax.jit(lambda x: x @ x), a, n=5)
        out[f"matmul_{dtype}_flops"] = 2 * size**3 / t
    x = jnp.ones((1 << (28 if size == 8192 else 24),), jnp.float32)  # 1 GiB on a GPU
    t = _median_time(jax.jit(lambda v: v * 1.0001), x, n=5)
    out["copy_bytes_per_s"] = 2 * x.size * 4 / t
    return out


def _cost(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))), float(cost.get("bytes accessed", float("nan")))


def _train_step(model, inputs, dtype):
    """A jitted (params, opt, batch) -> (params, opt, loss) step of ``model`` in compute ``dtype``."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adam(1e-4)

    def loss_fn(params, batch):
        cast = [x.astype(dtype) for x in batch["inputs"]]
        out = model.apply({"params": params}, *cast, train=False)
        out = out[0] if isinstance(out, tuple | list) else out
        if isinstance(out, dict):
            out = out.get("logits", out.get("main_result", next(iter(out.values()))))
        out = out.astype(jnp.float32)
        return jnp.mean((out - batch["target"]) ** 2)

    def step(params, opt, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    return jax.jit(step), tx


def _model_rows(names, deadline, peaks):
    import jax
    import jax.numpy as jnp

    from medjax.models import registry

    rows = []
    for name in names:
        if time.perf_counter() > deadline:
            rows.append({"model": name, "skipped": "budget spent"})
            continue
        e = registry.entry(name)
        try:
            model_cls = e.load()
            for dtype in ("float32", "bfloat16"):
                kw = dict(e.defaults)
                fields = getattr(model_cls, "__dataclass_fields__", {})
                if "dtype" in fields:
                    kw["dtype"] = jnp.dtype(dtype)
                model = model_cls(**kw)
                shapes = [(2, *s[1:]) for s in e.inputs]
                inputs = [jnp.ones(s, jnp.float32) for s in shapes]
                params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
                out = jax.eval_shape(
                    lambda p, *a, m=model: m.apply({"params": p}, *a), params, *inputs
                )
                out = out[0] if isinstance(out, tuple | list) else out
                if isinstance(out, dict):
                    out = out.get("logits", out.get("main_result", next(iter(out.values()))))
                batch = {"inputs": inputs, "target": jnp.zeros(out.shape, jnp.float32)}
                step, tx = _train_step(model, inputs, jnp.dtype(dtype))
                opt = tx.init(params)
                t0 = time.perf_counter()
                compiled = step.lower(params, opt, batch).compile()
                compile_s = time.perf_counter() - t0
                t = _median_time(compiled, params, opt, batch)
                flops, nbytes = _cost(compiled)
                peak = peaks[f"matmul_{dtype}_flops"]
                roof = min(peak, peaks["copy_bytes_per_s"] * flops / nbytes) if nbytes else peak
                rows.append(
                    {
                        "model": name,
                        "dtype": dtype,
                        "input": shapes,
                        "step_s": t,
                        "compile_s": compile_s,
                        "flops": flops,
                        "bytes": nbytes,
                        "flops_per_s": flops / t,
                        "roofline_flops_per_s": roof,
                        "share_of_roofline": flops / t / roof,
                        "dtype_applied": "dtype" in fields,
                    }
                )
        except Exception as err:  # one failing network must not lose the others
            rows.append({"model": name, "error": f"{type(err).__name__}: {err}"[:300]})
    return rows


def _warp_row():
    import jax
    import jax.numpy as jnp

    from medjax import ops

    x = jnp.ones((1, 128, 128, 128, 1))
    d = jnp.zeros((1, 128, 128, 128, 3)) + 0.3
    fwd = jax.jit(lambda x, d: ops.warp(x, d))
    bwd = jax.jit(jax.grad(lambda x, d: ops.warp(x, d).sum(), argnums=(0, 1)))
    return {"warp_fwd_s": _median_time(fwd, x, d), "warp_fwd_bwd_s": _median_time(bwd, x, d)}


def _determinism_worker():
    """Two identical joint-network steps, timed; prints JSON (run with or without the flag)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medjax.models.joint_regseg import JointRegSeg

    model = JointRegSeg(f=8, n_modalities=4, n_classes=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 64, 4)), jnp.float32)
    params = jax.jit(lambda k: model.init(k, x, x))(jax.random.key(0))["params"]
    grad = jax.jit(
        jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, x[::-1])["warped"] ** 2))
    )
    g1, g2 = grad(params), grad(params)
    same = all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
    )
    print(json.dumps({"step_s": _median_time(grad, params, n=5), "bit_identical": same}))


def main():
    args = _parse()
    if args.determinism_worker:
        _determinism_worker()
        return
    import jax

    from medjax.models import registry

    deadline = time.perf_counter() + args.budget_s
    res = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    res["peaks"] = _peaks()
    res.update(_warp_row())
    names = [n for n in args.models.split(",") if n] or registry.names()
    res["models"] = _model_rows(names, deadline - 90, res["peaks"])
    det = {}
    flags = ("", "--xla_gpu_deterministic_ops=true") if jax.default_backend() == "gpu" else ()
    for flag in flags:
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()}
        proc = subprocess.run(
            [sys.executable, __file__, "--determinism-worker"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        det[flag or "default"] = (
            json.loads(proc.stdout.strip().splitlines()[-1])
            if proc.returncode == 0
            else proc.stderr[-500:]
        )
    res["determinism"] = det
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "| model | dtype | step (ms) | compile (s) | TFLOP/s | share of roofline |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["models"]:
        if "step_s" in r:
            lines.append(
                f"| {r['model']} | {r['dtype']} | {1e3 * r['step_s']:.2f} | {r['compile_s']:.1f} | "
                f"{r['flops_per_s'] / 1e12:.1f} | {100 * r['share_of_roofline']:.0f}% |"
            )
        else:
            lines.append(f"| {r['model']} | - | {r.get('error', r.get('skipped'))} | | | |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(
        json.dumps(
            {k: res[k] for k in ("peaks", "warp_fwd_s", "warp_fwd_bwd_s", "determinism")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
