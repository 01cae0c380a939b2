"""Do XLA:CPU's experimental convolution libraries apply, and do they win? Each option measured alike.

Usage: python benchmarks/xla_cpu_flags.py [--rounds 3] [--repeats 5]

jaxlib 0.10.2 has flags that hand convolutions to YNNPACK, oneDNN or XNNPACK
(``--xla_cpu_experimental_{ynn,onednn,xnn}_fusion_type=individual_convolution``). A flag is read
when the CPU backend starts, so every option runs in its own process; the processes are run in
rounds, alternating, and the minimum over rounds is kept (load spikes only ever slow a run down).

For every option the script records whether the option changes the compiled program at all: the
optimised HLO text of a convolution, searched for library calls (``custom-call`` targets, fusion
kinds naming a library), and whether it differs from the default's. Then, per layer case
(convolutions of the networks medjax ships: the joint network's 4-channel 3^3 layers, wider 3^3
layers of the zoo, V-Net's 5^3, UniverSeg's and PnP-AdaNet's 2D 3x3, ResNetMed3D's 7^3/2 stem,
FocusNetV2's in-plane dilated 3^3), the forward time and the backward times with respect to the
input and to the weights. The default process also times ``medjax.nn.conv``'s lowering (where its
rule applies) and ``torch`` (channels-first, same threads) for reference.

Results: benchmarks/results/xla_cpu_flags.json and .md, with the load average and versions.
"""

import argparse
import hashlib
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "xla_cpu_flags.json"

OPTIONS = {
    "default": "",
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "onednn": "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
    "xnn": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
}

# (name, spatial shape, batch, C_in, C_out, kernel, stride, dilation)
CASES = (
    ("joint net 3^3 4->4 at 32^3, batch 2", (32, 32, 32), 2, 4, 4, 3, 1, 1),
    ("3^3 16->16 at 32^3", (32, 32, 32), 1, 16, 16, 3, 1, 1),
    ("3^3 32->32 at 48^3", (48, 48, 48), 1, 32, 32, 3, 1, 1),
    ("3^3 64->64 at 16^3", (16, 16, 16), 1, 64, 64, 3, 1, 1),
    ("V-Net 5^3 16->16 at 16^3", (16, 16, 16), 1, 16, 16, 5, 1, 1),
    ("ResNetMed3D stem 7^3/2 2->64 at 32^3", (32, 32, 32), 1, 2, 64, 7, 2, 1),
    ("FocusNetV2 3^3 64->64 dilated (1,2,2) at 8x32x32", (8, 32, 32), 1, 64, 64, 3, 1, (1, 2, 2)),
    ("2D 3x3 64->64 at 128^2, batch 4 (UniverSeg, PnP-AdaNet)", (128, 128), 4, 64, 64, 3, 1, 1),
)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args()


def _worker(option, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from medjax.nn import conv as mconv

    def specs(n):
        s = "DHW"[-n:] if n <= 3 else None
        return ("N" + s + "C", s + "IO", "N" + s + "C")

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best = min(best, time.perf_counter() - t0)
        return best

    out = {"option": option, "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": {}}
    for name, spatial, b, cin, cout, k, s, d in CASES:
        n = len(spatial)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(b, *spatial, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k,) * n + (cin, cout)) * 0.05, jnp.float32)
        dil = (d,) * n if isinstance(d, int) else tuple(d)
        pad = [(di * (k - 1) // 2,) * 2 for di in dil]

        # medjax's lowerings are chosen by the padding's form: "SAME" (what its layers pass) where
        # that is this padding, so that its stride-1 rules apply (the explicit pairs fell to XLA)
        same = s == 1 and k % 2 == 1 and all(di == 1 for di in dil)

        def make(impl, s=s, n=n, pad=pad, dil=dil, same=same):
            def conv(lhs, rhs):
                padding = "SAME" if same and impl is mconv.conv_general_dilated else pad
                return impl(
                    lhs, rhs, (s,) * n, padding, rhs_dilation=dil, dimension_numbers=specs(n)
                )

            return conv

        row = {
            "medjax_lowering": mconv.choose(
                x.shape,
                w.shape,
                (s,) * n,
                "SAME" if same else pad,
                rhs_dilation=dil,
                dimension_numbers=specs(n),
                backend="cpu",
            )
        }
        impls = {"xla": lax.conv_general_dilated}
        if option == "default":
            impls["medjax"] = mconv.conv_general_dilated
        for label, impl in impls.items():
            f = make(impl)
            fwd = jax.jit(f)
            gx = jax.jit(jax.grad(lambda x, w, f=f: f(x, w).sum(), argnums=0))
            gw = jax.jit(jax.grad(lambda x, w, f=f: f(x, w).sum(), argnums=1))
            row[label] = {
                "fwd": timed(fwd, x, w),
                "bwd_input": timed(gx, x, w),
                "bwd_weights": timed(gw, x, w),
            }
            if label == "xla":
                text = fwd.lower(x, w).compile().as_text()
                calls = sorted({t.split('"')[1] for t in text.split("custom_call_target=")[1:]})
                row["hlo"] = {
                    "custom_calls": calls,
                    "library_words": sorted(
                        {word for word in ("onednn", "xnn", "ynn", "mkl") if word in text.lower()}
                    ),
                    "ops": sorted(
                        {
                            line.split("=")[1].split("(")[0].strip().split(" ")[-1]
                            for line in text.splitlines()
                            if " = " in line and "(" in line
                        }
                    )[:12],
                    "text_hash": hashlib.sha1(
                        re.sub(r"metadata=\{[^}]*\}|HloModule [^\n]*", "", text).encode()
                    ).hexdigest(),
                }
        out["cases"][name] = row
    if option == "default":
        try:
            import torch

            torch.set_num_threads(os.cpu_count())
            for name, spatial, b, cin, cout, k, s, d in CASES:
                n = len(spatial)
                fn = torch.nn.functional.conv3d if n == 3 else torch.nn.functional.conv2d
                dil = (d,) * n if isinstance(d, int) else tuple(d)
                x = torch.randn(b, cin, *spatial, requires_grad=True)
                w = (torch.randn(cout, cin, *(k,) * n) * 0.05).requires_grad_(True)
                pad = tuple(di * (k - 1) // 2 for di in dil)

                def tfwd(x=x, w=w, fn=fn, pad=pad, dil=dil, s=s):
                    with torch.no_grad():
                        fn(x, w, stride=s, padding=pad, dilation=dil)

                def tbwd(x=x, w=w, fn=fn, pad=pad, dil=dil, s=s):
                    fn(x, w, stride=s, padding=pad, dilation=dil).sum().backward()

                def best(f):
                    f()
                    t = float("inf")
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        f()
                        t = min(t, time.perf_counter() - t0)
                    return t

                out["cases"][name]["torch"] = {"fwd": best(tfwd), "fwd_bwd": best(tbwd)}
        except ImportError:
            pass
    return out


def _table(rows):
    head = ["layer", "pass"] + [f"XLA {o}" for o in OPTIONS] + ["medjax", "torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, *_ in CASES:
        for key in ("fwd", "bwd_input", "bwd_weights"):
            cells = [name if key == "fwd" else "", key]
            for o in OPTIONS:
                v = rows[o]["cases"][name]["xla"][key]
                cells.append(f"{1e3 * v:.1f}")
            m = rows["default"]["cases"][name].get("medjax", {}).get(key)
            how = rows["default"]["cases"][name].get("medjax_lowering", "?")
            cells.append(f"{1e3 * m:.1f} ({how})" if m else "-")
            t = rows["default"]["cases"][name].get("torch", {})
            tv = (
                t.get("fwd")
                if key == "fwd"
                else (t.get("fwd_bwd") if key == "bwd_weights" else None)
            )
            cells.append(f"{1e3 * tv:.1f}" if tv else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    args = _parse()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.repeats)))
        return
    best = {}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for option, flag in OPTIONS.items():
            env = dict(os.environ)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
            print(f"round {r + 1}/{args.rounds}: {option}", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", option, "--repeats", str(args.repeats)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if option not in best:
                best[option] = res
            else:  # keep the minimum over rounds
                for name, row in res["cases"].items():
                    for impl, times in row.items():
                        if impl in ("hlo", "medjax_lowering"):
                            continue
                        for k, v in times.items():
                            old = best[option]["cases"][name][impl][k]
                            best[option]["cases"][name][impl][k] = min(old, v)
        load.append(os.getloadavg()[0])
    default_hashes = {n: best["default"]["cases"][n]["hlo"]["text_hash"] for n, *_ in CASES}
    applied = {
        o: {n: best[o]["cases"][n]["hlo"]["text_hash"] != default_hashes[n] for n, *_ in CASES}
        for o in OPTIONS
    }
    import jax

    summary = {
        "options": OPTIONS,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_average_during": load,
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "hlo_differs_from_default": applied,
        "results": best,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    md = [
        f"XLA:CPU convolution options, min over {args.rounds} alternating rounds of {args.repeats} "
        f"(milliseconds; load average {min(load):.1f}-{max(load):.1f}, {os.cpu_count()} CPUs)",
        "",
        "Optimised HLO differs from the default's: "
        + "; ".join(
            f"{o}: {sum(v.values())}/{len(v)} layers" for o, v in applied.items() if o != "default"
        ),
        "",
        _table(best),
        "",
        "torch's backward column is forward + backward (input and weights together).",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
