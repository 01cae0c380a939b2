"""medjax.nn.conv: the CPU lowerings against lax, a NumPy loop, and flax's ConvTranspose."""

import contextlib
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax.nn import conv


@pytest.fixture(autouse=True)
def lowerings_on(monkeypatch):
    """The suite runs with XLA's convolution (MEDJAX_CPU_CONV=0, tests/conftest.py); these tests are
    about the lowerings, so they switch them on (a test that wants XLA's switches back)."""
    monkeypatch.setattr(conv, "enabled", True)


def _lax(x, w, strides, padding):
    return lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=conv._specs(x.ndim), precision="highest"
    )


def _ours(x, w, strides, padding):
    return conv.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=conv._specs(x.ndim), precision="highest"
    )


def _numpy_conv_same(x, w):
    """Direct loop: out[b, p, o] = sum_{offset, c} xpad[b, p + offset, c] * w[offset, c, o]."""
    n = x.ndim - 2
    k = w.shape[:n]
    pads = [(0, 0)] + [((kk - 1) // 2, kk // 2) for kk in k] + [(0, 0)]
    xp = np.pad(x, pads)
    out = np.zeros(x.shape[:-1] + (w.shape[-1],))
    for pos in itertools.product(*(range(s) for s in x.shape[1:-1])):
        for off in itertools.product(*(range(kk) for kk in k)):
            idx = (
                (slice(None),)
                + tuple(p + o for p, o in zip(pos, off, strict=True))
                + (slice(None),)
            )
            out[(slice(None),) + pos] += xp[idx] @ w[off]
    return out


def _data(shape, cin, cout, k, seed=0):
    rx, rw = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    x = rx.normal(size=shape + (cin,)).astype(np.float32)
    w = rw.normal(size=k + (cin, cout)).astype(np.float32) * 0.3
    return x, w


_CL = conv._specs(5)  # channels-last 3D
_DISPATCH = [
    # (lhs shape, rhs shape, strides, padding, extra keywords, expected lowering)
    ((2, 32, 32, 32, 4), (3, 3, 3, 4, 4), (1, 1, 1), "SAME", {}, "shifted"),
    # 5^3 kernels (125 offsets) stay on XLA: the unrolled products compile too slowly
    # strided, not patch: XLA's forward, the input gradient by phase decomposition
    ((2, 32, 32, 32, 4), (3, 3, 3, 4, 8), (2, 2, 2), "SAME", {}, "strided"),
    ((2, 32, 32, 32, 4), (7, 7, 7, 4, 8), (2, 2, 2), [(3, 3)] * 3, {}, "strided"),
    ((2, 16, 16, 16, 4), (5, 5, 5, 4, 4), (1, 1, 1), "SAME", {}, "xla"),
    ((2, 32, 32, 32, 64), (3, 3, 3, 64, 64), (1, 1, 1), "SAME", {}, "xla"),
    ((2, 32, 32, 32, 4), (2, 2, 2, 4, 8), (2, 2, 2), "SAME", {}, "patch"),
    ((2, 32, 32, 32, 4), (2, 2, 2, 4, 8), (2, 2, 2), "VALID", {}, "patch"),
    # GPU/TPU, grouped, dilated, channels-first or even kernels keep the library convolution.
    ((2, 32, 32, 32, 4), (3, 3, 3, 4, 4), (1, 1, 1), "SAME", {"backend": "gpu"}, "xla"),
    ((2, 32, 32, 32, 4), (3, 3, 3, 2, 4), (1, 1, 1), "SAME", {"feature_group_count": 2}, "xla"),
    # dilated, stride 1: space to batch when every dilated axis is long enough
    (
        (2, 32, 32, 32, 4),
        (3, 3, 3, 4, 4),
        (1, 1, 1),
        "SAME",
        {"rhs_dilation": (2, 2, 2)},
        "dilated",
    ),
    (
        (1, 4, 16, 16, 64),
        (3, 3, 3, 64, 32),
        (1, 1, 1),
        "SAME",
        {"rhs_dilation": (1, 3, 3)},
        "dilated",
    ),
    ((1, 4, 16, 16, 64), (3, 3, 3, 64, 32), (1, 1, 1), "SAME", {"rhs_dilation": (1, 6, 6)}, "xla"),
    ((2, 32, 32, 32, 4), (3, 3, 3, 4, 4), (2, 2, 2), "SAME", {"rhs_dilation": (2, 2, 2)}, "xla"),
    (
        (2, 4, 32, 32, 32),
        (4, 4, 3, 3, 3),
        (1, 1, 1),
        "SAME",
        {"dimension_numbers": ("NCDHW", "OIDHW", "NCDHW")},
        "xla",
    ),
    ((2, 32, 32, 32, 4), (2, 2, 2, 4, 4), (1, 1, 1), "SAME", {}, "xla"),
    # 1^d kernels are a plain matrix product.
    ((2, 32, 32, 32, 4), (1, 1, 1, 4, 3), (1, 1, 1), "SAME", {}, "patch"),
    # SAME with a size not divisible by the stride pads: not a pure patch convolution, so the
    # strided lowering (XLA's forward, phase-decomposed input gradient).
    ((2, 33, 32, 32, 4), (2, 2, 2, 4, 8), (2, 2, 2), "SAME", {}, "strided"),
]


@pytest.mark.parametrize("lhs,rhs,strides,padding,extra,expected", _DISPATCH)
def test_choose_dispatch(lhs, rhs, strides, padding, extra, expected):
    kw = {"dimension_numbers": _CL, "backend": "cpu", **extra}
    assert conv.choose(lhs, rhs, strides, padding, **kw) == expected


@pytest.mark.parametrize(
    "shape,cin,cout,k",
    [
        ((2, 6, 5, 4), 3, 2, (3, 3, 3)),
        ((1, 7, 6), 2, 3, (3, 5)),
        ((2, 9), 4, 4, (5,)),
        ((1, 4, 4, 4), 1, 1, (3, 1, 3)),
    ],
)
def test_shifted_matches_numpy_loop_and_lax(shape, cin, cout, k):
    x, w = _data(shape, cin, cout, k)
    ref = _numpy_conv_same(x.astype(np.float64), w.astype(np.float64))
    ours = np.asarray(conv._shifted_conv(jnp.asarray(x), jnp.asarray(w), "highest"))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ours, np.asarray(_lax(x, w, (1,) * len(k), "SAME")), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "shape,k,padding",
    [
        ((2, 8, 6, 4), (2, 2, 2), "SAME"),
        ((1, 9, 6, 4), (2, 3, 2), "VALID"),
        ((2, 12, 10), (4, 2), "VALID"),
    ],
)
def test_patch_matches_lax(shape, k, padding):
    x, w = _data(shape, 3, 5, k)
    ours = _ours(x, w, k, padding)
    if jax.default_backend() == "cpu":
        assert (
            conv.choose(x.shape, w.shape, k, padding, dimension_numbers=conv._specs(x.ndim))
            == "patch"
        )
    np.testing.assert_allclose(
        np.asarray(ours), np.asarray(_lax(x, w, k, padding)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "strides,k,cin,cout", [((1, 1, 1), (3, 3, 3), 4, 4), ((2, 2, 2), (2, 2, 2), 4, 8)]
)
def test_gradients_match_lax(strides, k, cin, cout):
    x, w = _data((2, 8, 8, 8), cin, cout, k, seed=3)
    g = np.random.default_rng(9).normal(size=(2,) + tuple(8 // s for s in strides) + (cout,))

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, strides, "SAME") * g)

    gx, gw = jax.grad(loss(_ours), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(_lax), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-4, atol=1e-4)


def test_gradient_finite_difference():
    x, w = _data((1, 5, 4, 3), 2, 2, (3, 3, 3), seed=5)
    x, w = x.astype(np.float64), w.astype(np.float64)
    with jax.enable_x64():

        def f(w):
            return jnp.sum(jnp.sin(conv._shifted_conv(jnp.asarray(x), w, "highest")))

        g = np.asarray(jax.grad(f)(jnp.asarray(w)))
        rng = np.random.default_rng(0)
        for _ in range(5):
            idx = tuple(int(rng.integers(s)) for s in w.shape)
            e = np.zeros_like(w)
            e[idx] = 1e-6
            fd = (float(f(jnp.asarray(w + e))) - float(f(jnp.asarray(w - e)))) / 2e-6
            assert abs(fd - g[idx]) < 1e-6 * max(1.0, abs(fd)) + 1e-7


def test_flax_conv_hook_matches_default():
    x, _ = _data((2, 8, 8, 8), 4, 4, (3, 3, 3))
    plain = nn.Conv(4, (3, 3, 3), padding="SAME", precision="highest")
    fast = nn.Conv(
        4,
        (3, 3, 3),
        padding="SAME",
        precision="highest",
        conv_general_dilated=conv.conv_general_dilated,
    )
    params = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(
        np.asarray(fast.apply(params, x)), np.asarray(plain.apply(params, x)), rtol=1e-5, atol=1e-5
    )


def test_a_network_with_the_lowerings_equals_it_with_xla(monkeypatch):
    """A small encoder-decoder of medjax layers (stride-1 3^3, stride-2 3^3, 2^3 patch and 1^3
    convolutions, a 2^3 transposed patch convolution) gives XLA's outputs and parameter gradients
    with every lowering in use."""
    from medjax.nn import layers

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.relu(layers.Conv(4, 3)(x))  # shifted
            b = nn.relu(layers.Conv(6, 3, strides=2)(a))  # strided
            c = nn.relu(layers.Conv(6, 2, strides=2, padding=0)(b))  # patch
            u = layers.ConvTranspose(4, 2, strides=2, padding=0)(c)  # transposed patch
            up = layers.upsample(u, 2)  # nearest
            return layers.Conv(3, 1)(jnp.concatenate([a, up], -1))  # 1^3: a matrix product

    x, _ = _data((2, 8, 8, 8), 2, 1, (1, 1, 1))
    model = Net()
    params = model.init(jax.random.key(0), x)

    def loss(p):
        return jnp.mean(jnp.sin(model.apply(p, x)))

    def run():
        return jax.jit(lambda p: (model.apply(p, x), jax.grad(loss)(p)))(params)

    kinds = []
    real = conv.choose
    monkeypatch.setattr(conv, "choose", lambda *a, **k: kinds.append(real(*a, **k)) or kinds[-1])
    fast = run()
    assert {"shifted", "strided", "patch"} <= set(kinds), kinds
    monkeypatch.setattr(conv, "enabled", False)
    ref = run()
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "shape,k", [((2, 3, 4, 2), (2, 2, 2)), ((1, 3, 5), (3, 2)), ((2, 4), (2,))]
)
def test_conv_transpose_patch_matches_flax(shape, k):
    x, _ = _data(shape, 3, 5, k)
    layer = nn.ConvTranspose(5, k, strides=k, padding="VALID", use_bias=False, precision="highest")
    params = layer.init(jax.random.key(1), x)
    ref = layer.apply(params, x)
    ours = conv.conv_transpose_patch(
        jnp.asarray(x), params["params"]["kernel"], precision="highest"
    )
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_up_conv_act_same_params_and_output_as_flax_conv_transpose():
    """UpConvAct's params (names, shapes, initial values) and output equal nn.ConvTranspose's."""
    from medjax.nn.blocks import UpConvAct

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.ConvTranspose(
                6, (2, 2, 2), strides=(2, 2, 2), padding="VALID", precision="highest"
            )(x)
            return nn.relu(y)

    x = jnp.asarray(_data((2, 3, 4, 5), 3, 1, (1,))[0])
    ours_params = UpConvAct(6).init(jax.random.key(4), x)
    ref_params = Reference().init(jax.random.key(4), x)
    jax.tree.map(np.testing.assert_array_equal, ours_params, ref_params)
    params = jax.tree.map(lambda p: p + 0.1, ref_params)  # non-zero bias too
    np.testing.assert_allclose(
        np.asarray(UpConvAct(6).apply(params, x)),
        np.asarray(Reference().apply(params, x)),
        rtol=1e-5,
        atol=1e-5,
    )


STRIDED = [
    # spatial, C_in, C_out, kernel, stride, padding
    ((9, 10, 8), 3, 4, (3, 3, 3), (2, 2, 2), "SAME"),
    ((11, 9, 10), 2, 3, (3, 3, 3), (2, 3, 2), [(1, 1), (0, 2), (1, 0)]),
    ((12, 12, 12), 2, 5, (7, 7, 7), (2, 2, 2), [(3, 3)] * 3),
    ((9, 9, 9), 3, 2, (2, 2, 2), (3, 3, 3), "VALID"),  # kernel shorter than the stride
    ((10, 12), 3, 4, (3, 3), (2, 2), "SAME"),  # 2D
]


@pytest.mark.parametrize("case", STRIDED)
def test_strided_input_gradient_by_phases_matches_lax(case):
    spatial, cin, cout, k, s, pad = case
    x, w = _data(spatial, cin, cout, k, seed=3)
    x = np.stack([x, 0.5 * x[::-1]])  # batch 2
    ours = lambda x, w: (_ours(x, w, s, pad) ** 2).sum()
    ref = lambda x, w: (_lax(x, w, s, pad) ** 2).sum()
    assert conv.choose(x.shape, w.shape, s, pad, dimension_numbers=conv._specs(x.ndim)) == "strided"
    np.testing.assert_allclose(_ours(x, w, s, pad), _lax(x, w, s, pad), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def test_strided_input_gradient_finite_differences():
    """Finite differences of the phase-decomposed input gradient (float32, loose tolerance)."""
    from jax.test_util import check_grads

    x, w = _data((7, 6, 5), 2, 3, (3, 3, 3), seed=5)
    x = x[None]
    f = lambda x: _ours(x, w, (2, 2, 2), "SAME")
    check_grads(f, (x,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)


# (spatial, C_in, C_out, kernel, strides, dilation, padding): 2D and 3D, strided, dilated, odd
# sizes, explicit padding; channel products above the shifted-product limit (the "xla" lowering)
# and one strided case (the "strided" lowering's weight gradient).
CANONICAL_CASES = [
    ((9, 8), 12, 16, (3, 3), (1, 1), (1, 1), "SAME"),
    ((9, 8), 12, 16, (3, 3), (1, 1), (2, 2), "SAME"),
    ((9, 10), 12, 16, (5, 5), (1, 1), (1, 1), ((2, 1), (0, 2))),
    ((9, 8), 12, 16, (3, 3), (2, 2), (1, 1), "SAME"),
    ((7, 6, 5), 8, 12, (3, 3, 3), (1, 1, 1), (1, 1, 1), "SAME"),
    ((8, 8, 6), 4, 8, (3, 3, 3), (2, 2, 2), (1, 1, 1), "SAME"),
]


@pytest.mark.parametrize("case", CANONICAL_CASES)
def test_canonical_gradients_match_lax(case):
    """Inside canonical_gradients(): the same convolution and gradients as lax's."""
    spatial, cin, cout, k, strides, dil, padding = case
    x, w = _data((2, *spatial), cin, cout, k, seed=11)

    def loss(f):
        def fn(x, w):
            y = f(x, w, strides, padding, rhs_dilation=dil, dimension_numbers=conv._specs(x.ndim))
            return jnp.sum(jnp.sin(y))

        return fn

    ref = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w)
    with conv.canonical_gradients():
        ours = jax.grad(loss(conv.conv_general_dilated), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def _loop_dim_labels(context):
    """Convolution dim_labels of a compiled fori_loop whose body takes a convolution's gradient."""
    x, w = _data((4, 16, 16), 32, 32, (3, 3), seed=2)  # the "xla" lowering

    def body(i, w):
        return w - 0.01 * jax.grad(
            lambda w: jnp.sum(
                conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=conv._specs(4))
                ** 2
            )
        )(w)

    with context():
        lowered = jax.jit(lambda w: lax.fori_loop(0, 2, body, w)).lower(w)
    text = lowered.compile().as_text()
    return set(re.findall(r"dim_labels=([a-z0-9_]+->[a-z0-9]+)", text))


def test_canonical_gradients_inside_a_loop_use_the_forward_layout():
    """XLA:CPU rewrites gradient convolutions into its Eigen layout only in the entry computation;
    inside canonical_gradients() a loop body's gradient convolutions are already in that layout."""
    if jax.default_backend() != "cpu":
        pytest.skip("the rewrite is CPU-only")
    assert _loop_dim_labels(conv.canonical_gradients) == {"b01f_01io->b01f"}
    assert _loop_dim_labels(contextlib.nullcontext) != {"b01f_01io->b01f"}  # what it fixes


_DILATED = [
    # (input shape without channels, cin, cout, kernel, dilation, padding)
    ((1, 12, 12, 12), 3, 4, (3, 3, 3), (2, 2, 2), "SAME"),
    ((2, 5, 13, 14), 2, 3, (3, 3, 3), (1, 3, 3), "SAME"),  # FocusNetV2's in-plane dilation
    ((1, 11, 9, 10), 2, 2, (3, 3, 3), (2, 1, 2), [(1, 3), (0, 0), (2, 2)]),  # uneven padding
    ((2, 17, 15), 3, 2, (5, 3), (2, 3), "VALID"),
    ((1, 16, 16, 16), 4, 4, (3, 3, 3), (4, 4, 4), "SAME"),  # HighResNet3D's widest
]


@pytest.mark.parametrize("shape,cin,cout,k,dilation,padding", _DILATED)
def test_dilated_space_to_batch_matches_lax_with_gradients(shape, cin, cout, k, dilation, padding):
    x, w = _data(shape, cin, cout, k, seed=7)
    n = len(k)
    kw = {"dimension_numbers": conv._specs(x.ndim), "precision": "highest"}
    spec = kw["dimension_numbers"]
    how = conv.choose(
        x.shape, w.shape, (1,) * n, padding, rhs_dilation=dilation, dimension_numbers=spec
    )
    assert how == "dilated"

    def ours(x, w):
        return conv.conv_general_dilated(x, w, (1,) * n, padding, rhs_dilation=dilation, **kw)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (1,) * n, padding, rhs_dilation=dilation, **kw)

    y, y_ref = jax.jit(ours)(x, w), ref(x, w)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-4, rtol=1e-5)
    cot = np.random.default_rng(8).normal(size=y.shape).astype(np.float32)
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * cot), argnums=(0, 1)))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(x, w)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3, rtol=1e-4)
    text = jax.jit(ours).lower(x, w).as_text()
    dilations = re.findall(r"rhs_dilate = \[([0-9, ]+)\]", text)
    assert dilations and all(set(d.split(", ")) == {"1"} for d in dilations)  # none dilated left


def test_canonical_gradients_under_vmap_match_lax():
    """Per-example weights under vmap make grouped convolutions; the forward-form gradients that
    canonical_gradients gives (FocusNetV2's SOS branches use it) equal lax's."""
    x, w = _data((3, 6, 6, 5), 16, 20, (3, 3, 3), seed=11)  # 3 "organs", each its own weights
    w = np.stack([w, 0.5 * w, -w])

    def f(x, w):
        y = conv.conv_general_dilated(x[None], w, (1, 1, 1), "SAME", dimension_numbers=_CL)
        return jnp.sum(jnp.sin(y))

    def grads(canonical):
        ctx = conv.canonical_gradients() if canonical else contextlib.nullcontext()
        with ctx:
            return jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1))))(x, w)

    with_canonical, plain = grads(True), grads(False)
    how = conv.choose((1, 6, 6, 5, 16), w.shape[1:], (1, 1, 1), "SAME", dimension_numbers=_CL)
    assert how == "xla"  # 16 x 20 channels: XLA's convolution, so the canonical gradients apply
    for a, b in zip(with_canonical, plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)
