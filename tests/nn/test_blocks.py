"""The shared blocks (conv-norm-act, residual, SE, dense, DenseASPP) against torch re-creations,
in 2D and 3D, in training (batch statistics) and evaluation; chex.variants runs them with and without jit."""

import functools

import chex
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import nn as mnn
from medjax.models.torch_import import convert
from tests.conftest import require_reference


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _nchw(x):
    torch = require_reference("torch")
    return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _randomise_bn(tmod, seed=0):
    """Non-trivial affine and running statistics on every BatchNorm of ``tmod``."""
    torch = require_reference("torch")
    g = torch.Generator().manual_seed(seed)
    for m in tmod.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=g))


def _compare(module, tmod, spec, x, *, atol=3e-5, variant=None):
    """Outputs of ``module`` (weights imported from ``tmod``) equal torch's, in eval and train."""
    _randomise_bn(tmod)
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    v = convert(tmod.state_dict(), spec, template, name=type(module).__name__)
    apply = variant(functools.partial(module.apply, train=False)) if variant else None
    tmod.eval()
    y = apply(v, x) if apply else module.apply(v, x, train=False)
    chex.assert_trees_all_close(np.asarray(y), _nhwc(tmod(_nchw(x))), atol=atol, rtol=1e-4)
    tmod.train()
    ty = _nhwc(tmod(_nchw(x)))
    y, upd = module.apply(v, x, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(np.asarray(y), ty, atol=atol, rtol=1e-4)
    return v, upd


def _torch():
    return require_reference("torch")


class _TConvNormAct:
    """torch conv-BN-act (post) or BN-act-conv (pre)."""

    @staticmethod
    def build(ndim, cin, cout, order, prelu):
        t = _torch().nn
        conv = (t.Conv2d if ndim == 2 else t.Conv3d)(cin, cout, 3, padding=1, bias=False)
        bn = (t.BatchNorm2d if ndim == 2 else t.BatchNorm3d)(cout if order == "post" else cin)
        act = t.PReLU(cout if order == "post" else cin) if prelu else t.ReLU()
        mods = [conv, bn, act] if order == "post" else [bn, act, conv]
        return t.Sequential(*mods)


@pytest.mark.reference
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", ["post", "pre"])
@pytest.mark.parametrize("prelu", [False, True])
def test_conv_norm_act_matches_torch(ndim, order, prelu):
    tmod = _TConvNormAct.build(ndim, 3, 4, order, prelu)
    act = mnn.PReLU if prelu else fnn.relu
    m = mnn.ConvNormAct(4, 3, norm="batch", act=act, order=order)
    i = {"post": (0, 1, 2), "pre": (2, 0, 1)}[order]
    spec = [("conv", str(i[0]), "conv"), ("norm", str(i[1]), "batch_norm")]
    if prelu:
        spec.append(("act", str(i[2]), "prelu"))
    x = _x((2,) + (6,) * ndim + (3,))
    v, upd = _compare(m, tmod, spec, x)
    # Running statistics after one training step equal torch's (unbiased running variance).
    bn = tmod[i[1]]
    chex.assert_trees_all_close(
        np.asarray(upd["batch_stats"]["norm"]["var"]), bn.running_var.detach().numpy(), rtol=1e-4
    )


def _torch_residual(ndim, cin, cout, stride, preact, se, shortcut):
    t = _torch().nn
    Conv = t.Conv2d if ndim == 2 else t.Conv3d
    BN = t.BatchNorm2d if ndim == 2 else t.BatchNorm3d
    pool = lambda z: z.mean(dim=tuple(range(2, z.ndim)), keepdim=True)

    class SE(t.Module):
        def __init__(self, c, r):
            super().__init__()
            self.fc1, self.fc2 = Conv(c, c // r, 1), Conv(c // r, c, 1)

        def forward(self, z):
            return z * _torch().sigmoid(self.fc2(_torch().relu(self.fc1(pool(z)))))

    class Block(t.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = Conv(cin, cout, 3, stride, 1, bias=False)
            self.norm1 = BN(cin if preact else cout)
            self.conv2 = Conv(cout, cout, 3, 1, 1, bias=False)
            self.norm2 = BN(cout)
            self.se = SE(cout, se) if se else None
            self.proj = shortcut == "projection"
            if self.proj:
                self.shortcut_conv = Conv(cin, cout, 1, stride, bias=False)
                self.shortcut_norm = BN(cin if preact else cout)

        def forward(self, z):
            relu = _torch().relu
            if preact:
                y = self.conv1(relu(self.norm1(z)))
                y = self.conv2(relu(self.norm2(y)))
            else:
                y = relu(self.norm1(self.conv1(z)))
                y = self.norm2(self.conv2(y))
            if self.se is not None:
                y = self.se(y)
            if self.proj:
                s = (
                    self.shortcut_conv(relu(self.shortcut_norm(z)))
                    if preact
                    else self.shortcut_norm(self.shortcut_conv(z))
                )
            elif shortcut == "pad":
                s = z[(slice(None), slice(None)) + (slice(None, None, stride),) * ndim]
                lo = (cout - cin) // 2
                s = _torch().nn.functional.pad(s, (0, 0) * ndim + (lo, cout - cin - lo))
            else:
                s = z
            return y + s if preact else relu(y + s)

    return Block()


RESIDUAL_CASES = [
    # ndim, cin, cout, stride, preact, se, shortcut
    (3, 4, 8, 2, False, None, "projection"),  # ResNet BasicBlock
    (3, 4, 8, 1, True, 2, "projection"),  # FocusNetV2's SEBasicBlock
    (2, 4, 8, 1, False, None, "pad"),  # PnP-AdaNet's widening block
    (2, 6, 6, 1, True, None, "identity"),
]


@pytest.mark.reference
@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_residual_block_matches_torch(case):
    ndim, cin, cout, stride, preact, se, shortcut = case
    tmod = _torch_residual(ndim, cin, cout, stride, preact, se, shortcut)
    m = mnn.ResidualBlock(cout, strides=stride, preact=preact, se_reduction=se, shortcut=shortcut)
    spec = [
        ("conv1", "conv1", "conv"),
        ("norm1", "norm1", "batch_norm"),
        ("conv2", "conv2", "conv"),
        ("norm2", "norm2", "batch_norm"),
    ]
    if se:
        spec += [("se/fc1", "se.fc1", "linear"), ("se/fc2", "se.fc2", "linear")]
    if shortcut == "projection":
        spec += [
            ("shortcut_conv", "shortcut_conv", "conv"),
            ("shortcut_norm", "shortcut_norm", "batch_norm"),
        ]
    _compare(m, tmod, spec, _x((2,) + (8,) * ndim + (cin,)))


def _torch_dense_layer(ndim, cin, growth, bottleneck):
    t = _torch().nn
    Conv = t.Conv2d if ndim == 2 else t.Conv3d
    BN = t.BatchNorm2d if ndim == 2 else t.BatchNorm3d

    class Layer(t.Module):
        def __init__(self):
            super().__init__()
            c = cin
            if bottleneck:
                self.b_norm, self.b_conv = BN(cin), Conv(cin, bottleneck, 1, bias=False)
                c = bottleneck
            self.norm, self.conv = BN(c), Conv(c, growth, 3, padding=1, bias=False)

        def forward(self, z):
            relu = _torch().relu
            y = self.b_conv(relu(self.b_norm(z))) if bottleneck else z
            return _torch().cat([z, self.conv(relu(self.norm(y)))], 1)

    return Layer()


@pytest.mark.reference
@pytest.mark.parametrize("ndim,bottleneck", [(3, None), (2, 8), (3, 8)])
def test_dense_layer_matches_torch(ndim, bottleneck):
    tmod = _torch_dense_layer(ndim, 5, 3, bottleneck)
    m = mnn.DenseLayer(3, bottleneck=bottleneck)
    spec = [("layer/norm", "norm", "batch_norm"), ("layer/conv", "conv", "conv")]
    if bottleneck:
        spec += [("bottleneck/norm", "b_norm", "batch_norm"), ("bottleneck/conv", "b_conv", "conv")]
    _compare(m, tmod, spec, _x((2,) + (5,) * ndim + (5,)))


def _torch_aspp(cin, dilations, mid, growth):
    t = _torch().nn

    class Branch(t.Module):
        def __init__(self, c, d):
            super().__init__()
            self.n1, self.c1 = t.BatchNorm3d(c), t.Conv3d(c, mid, 1)
            self.n2 = t.BatchNorm3d(mid)
            self.c2 = t.Conv3d(mid, growth, 3, padding=(1, d, d), dilation=(1, d, d))

        def forward(self, z):
            relu = _torch().relu
            return self.c2(relu(self.n2(self.c1(relu(self.n1(z))))))

    class ASPP(t.Module):
        def __init__(self):
            super().__init__()
            self.branches = t.ModuleList(
                [Branch(cin + k * growth, d) for k, d in enumerate(dilations)]
            )

        def forward(self, z):
            for b in self.branches:
                z = _torch().cat([b(z), z], 1)
            return z

    return ASPP()


@pytest.mark.reference
class TestDenseASPP(chex.TestCase):
    """DenseASPP against torch, applied with and without jit (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_torch_new_features_first(self):
        dil = (1, 2)
        tmod = _torch_aspp(4, dil, 6, 3)
        m = mnn.DenseASPP(dil, mid_features=6, growth=3)
        spec = []
        for k in range(len(dil)):
            b = f"branches.{k}"
            spec += [
                (f"branch_{k}/reduce/norm", f"{b}.n1", "batch_norm"),
                (f"branch_{k}/reduce/conv", f"{b}.c1", "conv"),
                (f"branch_{k}/conv/norm", f"{b}.n2", "batch_norm"),
                (f"branch_{k}/conv/conv", f"{b}.c2", "conv"),
            ]
        _compare(m, tmod, spec, _x((2, 4, 7, 7, 4)), variant=self.variant)


def test_squeeze_excitation_closed_form():
    """With zero weights the gate is sigmoid(0) = 0.5 everywhere."""
    x = jnp.asarray(_x((2, 4, 4, 4, 8)))
    se = mnn.SqueezeExcitation(2)
    v = se.init(jax.random.key(0), x)
    v = jax.tree.map(jnp.zeros_like, v)
    chex.assert_trees_all_close(se.apply(v, x), 0.5 * x)


def test_transition_shapes_and_pools():
    x = jnp.asarray(_x((1, 8, 8, 8, 6)))
    for pool, shape in (
        ("avg", (1, 4, 4, 4, 3)),
        ("max", (1, 4, 4, 4, 3)),
        (None, (1, 8, 8, 8, 3)),
    ):
        m = mnn.Transition(3, pool=pool)
        assert m.apply(m.init(jax.random.key(0), x), x).shape == shape


def test_blocks_refuse_bad_settings():
    x = jnp.ones((1, 4, 4, 4))
    with pytest.raises(ValueError, match="order"):
        mnn.ConvNormAct(4, order="middle").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="identity"):
        mnn.ResidualBlock(8, shortcut="identity").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="features"):
        mnn.pad_channels(x, 2)
