"""Benchmark whole networks (the MedicalZoo zoo) against their PyTorch re-creations, same run.

Usage: python benchmarks/models.py [--system medicalzoo|systems] [--size 64] [--only unet3d,vnet]
       [--repeats 3] [--train-repeats 2] [--threads N] [--max-mib M] [--no-torch]

For every network of a system, at batch 1 with 2 channels (3 for the 3-modality HyperDenseNet) on a
``size``^3 volume (the 2D Unet: the volume's ``size`` axial slices as its batch), or a smaller size
where the ``size``^3 training step does not fit in memory (XLA's buffer plan above ``--max-mib``;
then 48^3, 32^3, then the smallest size the network takes):

- parameters, and the FLOPs of the forward pass and of the training step (XLA's cost analysis of
  the compiled medjax functions; the same count serves both libraries, which run the same network);
- the forward time (evaluation mode) and the training-step time (forward, backward, SGD with
  momentum 0.5, the original's optimiser; the loss is the zoo's Dice, plus DenseVoxelNet's second
  head and ResNet3dVAE's VAE terms) of medjax and of the PyTorch re-creation that the weight-import
  parity tests build (``tests/models/test_*.py``), each in a fresh subprocess, medjax then torch
  back to back for the same network, so that load changes hit both alike as far as possible; the
  ratio of the medians. Each is timed after one warm-up call, which is the one measurement when it
  takes longer than ``--long`` seconds;
- medjax's compile time of each, and each step's share of this machine's float32 matmul peak,
  measured in the same run (a jitted 2048x2048 matmul);
- memory: XLA's buffer plan of the compiled step (``compiled.memory_analysis()``: arguments,
  outputs and temporaries) against PyTorch's peak (the resident-set high-water mark of its
  subprocess after the timed runs minus the one before the first, ``ru_maxrss``); medjax's peak RSS
  increase is recorded too.

``--system systems`` gives every other registered network (``benchmarks/_systems.py``: the joint
network, its V-Net, VoxelMorph, co-training's U-Net, FocusNetV2's parts, UniverSeg, PnP-AdaNet's
three networks), each with its own input shape and stand-in loss, and with its PyTorch side
checked against medjax's forward outputs in the same run (the largest difference is recorded).
A run of ``--system X`` replaces X's rows in ``benchmarks/results/models.json`` and keeps the
others; with ``--only`` the rows it measures keep their place and are listed as measured later,
and ``models.md`` shows every system's rows.

CPU timings are noisy when other jobs share the machine: the load average before and after is
recorded; the medjax / PyTorch ratios, measured back to back, are the numbers to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "models.json"
FALLBACK_SIZES = (48, 32)


@dataclasses.dataclass(frozen=True)
class Case:
    """One network: its medjax registry name and arguments, and its PyTorch re-creation.

    ``torch(size) -> module`` builds the re-creation (imported from the parity tests); ``kind`` is
    how the network is called: ``3d``, ``slices`` (a 2D network on the slices of the volume),
    ``two_heads`` (a tuple whose heads are both trained) or ``vae`` (segmentation, reconstruction,
    mu, logvar). ``margin``: voxels its unpadded convolutions lose per side (the labels are that
    much smaller). ``multiple``: its input sizes must be multiples of it; ``min_size``: the
    smallest it trains on (BatchNorm needs more than one value per channel at batch 1).
    """

    model: str
    kwargs: dict
    torch: Callable
    channels: int = 2
    kind: str = "3d"
    margin: int = 0
    min_size: int = 1
    multiple: int = 1
    dim: bool = False  # built for its input size (kwargs["dim"] = the size)


def _zoo_cases():
    """The MedicalZoo networks (registry names; the factory's defaults, 4 classes)."""

    def t(module, fn, *args, **kw):
        def build(size):
            sys.path.insert(0, str(ROOT))
            mod = __import__(f"tests.models.{module}", fromlist=[fn])
            extra = {"dim": (size,) * 3} if fn == "_torch_vae" else {}
            return getattr(mod, fn)(*args, **kw, **extra)

        return build

    def dense(which, cin):
        def build(size):
            sys.path.insert(0, str(ROOT))
            from tests.models.test_densenet3d import _torch_classes

            single, dual, dual_single = _torch_classes()
            if which == "single":
                return single(cin, 4, 0.1)
            if which == "dual":
                return dual(cin, 4)
            return dual_single(cin, 4, 0.1)

        return build

    zoo = {"in_channels": 2, "num_classes": 4}
    return {
        "unet3d": Case(
            "unet3d", zoo, t("test_unet3d", "_torch_unet3d", 2, 4), multiple=16, min_size=32
        ),
        "vnet": Case("vnet", zoo, t("test_vnet", "_torch_vnet", 2, 4), multiple=16, min_size=32),
        "vnetlight": Case(
            "vnetlight",
            zoo,
            t("test_vnet", "_torch_vnet", 2, 4, light=True),
            multiple=8,
            min_size=16,
        ),
        "singlepathdensenet": Case("singlepathdensenet", zoo, dense("single", 2), min_size=2),
        "dualpathdensenet": Case("dualpathdensenet", zoo, dense("dual", 2), min_size=2),
        "dualsingledensenet": Case("dualsingledensenet", zoo, dense("dual_single", 2), min_size=2),
        "hyperdensenet_2mod": Case(
            "hyperdensenet_2mod",
            zoo,
            t("test_hyperdensenet", "_torch_hyperdense", ("Top", "Bottom")),
            margin=9,
            min_size=19,
        ),
        "hyperdensenet": Case(
            "hyperdensenet",
            {"in_channels": 3, "num_classes": 4},
            t("test_hyperdensenet", "_torch_hyperdense", ("Top", "Middle", "Bottom")),
            channels=3,
            margin=9,
            min_size=19,
        ),
        "skipdensenet3d": Case(
            "skipdensenet3d",
            zoo,
            t("test_skipdensenet3d", "_torch_skipdense"),
            multiple=16,
            min_size=32,
        ),
        "densevoxelnet": Case(
            "densevoxelnet",
            zoo,
            t("test_densevoxelnet", "_torch_densevoxel"),
            kind="two_heads",
            multiple=4,
            min_size=8,
        ),
        "resnet3dvae": Case(
            "resnet3dvae",
            zoo,
            t("test_resnet3d_vae", "_torch_vae", 2, 4),
            kind="vae",
            multiple=16,
            dim=True,
        ),
        "resnetmed3d": Case(
            "resnetmed3d",
            zoo,
            t("test_resnet_med3d", "_torch_resnet_med3d", 2, 4),
            multiple=8,
            min_size=16,
        ),
        "highresnet3d": Case(
            "highresnet3d", zoo, t("test_highresnet", "_torch_highresnet", 2, 4), min_size=2
        ),
        "unet": Case(
            "unet", zoo, t("test_unet2d", "_torch_unet2d", 2, 4), kind="slices", min_size=16
        ),
    }


def _system_cases():
    """The networks of the other systems (``benchmarks/_systems.py``: a ``Spec`` each)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _systems

    return _systems.cases()


#: system -> () -> {row name: Case or _systems.Spec}
SYSTEMS = {"medicalzoo": _zoo_cases, "systems": _system_cases}


def _is_spec(case):
    return not isinstance(case, Case)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="medicalzoo", choices=sorted(SYSTEMS))
    p.add_argument("--size", type=int, default=64, help="cubic input size (voxels)")
    p.add_argument("--only", default="", help="comma list of row names")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes")
    p.add_argument("--train-repeats", type=int, default=2, help="timed training steps")
    p.add_argument(
        "--long", type=float, default=20.0, help="one timed run when one takes longer (s)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="XLA and torch threads")
    p.add_argument(
        "--max-mib", type=float, default=6000.0, help="largest XLA buffer plan of a step (MiB)"
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch re-creations")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", nargs=3, metavar=("LIB", "CASE", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--exchange", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _timed(fn, repeats, long):
    """Wall times of ``repeats`` calls of ``fn`` after a warm-up call.

    When the warm-up itself takes longer than ``long`` seconds it is the one measurement (a
    network that slow is not timed again: first-call overheads are small beside it).
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > long:
        return [first]
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _inputs(case, size, seed=0):
    """(x (B, S, S, S, C) float32, labels (B, S', S', S') int32) channels-last numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, size, size, size, case.channels)).astype(np.float32)
    out = size - 2 * case.margin
    y = rng.integers(0, 4, size=(1, out, out, out)).astype(np.int32)
    return x, y


def _sizes(case, size):
    """The sizes to try, largest first: ``size``, the fallbacks, the smallest the network takes."""
    if _is_spec(case):
        return [size]
    smallest = max(case.min_size, case.multiple)
    if case.dim:
        smallest = max(smallest, 16)
    ok = [s for s in (size, *FALLBACK_SIZES) if s <= size and s >= smallest]
    ok = [s for s in ok if s % case.multiple == 0]
    return list(dict.fromkeys(ok + [smallest]))


# ------------------------------------------------------------------------------------ medjax


def _medjax_fns(case, size):
    """(model, variables, forward(v, x), loss(params, state, x, y, key)) of the medjax network."""
    import jax
    import jax.numpy as jnp

    from medjax.losses import soft_dice_loss, vae_loss
    from medjax.models import registry
    from medjax.nn.blocks import fast_init, rbg_key

    e = registry.entry(case.model)
    kwargs = dict(case.kwargs)
    if case.dim:
        kwargs["dim"] = (size,) * 3
    model = e.load()(**kwargs)

    def prep(x):
        if case.kind == "slices":  # (1, D, H, W, C) -> (W, D, H, C)
            return jnp.moveaxis(x, -2, 1).reshape((-1, *x.shape[1:3], x.shape[-1]))
        return x

    def logits_of(out, like):
        if case.kind == "slices":
            y = out.reshape((like.shape[0], like.shape[3], *like.shape[1:3], -1))
            return jnp.moveaxis(y, 1, -2)
        return out

    x0 = jnp.zeros((1, size, size, size, case.channels), jnp.float32)
    variables = fast_init(model, jax.random.key(0), prep(x0))

    def forward(v, x):
        out = model.apply(v, prep(x), train=False)
        return out if case.kind in ("two_heads", "vae") else logits_of(out, x)

    def loss(params, state, x, y, key):
        mutable = ["batch_stats"] if "batch_stats" in state else False
        k_drop, k_vae = jax.random.split(key)
        rngs = {"dropout": rbg_key(k_drop), "vae": k_vae}
        out = model.apply(
            {"params": params, **state}, prep(x), train=True, rngs=rngs, mutable=mutable
        )
        out, new_state = out if mutable else (out, state)

        def dice(z):
            return soft_dice_loss(z, y, squared=True, eps=1e-6)

        if case.kind == "two_heads":
            value = dice(out[0]) + dice(out[1])
        elif case.kind == "vae":
            value = dice(out[0]) + vae_loss(x, out[1], out[2], out[3])
        else:
            value = dice(logits_of(out, x))
        return value, dict(new_state)

    return model, variables, forward, loss


def medjax_worker(case, size, args):
    """Compile and time the medjax forward pass and training step; returns a dict."""
    import jax
    import jax.numpy as jnp
    import optax

    if _is_spec(case):
        shape = case.shape(size)
        inp = case.inputs(shape)
        variables, forward, loss = case.medjax(shape, inp)
        x = {k: jnp.asarray(v) for k, v in inp.items()}
        y = None
    else:
        x, y = (jnp.asarray(a) for a in _inputs(case, size))
        _, variables, forward, loss = _medjax_fns(case, size)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.sgd(1e-2, momentum=0.5)

    def step(p, o, s, x, y, key):
        args = (x, key) if y is None else (x, y, key)
        (value, s), g = jax.value_and_grad(loss, has_aux=True)(p, s, *args)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, s, value

    out = {"parameters": int(sum(a.size for a in jax.tree.leaves(params)))}
    train = jax.jit(step, donate_argnums=(0, 1, 2))
    opt = tx.init(params)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled_step = train.lower(params, opt, state, x, y, key).compile()
    out["train_compile_s"] = time.perf_counter() - t0
    ma = compiled_step.memory_analysis()
    plan = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes) / 2**20
    out["train_xla_mib"] = plan
    out["train_xla_temp_mib"] = ma.temp_size_in_bytes / 2**20
    if plan > args.max_mib:
        return {**out, "too_big": True}
    cost = compiled_step.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    out["train_flops"] = float(cost.get("flops", float("nan")))

    fwd = jax.jit(forward)
    t0 = time.perf_counter()
    compiled_fwd = fwd.lower(variables, x).compile()
    out["forward_compile_s"] = time.perf_counter() - t0
    cost = compiled_fwd.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    out["forward_flops"] = float(cost.get("flops", float("nan")))
    ma = compiled_fwd.memory_analysis()
    out["forward_xla_mib"] = (
        ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    ) / 2**20

    if args.exchange:  # the forward outputs (and parameters) the torch worker compares with
        import numpy as np
        from _systems import _flat

        outs = compiled_fwd(variables, x)
        np.savez(args.exchange, **{f"out{i}": np.asarray(o) for i, o in enumerate(outs)})
        flat = _flat(jax.tree.map(np.asarray, dict(variables["params"])))
        np.savez(pathlib.Path(args.exchange).with_suffix(".params.npz"), **flat)
    rss0 = _maxrss_mib()
    out["forward_s"] = _timed(
        lambda: jax.block_until_ready(compiled_fwd(variables, x)), args.repeats, args.long
    )
    box = {"p": params, "o": opt, "s": state}

    def run():
        box["p"], box["o"], box["s"], v = compiled_step(box["p"], box["o"], box["s"], x, y, key)
        jax.block_until_ready(v)

    out["train_s"] = _timed(run, args.train_repeats, args.long)
    out["peak_rss_increase_mib"] = _maxrss_mib() - rss0
    out["version"] = jax.__version__
    return out


# ------------------------------------------------------------------------------------ torch


def torch_worker(case, size, args):
    """Time the PyTorch re-creation's forward pass and training step; returns a dict."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    if _is_spec(case):
        return _spec_torch_worker(torch, case, size, args)
    net = case.torch(size)
    x, y = _inputs(case, size)
    tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    ty = torch.from_numpy(y).long()
    if case.kind == "slices":  # (1, C, D, H, W) -> (W, C, D, H)
        tx = tx[0].permute(3, 0, 1, 2).contiguous()
    out = {"parameters": int(sum(p.numel() for p in net.parameters()))}

    from _systems import _torch_dice

    def dice(z):
        if case.kind == "slices":  # (W, K, D, H) -> (1, K, D, H, W)
            z = z.permute(1, 2, 3, 0)[None]
        return _torch_dice(z, ty, 4)

    def loss(o):
        if case.kind == "two_heads":
            return dice(o[0]) + dice(o[1])
        if case.kind == "vae":
            seg, rec, mu, logvar = o
            n = float(np.prod(rec.shape[2:]))
            kl = ((mu**2 + logvar.exp() - logvar - 1).sum(1) / n).mean()
            return dice(seg) + 0.1 * ((rec - tx) ** 2).mean() + 0.1 * kl
        return dice(o)

    rss0 = _maxrss_mib()
    net.eval()

    def fwd():
        with torch.no_grad():
            net(tx)

    out["forward_s"] = _timed(fwd, args.repeats, args.long)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(net(tx)).backward()
        opt.step()

    out["train_s"] = _timed(step, args.train_repeats, args.long)
    out["peak_rss_increase_mib"] = _maxrss_mib() - rss0
    out["version"] = torch.__version__
    return out


def _spec_torch_worker(torch, case, size, args):
    """The torch side of a system row: parity with the medjax outputs, then the same timings."""
    import numpy as np
    from _systems import _exchange_check

    shape = case.shape(size)
    net, forward, loss = case.torch(shape, case.inputs(shape), pathlib.Path(args.exchange))
    module = net if isinstance(net, torch.nn.Module) else None
    params = list(module.parameters()) if module is not None else list(net)
    out = {"parameters": int(sum(p.numel() for p in params))}
    if module is not None:
        module.eval()
    with torch.no_grad():
        outs = [np.moveaxis(o.numpy(), 1, -1) for o in forward()]
    out["parity_max_abs_diff"], out["parity_max_abs_output"] = _exchange_check(args.exchange, outs)
    rss0 = _maxrss_mib()

    def fwd():
        with torch.no_grad():
            forward()

    out["forward_s"] = _timed(fwd, args.repeats, args.long)
    if module is not None:
        module.train()
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    out["train_s"] = _timed(step, args.train_repeats, args.long)
    out["peak_rss_increase_mib"] = _maxrss_mib() - rss0
    out["version"] = torch.__version__
    return out


def peak_worker(args):
    """GFLOP/s of a jitted 2048x2048 float32 matmul (XLA), the machine's measured peak here."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = jnp.asarray(np.random.default_rng(0).random((n, n), dtype=np.float32))
    mm = jax.jit(lambda x: x @ x)
    t = statistics.median(_timed(lambda: mm(a).block_until_ready(), 7, 1e9))
    return {"xla_matmul_gflops": 2 * n**3 / t / 1e9}


# ------------------------------------------------------------------------------------ driver


def _worker(args):
    lib, name, size = args.worker
    if lib == "peak":
        print("RESULT " + json.dumps(peak_worker(args)))
        return
    case = SYSTEMS[args.system]()[name]
    fn = medjax_worker if lib == "medjax" else torch_worker
    print("RESULT " + json.dumps(fn(case, int(size), args)))


def _run_worker(lib, name, size, args, exchange=None):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}"
        + f" intra_op_parallelism_threads={args.threads}"
    )
    cmd = [sys.executable, __file__, "--worker", lib, name, str(size), "--system", args.system]
    for flag in ("repeats", "train_repeats", "long", "threads", "max_mib"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if exchange is not None:
        cmd += ["--exchange", str(exchange)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "worker_wall_s": time.perf_counter() - t0}
    return {
        "error": (proc.stderr or proc.stdout)[-1500:],
        "worker_wall_s": time.perf_counter() - t0,
    }


def _last_error(text):
    """The exception line of a worker's stderr (JAX appends a note on filtered frames after it)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
    return (errors or lines)[-1]


def _row(system, name, size, m, t, peak):
    """The table row of one network from its medjax (``m``) and torch (``t``) worker results."""
    row = {"system": system, "network": name, "size": size, "parameters": m.get("parameters")}
    for key in ("forward_flops", "train_flops", "forward_compile_s", "train_compile_s"):
        row[key] = m.get(key)
    row["medjax_train_xla_mib"] = m.get("train_xla_mib")
    row["medjax_forward_xla_mib"] = m.get("forward_xla_mib")
    row["medjax_peak_rss_increase_mib"] = m.get("peak_rss_increase_mib")
    for kind in ("forward", "train"):
        flops = m.get(f"{kind}_flops")
        for lib, res in (("medjax", m), ("torch", t)):
            times = (res or {}).get(f"{kind}_s")
            if not times:
                continue
            med = statistics.median(times)
            row[f"{lib}_{kind}_ms"] = 1e3 * med
            if flops and peak:
                row[f"{lib}_{kind}_share_of_peak"] = flops / med / 1e9 / peak
        if row.get(f"torch_{kind}_ms") and row.get(f"medjax_{kind}_ms"):
            row[f"{kind}_ratio"] = row[f"medjax_{kind}_ms"] / row[f"torch_{kind}_ms"]
    if t:
        row["torch_parameters"] = t.get("parameters")
        for key in ("parity_max_abs_diff", "parity_max_abs_output"):
            if key in t:
                row[key] = t[key]
        row["torch_peak_rss_increase_mib"] = t.get("peak_rss_increase_mib")
        if t.get("error"):
            row["torch_error"] = _last_error(t["error"])
    if m.get("error"):
        row["medjax_error"] = _last_error(m["error"])
    return row


def main(args):
    cases = SYSTEMS[args.system]()
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; the rows are {', '.join(cases)}")
    has_torch = False
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            has_torch = True
        except ImportError:
            pass
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    peak = _run_worker("peak", "-", 0, args)["xla_matmul_gflops"]
    print(
        f"{args.system}: measured XLA float32 matmul peak {peak:.0f} GFLOP/s, load {load_before[0]:.1f}"
    )
    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="medjax-bench-")
    for name in names:
        case = cases[name]
        exchange = pathlib.Path(scratch.name) / f"{name}.npz" if _is_spec(case) else None
        for size in _sizes(case, args.size):
            m = _run_worker("medjax", name, size, args, exchange)
            if not m.get("too_big"):
                break
            print(f"  {name}: the {size}^3 step plans {m['train_xla_mib']:.0f} MiB; trying smaller")
        has_reference = not _is_spec(case) or case.torch is not None
        t = None
        if has_torch and has_reference and not m.get("error"):
            t = _run_worker("torch", name, size, args, exchange)
        row = _row(args.system, name, size, m, t, peak)
        if _is_spec(case):
            row["shape"] = "x".join(map(str, case.shape(size)))
            row["loss"] = case.loss_text
            row["reference"] = case.reference
        rows.append(row)
        print("  " + _line(row), flush=True)
    out = pathlib.Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"meta": {}, "rows": []}
    fresh = {r["network"]: r for r in rows}  # re-measured rows keep their place in the table
    record["rows"] = [
        fresh.pop(r["network"]) if r.get("system") == args.system and r["network"] in fresh else r
        for r in record["rows"]
    ]
    record["rows"] += list(fresh.values())
    meta = {
        "size": args.size,
        "batch": 1,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "train_repeats": args.train_repeats,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
        "xla_matmul_gflops": peak,
        "train_step": "forward + backward + SGD (momentum 0.5, lr 1e-2); MedicalZoo Dice (softmax, "
        "squared, batch-pooled); + DenseVoxelNet's second head, ResNet3dVAE's 0.1 L2 + 0.1 KL"
        if args.system == "medicalzoo"
        else "forward + backward + SGD (momentum 0.5, lr 1e-2) on each row's stand-in loss (below)",
        "reference": "the PyTorch re-creations of the parity tests (tests/models/test_*.py)"
        if has_torch
        else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    previous = record["meta"].get(args.system)
    kept = {r["network"] for r in record["rows"] if r.get("system") == args.system} - set(names)
    if previous and kept:  # a partial run: the table's run stays, this one is listed under it
        later = [
            {**p, "rows": [n for n in p["rows"] if n not in names]}
            for p in previous.get("later_runs", [])
            if set(p["rows"]) - set(names)
        ]
        meta = {**previous, "later_runs": later + [{**meta, "rows": names}]}
    record["meta"][args.system] = meta
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record) + "\n")
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; -> {out}")


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, int | float) and v == v else "-"


def _line(r):
    return (
        f"{r['network']:<20} {r['size']:>3}^3  fwd {_fmt(r.get('medjax_forward_ms'), '.0f')} / "
        f"{_fmt(r.get('torch_forward_ms'), '.0f')} ms ({_fmt(r.get('forward_ratio'), '.2f')}x)  "
        f"train {_fmt(r.get('medjax_train_ms'), '.0f')} / {_fmt(r.get('torch_train_ms'), '.0f')} ms "
        f"({_fmt(r.get('train_ratio'), '.2f')}x)  {r.get('medjax_error') or r.get('torch_error') or ''}"
    )


def markdown(record):
    """The results of every system as markdown tables (written beside the JSON as ``models.md``)."""
    lines = []
    for system, meta in record["meta"].items():
        rows = [r for r in record["rows"] if r.get("system") == system]
        lines += [
            f"## {system}: batch 1, {meta['size']}^3 unless noted, {meta['threads']} threads "
            f"(load average {meta['load_average_before'][0]:.1f} before, "
            f"{meta['load_average_after'][0]:.1f} after; {meta['time']}; "
            f"{meta['wall_s'] / 60:.0f} min)",
            "",
            f"Measured float32 matmul peak: {meta['xla_matmul_gflops']:.0f} GFLOP/s (XLA). "
            f"Training step: {meta['train_step']}. Times are medians; ratio = medjax / PyTorch.",
            "",
            "| network | size | params | GFLOP fwd / step | fwd ms medjax / PyTorch (ratio) | "
            "step ms medjax / PyTorch (ratio) | step % of peak medjax / PyTorch | compile s fwd / "
            "step | step MiB: XLA plan / PyTorch peak RSS |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:

            def g(key, spec, r=r):
                return _fmt(r.get(key), spec)

            flops = f"{_fmt((r.get('forward_flops') or 0) / 1e9, '.1f')} / {_fmt((r.get('train_flops') or 0) / 1e9, '.1f')}"
            pct = (
                f"{_fmt(100 * (r.get('medjax_train_share_of_peak') or float('nan')), '.1f')} / "
                f"{_fmt(100 * (r.get('torch_train_share_of_peak') or float('nan')), '.1f')}"
            )
            err = r.get("medjax_error") or r.get("torch_error")
            size = r.get("shape") or f"{r['size']}^3"
            lines.append(
                f"| {r['network']} | {size} | {_fmt(r.get('parameters'), ',')} | {flops} | "
                f"{g('medjax_forward_ms', '.0f')} / {g('torch_forward_ms', '.0f')} "
                f"({g('forward_ratio', '.2f')}) | {g('medjax_train_ms', '.0f')} / "
                f"{g('torch_train_ms', '.0f')} ({g('train_ratio', '.2f')}) | {pct} | "
                f"{g('forward_compile_s', '.0f')} / {g('train_compile_s', '.0f')} | "
                f"{g('medjax_train_xla_mib', '.0f')} / {g('torch_peak_rss_increase_mib', '.0f')}"
                f"{' (' + err + ')' if err else ''} |"
            )
        for run in meta.get("later_runs", []):
            lines.append(
                f"\nMeasured later, in a run of their own: {', '.join(run['rows'])} "
                f"({run['time']}, load average {run['load_average_before'][0]:.1f} before, "
                f"{run['load_average_after'][0]:.1f} after; matmul peak "
                f"{run['xla_matmul_gflops']:.0f} GFLOP/s)."
            )
        specs = [r for r in rows if "reference" in r]
        if specs:
            lines += [
                "",
                "Each row's PyTorch side, its agreement with medjax (largest absolute "
                "difference of the forward outputs, the outputs' largest magnitude), and "
                "its loss:",
                "",
            ]
            for r in specs:
                agree = (
                    f"max |diff| {r['parity_max_abs_diff']:.1e} on outputs up to "
                    f"{r['parity_max_abs_output']:.1e}"
                    if "parity_max_abs_diff" in r
                    else "not compared"
                )
                lines.append(f"- {r['network']}: {r['reference']}; {agree}; loss: {r['loss']}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    ARGS = _parse()
    if ARGS.worker:
        _worker(ARGS)
    else:
        main(ARGS)
