"""MedicalZoo's DenseNets (DENSENET1/2/3) against a torch re-creation of ``Densenet3D.py``.

The re-creation keeps the original's module names (so its ``state_dict`` has the real keys) and
its never-called submodules (the streams' classifiers, ``early_conv_2``), but computes the channel
counts the original hard-codes, so it also runs the counts the original cannot. Dropout: eval
mode runs the factory's rates (off in eval); train mode sets every rate to 0 on both sides.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import densenet3d as dn
from medjax.nn.blocks import rbg_key
from tests.models import _zoo_parity as zp

GROWTHS = (25, 25, 25, 50, 50, 50, 75, 75, 75)
EARLY = (25, 25, 50, 50, 50, 75, 75, 75)


def _torch_classes():
    torch = zp.torch()
    torch.manual_seed(0)  # the re-creations' weights are torch's default init
    nn, F = torch.nn, torch.nn.functional

    class HyperDenseLayer(nn.Sequential):
        def __init__(self, cin, growth, drop_rate):
            super().__init__()
            self.add_module("norm1", nn.BatchNorm3d(cin))
            self.add_module("relu1", nn.ReLU())
            self.add_module("conv1", nn.Conv3d(cin, growth, 3, padding=1, bias=False))
            self.drop_rate = drop_rate

        def forward(self, x):
            new = F.dropout(super().forward(x), p=self.drop_rate, training=self.training)
            return torch.cat([x, new], 1)

    def conv1(cin, cout):
        return nn.Conv3d(cin, cout, 1, bias=False)

    class SinglePath(nn.Module):
        def __init__(self, cin, classes, drop_rate, return_logits=True, early_fusion=False):
            super().__init__()
            self.return_logits = return_logits
            block, c = nn.Sequential(), cin
            for i, g in enumerate(EARLY if early_fusion else GROWTHS):
                block.add_module(f"denselayer{i + 1}", HyperDenseLayer(c, g, drop_rate))
                c += g
            self.features = nn.Sequential()
            self.features.add_module("denseblock1", block)
            for i, (a, b) in enumerate(((c, 400), (400, 200), (200, 150)), start=1):
                self.features.add_module(f"conv1x1_{i}", conv1(a, b))
                self.features.add_module(f"drop_{i}", nn.Dropout(0.5))
            self.classifier = nn.Sequential()
            self.classifier.add_module("classifier", conv1(150, classes))

        def forward(self, x):
            f = self.features(x)
            return self.classifier(f) if self.return_logits else f

    class DualPath(nn.Module):
        def __init__(self, cin, classes, drop_rate=0.0):
            super().__init__()
            self.n = cin
            for c in range(1, cin + 1):
                stream = SinglePath(
                    1, classes, drop_rate, return_logits=False, early_fusion=cin == 2
                )
                setattr(self, f"stream_{c}", stream)
            self.classifier = nn.Sequential()
            self.classifier.add_module("classifier", conv1(150 * cin, classes))

        def forward(self, x):
            feats = [getattr(self, f"stream_{c + 1}")(x[:, c : c + 1]) for c in range(self.n)]
            return self.classifier(torch.cat(feats, 1))

    class DualSingle(nn.Module):
        def __init__(self, cin, classes, drop_rate):
            super().__init__()
            self.n = cin
            early_rate = drop_rate if cin == 2 else 0.0
            for c in range(1, cin + 1):
                setattr(self, f"early_conv_{c}", HyperDenseLayer(1, 25, early_rate))
            self.stream_1 = SinglePath(26 * cin, classes, drop_rate, early_fusion=True)
            if cin == 2:
                self.classifier = nn.Sequential()

        def forward(self, x):
            if self.n == 2:  # the original feeds both modalities to early_conv_1
                ys = [self.early_conv_1(x[:, c : c + 1]) for c in range(2)]
            else:
                ys = [getattr(self, f"early_conv_{c + 1}")(x[:, c : c + 1]) for c in range(self.n)]
            return self.stream_1(torch.cat(ys, 1))

    return SinglePath, DualPath, DualSingle


# network, in_channels, original's parameter count, of which never called
CASES = [
    ("SinglePathDenseNet", 2, 2_697_811, 0),
    ("DualPathDenseNet", 3, 8_057_529, 1_800),
    ("DualSingleDenseNet", 2, 2_995_086, 677),
    ("DualSingleDenseNet", 3, 3_304_929, 0),
]


def _pair(network, cin, classes=4):
    single, dual, dual_single = _torch_classes()
    if network == "SinglePathDenseNet":
        return dn.SinglePathDenseNet(cin, classes), single(cin, classes, 0.1)
    if network == "DualPathDenseNet":
        return dn.DualPathDenseNet(cin, classes), dual(cin, classes)
    return dn.DualSingleDenseNet(cin, classes), dual_single(cin, classes, 0.1)


@pytest.mark.reference
@pytest.mark.parametrize("network, cin, count, dead", CASES)
def test_matches_torch_eval_and_train(network, cin, count, dead):
    model, tmod = _pair(network, cin)
    assert zp.torch_param_count(tmod) == count
    assert zp.param_count(model, (1, 1, 1, 1, cin)) == count - dead
    load = functools.partial(dn.load_torch_state_dict, network=network)
    zp.check_parity(
        model,
        model.clone(drop_rate=0.0, head_drop_rate=0.0),
        tmod,
        load,
        zp.x_input((2, 4, 4, 4, cin)),
        check_stats=network == "SinglePathDenseNet",
    )


@pytest.mark.reference
def test_channel_counts_the_original_cannot_run():
    """SinglePath with 3 channels (the original expects 451 and gets 453): eval parity."""
    single, _, _ = _torch_classes()
    tmod = zp.randomise(single(3, 2, 0.1)).eval()
    v = dn.load_torch_state_dict(tmod.state_dict())  # network, in_channels, classes inferred
    x = jnp.asarray(zp.x_input((1, 3, 3, 3, 3)))
    want = zp.from_torch(tmod(zp.to_torch(np.asarray(x))))
    got = zp.compile_fast(dn.SinglePathDenseNet(3, 2).apply, v, x)(v, x)
    zp.close(got, want, 1e-4)


def test_parameter_counts_of_generalised_counts():
    assert zp.param_count(dn.SinglePathDenseNet(), (1, 1, 1, 1, 2)) == 2_697_811
    # DualPath with 2 modalities: two 8-layer streams and a 300 -> 4 classifier.
    assert zp.param_count(dn.DualPathDenseNet(2), (1, 1, 1, 1, 2)) == 4_774_582
    assert zp.param_count(dn.DualPathDenseNet(3, fusion="sum"), (1, 1, 1, 1, 3)) == 8_054_529


@pytest.mark.reference
def test_dropout_runs_in_training_only():
    single, _, _ = _torch_classes()
    v = dn.load_torch_state_dict(single(1, 2, 0.1).state_dict())
    model = dn.SinglePathDenseNet(1, 2)
    x = jnp.asarray(zp.x_input((1, 2, 2, 2, 1)))

    def run(key):
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]

    # "rbg" keys: XLA:CPU compiles threefry's random bits slowly
    keys = rbg_key(1), rbg_key(2)
    run = zp.compile_fast(run, keys[0])
    assert not np.allclose(run(keys[0]), run(keys[1]))
    np.testing.assert_array_equal(run(keys[0]), run(keys[0]))


def _trace(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize(
    "model, shape, match",
    [
        (dn.DualPathDenseNet(1), (1, 2, 2, 2, 1), "at least 2 modalities"),
        (dn.DualSingleDenseNet(1), (1, 2, 2, 2, 1), "at least 2 modalities"),
        (dn.DualPathDenseNet(3), (1, 2, 2, 2, 2), "in_channels=3"),
        (dn.SinglePathDenseNet(2), (1, 2, 2, 2, 3), "in_channels=2"),
        (dn.DualSingleDenseNet(2), (1, 2, 2, 2), r"\(B, D, H, W, C\)"),
        (dn.DualPathDenseNet(3, fusion="max"), (1, 2, 2, 2, 3), "fusion"),
    ],
)
def test_value_errors(model, shape, match):
    with pytest.raises(ValueError, match=match):
        _trace(model, shape)


@pytest.fixture(scope="module")
def dual_single_sd():
    _, _, dual_single = _torch_classes()
    return {k: v.numpy() for k, v in dual_single(2, 4, 0.1).state_dict().items()}


@pytest.mark.reference
def test_dead_keys_are_ignored_and_only_those(dual_single_sd):
    sd = dict(dual_single_sd)
    assert "early_conv_2.conv1.weight" in sd
    v = dn.load_torch_state_dict(sd)
    assert "early_conv_2" not in v["params"]
    # without the dead keys (e.g. a medjax export) it loads too
    dn.load_torch_state_dict({k: a for k, a in sd.items() if not k.startswith("early_conv_2.")})
    sd["early_conv_3.conv1.weight"] = sd["early_conv_2.conv1.weight"]
    with pytest.raises(ValueError, match="early_conv_3.conv1.weight"):
        dn.load_torch_state_dict(sd)


@pytest.mark.reference
def test_mismatched_checkpoints_are_refused(dual_single_sd):
    key = "stream_1.features.conv1x1_2.weight"
    missing = {k: a for k, a in dual_single_sd.items() if k != key}
    with pytest.raises(ValueError, match=f"missing key {key}"):
        dn.load_torch_state_dict(missing)
    wrong = dict(dual_single_sd, **{key: np.zeros((200, 401, 1, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=rf"{key} has shape \(200, 401, 1, 1, 1\)"):
        dn.load_torch_state_dict(wrong)
    with pytest.raises(ValueError, match="unexpected keys"):
        dn.load_torch_state_dict(dict(dual_single_sd, **{"stream_1.extra.weight": np.zeros(3)}))
    # a SinglePath checkpoint loaded as a DualPath network names the key it lacks
    single, _, _ = _torch_classes()
    with pytest.raises(ValueError, match="missing key stream_1.features"):
        dn.load_torch_state_dict(single(2, 4, 0.1).state_dict(), network="DualPathDenseNet")
