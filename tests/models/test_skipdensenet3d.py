"""SkipDenseNet3D against a torch re-creation of ``SkipDenseNet3D.py`` (the original's key names).

Dropout: eval mode runs the factory's rate 0.1 (off in eval); train mode sets it to 0 on both
sides. Batch 2 at 16^3, the smallest size (the last block runs at 1^3, so batch statistics need
two samples).
"""

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medjax.nn.conv
from medjax.models import skipdensenet3d as sk
from tests.models import _zoo_parity as zp


def _torch_skipdense(in_channels=2, classes=4, growth=16, init=32, drop_rate=0.1, bn_size=4):
    torch = zp.torch()
    torch.manual_seed(0)  # the re-creation's weights are torch's default init
    nn = torch.nn

    def bn_relu_conv(cin, cout, k, **kw):
        return [nn.BatchNorm3d(cin), nn.ReLU(), nn.Conv3d(cin, cout, k, **kw)]

    class DenseLayer(nn.Sequential):
        def __init__(self, cin):
            super().__init__()
            names = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")
            mods = bn_relu_conv(cin, bn_size * growth, 1, bias=False)
            mods += bn_relu_conv(bn_size * growth, growth, 3, padding=1, bias=False)
            for name, m in zip(names, mods, strict=True):
                self.add_module(name, m)
            self.drop_rate = drop_rate
            self.drop_layer = nn.Dropout(drop_rate)

        def forward(self, x):
            new = super().forward(x)
            return torch.cat([x, self.drop_layer(new) if self.drop_rate > 0 else new], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()

            def conv3(cin):
                return nn.Conv3d(cin, init, 3, padding=1, bias=False)

            self.features = nn.Sequential(
                OrderedDict(
                    conv0=conv3(in_channels),
                    norm0=nn.BatchNorm3d(init),
                    relu0=nn.ReLU(),
                    conv1=conv3(init),
                    norm1=nn.BatchNorm3d(init),
                    relu1=nn.ReLU(),
                    conv2=conv3(init),
                )
            )
            self.features_bn = nn.Sequential(
                OrderedDict(norm2=nn.BatchNorm3d(init), relu2=nn.ReLU())
            )
            self.conv_pool_first = nn.Conv3d(init, init, 2, stride=2, bias=False)
            self.dense_blocks = nn.ModuleList()
            self.transit_blocks = nn.ModuleList()
            self.upsampling_blocks = nn.ModuleList()
            c = init
            for i in range(4):
                block = nn.Sequential()
                for j in range(4):
                    block.add_module(f"denselayer{j + 1}", DenseLayer(c + j * growth))
                self.dense_blocks.append(block)
                c += 4 * growth
                s = 2 ** (i + 1)
                self.upsampling_blocks.append(
                    nn.ConvTranspose3d(c, classes, s + 2, s, padding=1, groups=classes, bias=False)
                )
                if i < 3:
                    mods = bn_relu_conv(c, c // 2, 1, bias=False) + bn_relu_conv(
                        c // 2, c // 2, 2, stride=2
                    )
                    names = ("norm", "relu", "conv", "pool_norm", "pool_relu", "pool")
                    self.transit_blocks.append(
                        nn.Sequential(OrderedDict(zip(names, mods, strict=True)))
                    )
                    c //= 2
            self.bn_class = nn.BatchNorm3d(4 * classes + init)
            self.conv_class = nn.Conv3d(4 * classes + init, classes, 1)
            self.relu_last = nn.ReLU()

        def forward(self, x):
            first = self.features(x)
            out = self.conv_pool_first(self.features_bn(first))
            ups = []
            for i in range(4):
                out = self.dense_blocks[i](out)
                ups.append(self.upsampling_blocks[i](out))
                if i < 3:
                    out = self.transit_blocks[i](out)
            out = torch.cat(ups + [first], 1)
            return self.conv_class(self.relu_last(self.bn_class(out)))

    return Net()


@pytest.mark.reference
def test_matches_torch_eval_and_train(monkeypatch):
    # medjax's CPU lowerings (off in the suite): XLA:CPU runs the 18^3 transposed convolutions of
    # the last upsampling path about 8x more slowly (this test: 85 s against 11 s).
    monkeypatch.setattr(medjax.nn.conv, "enabled", True)
    tmod = _torch_skipdense()
    assert zp.torch_param_count(tmod) == 1_552_256
    model = sk.SkipDenseNet3D()
    assert zp.param_count(model, (1, 16, 16, 16, 2)) == 1_552_256
    x = zp.x_input((2, 16, 16, 16, 2))
    # The last block runs at 1^3, so its batch statistics come from the 2 samples' values alone;
    # two noise inputs give nearly equal values there (16^3 receptive fields average the noise
    # out), and (x - mean) / sqrt(var + eps) of a near-zero difference amplifies float rounding.
    # A second sample of another intensity, as in real batches, keeps the check well-conditioned.
    x[1] = 2 * x[1] + 1
    zp.check_parity(
        model,
        model.clone(drop_rate=0.0),
        tmod,
        sk.load_torch_state_dict,
        x,
        check_stats=True,
        level0=False,  # level 0 runs the big transposed convolutions slowly: no faster overall
    )


@pytest.mark.reference
def test_in_channels_and_classes_are_read_from_the_checkpoint():
    """in_channels is a field here (the original's factory never passes it; the class takes it)."""
    sd = _torch_skipdense(in_channels=3, classes=2).state_dict()
    v = sk.load_torch_state_dict(sd)
    assert v["params"]["conv0"]["kernel"].shape == (3, 3, 3, 3, 32)
    assert v["params"]["upsampling_blocks_3"]["kernel"].shape == (18, 18, 18, 124, 1)
    n = zp.param_count(sk.SkipDenseNet3D(3, 2), (1, 16, 16, 16, 3))
    assert n == zp.torch_param_count(_torch_skipdense(in_channels=3, classes=2))


def _trace(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize(
    "model, shape, match",
    [
        (
            sk.SkipDenseNet3D(num_classes=3),
            (1, 16, 16, 16, 2),
            r"divide every block width \(96, 112, 120, 124\)",
        ),
        (sk.SkipDenseNet3D(), (1, 16, 16, 24, 2), "multiples of 16"),
        (sk.SkipDenseNet3D(), (1, 16, 16, 16, 3), "in_channels=2"),
        (sk.SkipDenseNet3D(), (1, 16, 16, 2), r"\(B, D, H, W, C\)"),
    ],
)
def test_value_errors(model, shape, match):
    with pytest.raises(ValueError, match=match):
        _trace(model, shape)


@pytest.mark.reference
def test_mismatched_checkpoints_are_refused():
    sd = {k: v.numpy() for k, v in _torch_skipdense().state_dict().items()}
    key = "transit_blocks.1.pool.weight"  # its bias stays: still refused, by name
    with pytest.raises(ValueError, match=f"missing key {key}"):
        sk.load_torch_state_dict({k: a for k, a in sd.items() if k != key})
    key = "upsampling_blocks.2.weight"
    wrong = dict(sd, **{key: np.zeros((120, 2, 10, 10, 10), np.float32)})
    with pytest.raises(ValueError, match=rf"{key} has shape \(120, 2, 10, 10, 10\)"):
        sk.load_torch_state_dict(wrong)
    with pytest.raises(ValueError, match="unexpected keys"):
        sk.load_torch_state_dict(dict(sd, **{"classifier.weight": np.zeros((4, 124), np.float32)}))


@pytest.mark.reference
@pytest.mark.parametrize("twice", [True, False])
def test_dense_layer_drops_twice_as_the_original(twice):
    """The original's layer runs its registered ``drop_layer`` in the Sequential and again after."""
    torch = zp.torch()
    p, x = 0.5, zp.x_input((1, 8, 8, 8, 4))
    layer = _torch_skipdense(drop_rate=p).dense_blocks[3].denselayer1  # 108 -> 124 channels
    layer = type(layer)(4).train()
    with torch.no_grad():
        new = zp.from_torch(layer(zp.to_torch(x)))[..., 4:]
    assert abs(np.mean(new == 0) - (1 - (1 - p) ** 2)) < 0.03  # the original: 0.75, not 0.5

    from medjax.models._medzoo import DenseBlock
    from medjax.nn.blocks import rbg_key

    block = DenseBlock(1, 16, bottleneck=64, drop_rate=p, dropout_twice=twice)
    v = block.init(rbg_key(0), x)

    def run(v, key):
        return block.apply(v, x, True, mutable=["batch_stats"], rngs={"dropout": key})[0]

    y = zp.compile_fast(run, v, rbg_key(1))(v, rbg_key(1))[..., 4:]
    assert abs(np.mean(y == 0) - (1 - (1 - p) ** (2 if twice else 1))) < 0.03
