"""Helpers of the MedicalZoo parity tests: layout moves, randomised statistics, eval/train checks.

A torch re-creation of an original network (written in each test from ORIGINALS.md and the
original's attribute names, so that its ``state_dict`` has the real keys) is compared with the
medjax port whose variables come through the port's ``load_torch_state_dict``:

- eval mode with the factory's dropout rates (dropout is off in eval on both sides);
- train mode (batch statistics) with every dropout rate set to 0 on both sides, since the two
  libraries draw different masks; the running statistics after the step are compared too.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tests.conftest import require_reference


def torch():
    return require_reference("torch")


def x_input(shape, seed=0):
    """A channels-last float32 input of ``shape``."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def to_torch(x):
    return torch().from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def randomise(tmod, seed=0):
    """Non-trivial BatchNorm affine/statistics and PReLU slopes on every such module of ``tmod``."""
    t = torch()
    g = t.Generator().manual_seed(seed)
    with t.no_grad():
        for m in tmod.modules():
            if isinstance(m, t.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.3 * t.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * t.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * t.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + t.rand(m.running_var.shape, generator=g))
            elif isinstance(m, t.nn.PReLU):
                m.weight.copy_(0.1 + 0.3 * t.rand(m.weight.shape, generator=g))
    return tmod


def torch_param_count(tmod):
    return sum(p.numel() for p in tmod.parameters())


def param_count(model, shape):
    """Parameters of ``model`` (``jax.eval_shape`` of ``init`` on a ``shape`` input; no compute)."""
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(v["params"]))


def disable_torch_dropout(tmod):
    """Set every dropout of ``tmod`` to rate 0: ``nn.Dropout`` modules and ``drop_rate`` fields."""
    t = torch()
    for m in tmod.modules():
        if isinstance(m, t.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if hasattr(m, "drop_rate"):
            m.drop_rate = 0.0
    return tmod


def close(a, b, tol):
    """``a`` equals ``b`` to ``tol`` relative to ``b``'s scale (the deep 1^3 heads shrink outputs)."""
    a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(b)) or 1.0
    chex.assert_trees_all_close(a, b, atol=tol * scale, rtol=tol)


def compile_fast(fn, *args, level0=True):
    """``jax.jit(fn)`` compiled for ``args``, at XLA's backend optimisation level 0 by default.

    A test network runs once on a tiny input, so compilation is nearly all of its cost; level 0
    compiles 2-3x faster and computes the same arithmetic, but runs large convolutions much
    more slowly (``level0=False`` for networks at 16^3 and more).
    """
    lowered = jax.jit(fn).lower(*args)
    if not level0:
        return lowered.compile()
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})


def check_parity(
    model,
    train_model,
    tmod,
    load,
    x,
    *,
    tol=1e-4,
    train_tol=None,
    outputs=lambda y: y,
    check_stats=False,
    level0=True,
):
    """``model`` (variables from ``load(tmod.state_dict())``) matches ``tmod`` in eval and train.

    ``train_model`` is ``model`` with its dropout rates at 0; ``outputs`` maps a torch output to
    the port's structure (e.g. a tuple); ``train_tol`` (default ``tol``) bounds the train-mode
    error. Both modes run in one compiled function. With
    ``check_stats`` the running statistics after the training step are compared too. Returns the
    imported variables.
    """
    t = torch()
    randomise(tmod)
    variables = load(tmod.state_dict())

    def run(v, x):
        y_eval = model.apply(v, x, train=False)
        y_train, updates = train_model.apply(v, x, train=True, mutable=["batch_stats"])
        return y_eval, y_train, updates["batch_stats"]

    x = jnp.asarray(x)
    y_eval, y_train, stats = compile_fast(run, variables, x, level0=level0)(variables, x)
    xt = to_torch(np.asarray(x))
    tmod.eval()
    with t.no_grad():
        close(y_eval, jax.tree.map(from_torch, outputs(tmod(xt))), tol)
        disable_torch_dropout(tmod).train()
        close(y_train, jax.tree.map(from_torch, outputs(tmod(xt))), train_tol or tol)
    if check_stats:
        close(stats, load(tmod.state_dict())["batch_stats"], train_tol or tol)
    return variables
