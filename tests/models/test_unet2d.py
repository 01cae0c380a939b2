"""Unet (MedicalZoo's 2-D UNET2D) against a torch re-creation of ``Unet2D.py``.

Eval mode at 16^2 (the smallest) and train mode (BatchNorm batch statistics; no dropout) at
34x39, batch 2: a size that is not a multiple of 16 exercises the pad-to-skip step, and with more
than one pixel at the bottleneck the batch statistics are well conditioned.
"""

import jax
import numpy as np
import pytest

from medjax.models.unet2d import Unet, load_torch_state_dict
from tests.models import _medzoo_torch as mt
from tests.models._medzoo_torch import xla_conv  # noqa: F401  (autouse)


def _torch_unet2d(in_channels, classes):
    """``Unet2D.py``'s Unet (bilinear) with its module names."""
    t = mt.torch()
    t.manual_seed(0)
    nn, F = t.nn, t.nn.functional

    def double(cin, cout):
        class DoubleConv(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Sequential(
                    nn.Conv2d(cin, cout, 3, padding=1),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(cout, cout, 3, padding=1),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                )

            def forward(self, x):
                return self.conv(x)

        return DoubleConv()

    class InConv(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = double(cin, cout)

        def forward(self, x):
            return self.conv(x)

    class Down(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.mpconv = nn.Sequential(nn.MaxPool2d(2), double(cin, cout))

        def forward(self, x):
            return self.mpconv(x)

    class Up(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = double(cin, cout)

        def forward(self, x1, x2):
            x1 = self.up(x1)
            dy, dx = x2.shape[2] - x1.shape[2], x2.shape[3] - x1.shape[3]
            x1 = F.pad(x1, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
            return self.conv(t.cat([x2, x1], dim=1))

    class OutConv(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 1)

        def forward(self, x):
            return self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inc = InConv(in_channels, 64)
            self.down1, self.down2 = Down(64, 128), Down(128, 256)
            self.down3, self.down4 = Down(256, 512), Down(512, 512)
            self.up1, self.up2 = Up(1024, 256), Up(512, 128)
            self.up3, self.up4 = Up(256, 64), Up(128, 64)
            self.outc = OutConv(64, classes)

        def forward(self, x):
            x1 = self.inc(x)
            x2 = self.down1(x1)
            x3 = self.down2(x2)
            x4 = self.down3(x3)
            x = self.up1(self.down4(x4), x4)
            return self.outc(self.up4(self.up3(self.up2(x, x3), x2), x1))

    return Net()


def _count(model, shape):
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def test_param_count_matches_original():
    assert _count(Unet(), (1, 16, 16, 2)) == 13_394_948
    assert _count(Unet(in_channels=4), (1, 16, 16, 4)) == 13_396_100


@pytest.mark.reference
def test_matches_torch():
    tmod = mt.randomise(_torch_unet2d(2, 3))
    sd = tmod.state_dict()
    assert "down1.mpconv.1.conv.0.weight" in sd and "up4.conv.conv.4.running_var" in sd
    variables = load_torch_state_dict(sd)
    model = Unet(in_channels=2, num_classes=3)
    mt.eval_and_train(
        model, variables, tmod, mt.rand((1, 16, 16, 2)), x_train=mt.rand((2, 34, 39, 2))
    )


@pytest.mark.reference
def test_mismatched_checkpoint_refused():
    sd = {k: v.numpy() for k, v in _torch_unet2d(1, 2).state_dict().items()}
    load_torch_state_dict(sd)
    bad = dict(sd)
    bad["up2.conv.conv.3.weight"] = np.zeros((128, 64, 3, 3), np.float32)
    with pytest.raises(ValueError, match="up2/conv_1"):
        load_torch_state_dict(bad)
    bad = dict(sd, **{"up5.conv.conv.0.weight": sd["up4.conv.conv.0.weight"]})
    with pytest.raises(ValueError, match="up5"):
        load_torch_state_dict(bad)


def test_input_constraints():
    init = lambda s: jax.eval_shape(Unet().init, jax.random.key(0), np.zeros(s, np.float32))
    with pytest.raises(ValueError, match="at least 16"):
        init((1, 15, 32, 2))
    with pytest.raises(ValueError, match="spatial axes"):
        init((1, 16, 16, 16, 2))
    assert init((1, 17, 20, 2)) is not None  # any size >= 16 (padded to the skips)
