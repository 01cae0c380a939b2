"""HighResNet3D (MedicalZoo's HIGHRESNET) against a torch re-creation of ``HighResNet3D.py``.

Eval mode and train mode (BatchNorm batch statistics, batch 4); in train mode the head's
Dropout3d is off on both sides (torch's module in eval, medjax's ``dropout_rate=0``).
"""

import jax
import numpy as np
import pytest

import medjax.nn.conv
from medjax.models.highresnet import HighResNet3D, load_torch_state_dict
from tests.models import _medzoo_torch as mt
from tests.models._medzoo_torch import xla_conv  # noqa: F401  (autouse)


def _torch_highresnet(in_channels, classes):
    """``HighResNet3D.py`` (shortcut "A", dropout_layer=True) with its module names."""
    t = mt.torch()
    t.manual_seed(0)
    nn = t.nn

    def preact(cin, cout, k=3, d=1):
        return nn.Sequential(
            nn.BatchNorm3d(cin),
            nn.ReLU(),
            nn.Conv3d(cin, cout, k, padding=d * (k // 2), dilation=d),
        )

    class Sub(nn.Module):  # ConvRed / DilatedConv2 / DilatedConv4 / Conv1x1x1
        def __init__(self, attr, cin, cout, k=3, d=1):
            super().__init__()
            self.attr = attr
            setattr(self, attr, preact(cin, cout, k, d))

        def forward(self, x):
            return getattr(self, self.attr)(x)

    class ConvInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv3d(in_channels, 16, 3, padding=1)
            self.norm = nn.Sequential(nn.BatchNorm3d(16), nn.ReLU())

        def forward(self, x):
            y1 = self.conv1(x)
            return y1, self.norm(y1)

    def pad(x, c):
        z = x.new_zeros(x.shape[0], (c - x.shape[1]) // 2, *x.shape[2:])
        return t.cat((z, x, z), 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_init = ConvInit()
            for i, cin in ((1, 16), (2, 16), (3, 16)):
                setattr(
                    self,
                    f"red_blocks{i}",
                    nn.Sequential(Sub("conv_red", cin, 16), Sub("conv_red", 16, 16)),
                )
            for i, cin in ((1, 16), (2, 32), (3, 32)):
                setattr(
                    self,
                    f"dil2block{i}",
                    nn.Sequential(Sub("conv_dil", cin, 32, d=2), Sub("conv_dil", 32, 32, d=2)),
                )
            for i, cin in ((1, 32), (2, 64), (3, 64)):
                setattr(
                    self,
                    f"dil4block{i}",
                    nn.Sequential(Sub("conv_dil", cin, 64, d=4), Sub("conv_dil", 64, 64, d=4)),
                )
            self.conv_out = nn.Sequential(
                nn.Conv3d(64, 80, 1), nn.Dropout3d(), Sub("conv_dil", 80, classes, k=1)
            )

        def forward(self, x):
            x, x_res = self.conv_init(x)
            r1 = self.red_blocks1(x)
            r2 = self.red_blocks2(r1 + x_res)
            r3 = self.red_blocks3(r2 + r1)
            d1 = self.dil2block1(r3 + r2)
            d2 = self.dil2block2(d1 + pad(r3, 32))
            d3 = self.dil2block3(d2 + d1)
            e1 = self.dil4block1(d3 + d2)
            e2 = self.dil4block2(e1 + pad(d3, 64))
            e3 = self.dil4block3(e2 + e1)
            return self.conv_out(e3 + e2)

    return Net()


def _count(model, shape):
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def test_param_count_matches_original():
    assert _count(HighResNet3D(), (1, 8, 8, 8, 2)) == 810_308
    assert _count(HighResNet3D(in_channels=4), (1, 8, 8, 8, 4)) == 811_172


@pytest.mark.reference
def test_matches_torch():
    tmod = mt.randomise(_torch_highresnet(2, 3))
    sd = tmod.state_dict()
    assert "red_blocks1.0.conv_red.0.running_var" in sd and "conv_out.2.conv_dil.2.weight" in sd
    variables = load_torch_state_dict(sd)
    model = HighResNet3D(in_channels=2, num_classes=3, dropout_rate=0.0)
    _, upd = mt.eval_and_train(model, variables, tmod, mt.rand((4, 8, 8, 8, 2)))
    mt.assert_close(
        upd["batch_stats"]["dil4block3_1"]["bn"]["mean"],
        tmod.dil4block3[1].conv_dil[0].running_mean.numpy(),
    )


@pytest.mark.reference
def test_mismatched_checkpoint_refused():
    sd = {k: v.numpy() for k, v in _torch_highresnet(1, 2).state_dict().items()}
    load_torch_state_dict(sd)
    bad = dict(sd)
    bad["dil2block2.1.conv_dil.2.weight"] = np.zeros((32, 16, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="dil2block2_1/conv"):
        load_torch_state_dict(bad)
    bad = {k.replace("conv_init.norm.0", "conv_init.bn"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="conv_init.norm.0"):
        load_torch_state_dict(bad)


def test_input_constraints():
    with pytest.raises(ValueError, match="in_channels=2"):
        jax.eval_shape(
            HighResNet3D().init, jax.random.key(0), np.zeros((1, 4, 4, 4, 1), np.float32)
        )
    with pytest.raises(ValueError, match="spatial axes"):
        jax.eval_shape(HighResNet3D().init, jax.random.key(0), np.zeros((1, 4, 4, 2), np.float32))


@pytest.mark.reference
def test_matches_torch_with_cpu_conv_lowering(monkeypatch):
    """Eval once with medjax's CPU convolution lowerings on (the default path off the tests)."""
    monkeypatch.setattr(medjax.nn.conv, "enabled", True)
    tmod = mt.randomise(_torch_highresnet(2, 4), seed=1)
    mt.eval_and_train(
        HighResNet3D(),
        load_torch_state_dict(tmod.state_dict()),
        tmod,
        mt.rand((1, 8, 8, 8, 2)),
        train=False,
    )
