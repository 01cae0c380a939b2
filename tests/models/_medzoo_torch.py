"""Helpers shared by the MedicalZoo parity tests: layout moves at the edge, non-trivial torch
weights, and one eval / train comparison of a torch re-creation with its medjax port.

A test module imports :func:`xla_conv` (an autouse fixture) to trace with XLA's convolution."""

import chex
import jax
import numpy as np
import pytest

import medjax.nn.conv
from tests.conftest import require_reference


@pytest.fixture(autouse=True)
def xla_conv(monkeypatch):
    """Use XLA's convolution, not medjax's CPU lowerings, while a test traces a network.

    The lowerings give the same convolutions (``tests/nn/test_conv.py``) but compile about 3x
    more slowly; these tests check each network's wiring against torch, once per mode.
    """
    monkeypatch.setattr(medjax.nn.conv, "enabled", False)


def torch():
    """The torch module (skips locally, fails in CI, when missing)."""
    t = require_reference("torch")
    t.set_num_threads(2)
    return t


def rand(shape, seed=0):
    """Channels-last float32 normal noise."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def to_torch(x):
    """(B, *S, C) numpy -> (B, C, *S) torch tensor."""
    return torch().from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def to_numpy(t):
    """(B, C, *S) torch tensor -> (B, *S, C) numpy."""
    return np.moveaxis(t.detach().numpy(), 1, -1)


def randomise(tmod, seed=0):
    """Non-trivial BatchNorm affine and running statistics, PReLU slopes and norm affines."""
    t = torch()
    g = t.Generator().manual_seed(seed)
    with t.no_grad():
        for m in tmod.modules():
            if isinstance(m, t.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.3 * t.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * t.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * t.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + t.rand(m.running_var.shape, generator=g))
            elif isinstance(m, t.nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * t.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * t.randn(m.bias.shape, generator=g))
            elif isinstance(m, t.nn.PReLU):
                m.weight.copy_(0.25 + 0.2 * t.randn(m.weight.shape, generator=g))
    return tmod


def set_dropout_eval(tmod):
    """Put every dropout module of ``tmod`` in eval mode (BatchNorm keeps its mode)."""
    t = torch()
    for m in tmod.modules():
        if isinstance(m, t.nn.modules.dropout._DropoutNd):
            m.eval()
    return tmod


def assert_close(got, want, *, rtol=1e-4, atol_frac=1e-4):
    """``got`` equals ``want`` to ``rtol`` plus ``atol_frac`` of ``want``'s largest magnitude."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    atol = atol_frac * max(float(np.abs(want).max()), 1e-6)
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def _torch_outputs(out):
    """A torch output (a tensor or a tuple of them) as a tuple of channels-last numpy arrays."""
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(to_numpy(o) if o.ndim >= 3 else o.detach().numpy() for o in outs)


def _jax_outputs(out):
    return tuple(np.asarray(o) for o in (out if isinstance(out, tuple) else (out,)))


def eval_and_train(model, variables, tmod, x, *, train=True, x_train=None):
    """Compare ``model`` with ``tmod`` on ``x``: eval mode, then (``train``) batch statistics.

    Each mode is one jitted forward pass; the training pass runs on ``x_train`` when given (a
    larger batch or size where batch statistics over a few values are ill-conditioned). In
    training, torch's dropout modules are put in eval mode and ``model`` must have its dropout
    rate at 0: the comparison is of the BatchNorm batch statistics, not of dropout masks.
    Returns the medjax eval outputs (a tuple of arrays) and the updated ``batch_stats`` of the
    training pass (None without it).
    """
    t = torch()
    tmod.eval()
    with t.no_grad():
        want = _torch_outputs(tmod(to_torch(x)))
    evaluated = _jax_outputs(jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x))
    for g, w in zip(evaluated, want, strict=True):
        assert_close(g, w)
    if not train:
        return evaluated, None
    x = x if x_train is None else x_train
    set_dropout_eval(tmod.train())
    with t.no_grad():
        want = _torch_outputs(tmod(to_torch(x)))
    got, upd = jax.jit(lambda v, a: model.apply(v, a, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    for g, w in zip(_jax_outputs(got), want, strict=True):
        assert_close(g, w)
    return evaluated, upd
