"""medjax.nn.layers against torch: Conv (padding, dilation, groups, SYMMETRIC), ConvTranspose, PReLU,
dropout, upsampling and pooling; also the torch_import conversion path they are loaded through."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.torch_import import convert
from medjax.nn import layers
from tests.conftest import require_reference


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _nchw(x):
    torch = require_reference("torch")
    return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _load(module, x, tmod, spec):
    """Flax variables for ``module`` converted from torch module ``tmod``'s state_dict."""
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    return convert(tmod.state_dict(), spec, template, name=type(module).__name__)


CONV_CASES = [
    # ndim, cin, cout, kernel, stride, padding (torch), dilation, groups, bias
    (3, 3, 4, 3, 1, 1, 1, 1, True),
    (3, 4, 6, 3, 2, 1, 1, 2, False),
    (3, 2, 3, (1, 3, 3), 1, (0, 1, 1), 1, 1, True),
    (3, 2, 3, 3, 1, (1, 2, 2), (1, 2, 2), 1, True),
    (2, 3, 5, 5, 1, 2, 1, 1, True),
    (2, 3, 4, 7, 2, 3, 1, 1, False),
    (3, 4, 4, 3, 1, 0, 1, 1, True),  # unpadded (HyperDenseNet)
]


@pytest.mark.reference
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_torch(case):
    torch = require_reference("torch")
    ndim, cin, cout, k, s, p, d, g, bias = case
    tconv = (torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d)(
        cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias
    )
    x = _x((2,) + (9,) * ndim + (cin,))
    m = layers.Conv(cout, k, strides=s, padding=p, dilation=d, groups=g, use_bias=bias)
    v = _load(m, x, tconv, [("", "", "conv")])
    chex.assert_trees_all_close(np.asarray(m.apply(v, x)), _nhwc(tconv(_nchw(x))), atol=2e-5)


def test_symmetric_padding_is_numpy_symmetric_then_valid():
    x = _x((1, 6, 6, 2))
    m = layers.Conv(3, 3, strides=2, padding="SYMMETRIC")
    v = m.init(jax.random.key(0), x)
    ref = layers.Conv(3, 3, strides=2, padding="VALID").apply(
        v, np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="symmetric")
    )
    chex.assert_trees_all_close(np.asarray(m.apply(v, x)), np.asarray(ref), atol=1e-6)
    assert m.apply(v, x).shape == (1, 3, 3, 3)


TRANSPOSE_CASES = [
    # ndim, cin, cout, kernel, stride, padding, output_padding, groups, dilation
    (3, 4, 6, 2, 2, 0, 0, 1, 1),  # the patch fast path
    (3, 8, 4, 4, 2, 1, 0, 4, 1),  # SkipDenseNet3D's grouped, padded up-block
    (3, 6, 3, 6, 4, 1, 0, 3, 1),
    (2, 3, 5, 3, 2, 1, 1, 1, 1),
    (2, 4, 2, 3, 1, 1, 0, 1, 2),
]


@pytest.mark.reference
@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_conv_transpose_matches_torch(case):
    torch = require_reference("torch")
    ndim, cin, cout, k, s, p, op, g, d = case
    tconv = (torch.nn.ConvTranspose2d if ndim == 2 else torch.nn.ConvTranspose3d)(
        cin, cout, k, stride=s, padding=p, output_padding=op, groups=g, dilation=d
    )
    x = _x((2,) + (5,) * ndim + (cin,), 1)
    m = layers.ConvTranspose(cout, k, strides=s, padding=p, output_padding=op, groups=g, dilation=d)
    v = _load(m, x, tconv, [("", "", "conv_transpose")])
    ty = _nhwc(tconv(_nchw(x)))
    y = np.asarray(m.apply(v, x))
    assert y.shape == ty.shape
    chex.assert_trees_all_close(y, ty, atol=2e-5)


OVERLAP_CASES = [
    # ndim, cin, cout, kernel, stride, padding, output_padding, groups, input size
    (3, 8, 4, 4, 2, 1, 0, 4, 3),  # SkipDenseNet3D's first up-block
    (3, 8, 4, 18, 16, 1, 0, 4, 2),  # ... and its last (stride 16)
    (3, 6, 3, 6, 4, 1, 0, 3, 3),
    (2, 3, 5, 3, 2, 1, 1, 1, 4),  # output_padding
    (2, 2, 3, 2, 3, 0, 2, 1, 3),  # kernel < stride, output_padding past the last tap
    (2, 3, 2, 5, 1, 2, 0, 1, 4),  # stride 1
]


@pytest.mark.reference
@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_cpu_overlap_add_conv_transpose_matches_torch_forward_and_gradients(case, monkeypatch):
    """On CPU a (dilation-1) transposed conv is a matrix product and an overlap-add, not XLA's
    input-dilated convolution: output and both gradients equal torch's."""
    torch = require_reference("torch")
    from medjax.nn import conv as mconv

    monkeypatch.setattr(mconv, "enabled", True)  # the suite runs with XLA's convolution
    ndim, cin, cout, k, s, p, op, g, n = case
    tconv = (torch.nn.ConvTranspose2d if ndim == 2 else torch.nn.ConvTranspose3d)(
        cin, cout, k, stride=s, padding=p, output_padding=op, groups=g, bias=False
    )
    x = _x((2,) + (n,) * ndim + (cin,), 1)
    m = layers.ConvTranspose(
        cout, k, strides=s, padding=p, output_padding=op, groups=g, use_bias=False
    )
    v = _load(m, x, tconv, [("", "", "conv_transpose")])
    tx = _nchw(x).requires_grad_(True)
    ty = tconv(tx)
    cot = _x(tuple(_nhwc(ty).shape), 2)
    (ty * _nchw(cot)).sum().backward()

    def f(v, x):
        return jnp.sum(m.apply(v, x) * cot)

    y = np.asarray(jax.jit(m.apply)(v, x))
    gv, gx = jax.jit(jax.grad(f, argnums=(0, 1)))(v, x)
    assert y.shape == _nhwc(ty).shape
    chex.assert_trees_all_close(y, _nhwc(ty), atol=2e-5)
    chex.assert_trees_all_close(np.asarray(gx), _nhwc(tx.grad), atol=1e-4)
    tgrad = np.moveaxis(tconv.weight.grad.numpy(), (0, 1), (-2, -1))  # (C, F/g, *K) -> (*K, C, F/g)
    chex.assert_trees_all_close(np.asarray(gv["params"]["kernel"]), tgrad, atol=1e-4)
    text = jax.jit(m.apply).lower(v, x).as_text()
    assert "lhs_dilate" not in text  # no input-dilated convolution left


def test_grouped_dilated_conv_transpose_cpu_kernel_equals_the_grouped_convolution(monkeypatch):
    """On CPU a grouped, dilated transposed conv runs as an ungrouped one with a block-diagonal
    kernel (XLA:CPU's grouped input-dilated convolution is about 1000x slower)."""
    from medjax.nn import conv as mconv

    monkeypatch.setattr(mconv, "enabled", True)
    x = _x((1, 3, 3, 3, 12), 2)
    m = layers.ConvTranspose(4, 3, strides=2, padding=1, groups=4, dilation=2, use_bias=False)
    v = m.init(jax.random.key(0), x)
    y = np.asarray(jax.jit(m.apply)(v, x))
    monkeypatch.setattr(mconv, "enabled", False)  # the grouped lax convolution
    ref = np.asarray(jax.jit(m.apply)(v, x))
    assert y.shape == (1, 7, 7, 7, 4)
    chex.assert_trees_all_close(y, ref, atol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("channelwise", [True, False])
def test_prelu_matches_torch(channelwise):
    torch = require_reference("torch")
    tp = torch.nn.PReLU(4 if channelwise else 1)
    with torch.no_grad():
        tp.weight.copy_(torch.linspace(-0.5, 0.5, tp.weight.numel()))
    x = _x((2, 3, 3, 4))
    m = layers.PReLU(channelwise=channelwise)
    v = _load(m, x, tp, [("", "", "prelu")])
    chex.assert_trees_all_close(np.asarray(m.apply(v, x)), _nhwc(tp(_nchw(x))), atol=1e-6)
    assert m.init(jax.random.key(0), x)["params"]["negative_slope"].ravel()[0] == 0.25


def test_channel_dropout_drops_whole_channels_and_keeps_the_mean():
    x = jnp.ones((64, 4, 4, 4, 8))
    m = layers.Dropout(0.5, channelwise=True)
    y = np.asarray(m.apply({}, x, train=True, rngs={"dropout": jax.random.key(1)}))
    per_channel = y.reshape(64, -1, 8)
    assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))  # constant over space
    assert set(np.unique(y)) <= {0.0, 2.0}
    assert abs(y.mean() - 1.0) < 0.1
    assert np.array_equal(np.asarray(m.apply({}, x, train=False)), np.asarray(x))
    e = np.asarray(
        layers.Dropout(0.5).apply({}, x, train=True, rngs={"dropout": jax.random.key(1)})
    )
    assert 0.4 < (e == 0).mean() < 0.6 and np.any(e.reshape(64, -1, 8).std(axis=1) > 0)


@pytest.mark.reference
@pytest.mark.parametrize("mode,align", [("nearest", False), ("linear", True), ("linear", False)])
@pytest.mark.parametrize("ndim", [2, 3])
def test_upsample_matches_torch_interpolate(mode, align, ndim):
    torch = require_reference("torch")
    x = _x((2,) + (4,) * ndim + (3,))
    scale = (2,) * ndim if mode == "nearest" else 2
    tmode = mode if mode == "nearest" else ("bilinear" if ndim == 2 else "trilinear")
    kw = {} if mode == "nearest" else {"align_corners": align}
    ref = torch.nn.functional.interpolate(_nchw(x), scale_factor=2, mode=tmode, **kw)
    y = layers.upsample(jnp.asarray(x), scale, mode=mode, align_corners=align)
    chex.assert_trees_all_close(np.asarray(y), _nhwc(ref), atol=1e-5)


@pytest.mark.reference
def test_pools_match_torch():
    torch = require_reference("torch")
    x = _x((2, 7, 7, 7, 3))
    ref = torch.nn.functional.max_pool3d(_nchw(x), 3, 2, 1)
    chex.assert_trees_all_close(np.asarray(layers.max_pool(x, 3, 2, 1)), _nhwc(ref), atol=1e-6)
    ref = torch.nn.functional.avg_pool3d(_nchw(x), 2)
    chex.assert_trees_all_close(np.asarray(layers.avg_pool(x, 2)), _nhwc(ref), atol=1e-6)


def test_conv_routes_through_the_cpu_lowering_for_torch_style_same_padding(monkeypatch):
    """padding=1 on a stride-1 3^3 conv is 'SAME', so medjax.nn.conv may lower it."""
    from medjax.nn import conv

    monkeypatch.setattr(conv, "enabled", True)  # the suite runs with XLA's convolution
    seen = []
    real = conv.choose
    monkeypatch.setattr(conv, "choose", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    x = jnp.ones((1, 8, 8, 8, 2))
    m = layers.Conv(2, 3, padding=1)
    m.apply(m.init(jax.random.key(0), x), x)
    assert seen and seen[-1] == ("shifted" if jax.default_backend() == "cpu" else "xla")


def test_bad_arguments_are_named():
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match="groups=2"):
        layers.Conv(4, 3, groups=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="kernel_size"):
        layers.Conv(4, (3, 3, 3)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="mode"):
        layers.upsample(x, 2, mode="cubic")
