"""ResNetMed3D (MedicalZoo's RESNETMED3D, depth 18) against a torch re-creation of
``ResNet3DMedNet.py``: eval mode at 8^3 (the smallest) and train mode (BatchNorm batch
statistics; the network has no dropout) at 16^3, batch 2. At 8^3 layers 2-4 and the first
transposed conv see one voxel, and eight chained batch norms over 4 values amplify float rounding
to ~1e-3; at 16^3 (16 values) the difference is ~1e-5."""

import jax
import numpy as np
import pytest

from medjax.models.resnet_med3d import ResNetMed3D, load_torch_state_dict
from tests.models import _medzoo_torch as mt
from tests.models._medzoo_torch import xla_conv  # noqa: F401  (autouse)


def _torch_resnet_med3d(in_channels, classes, layers=(2, 2, 2, 2)):
    """``generate_resnet3d(model_depth=18)`` with its module names (no shape print)."""
    t = mt.torch()
    t.manual_seed(0)
    nn = t.nn

    def conv3(cin, cout, stride=1, d=1):
        return nn.Conv3d(cin, cout, 3, stride, padding=d, dilation=d, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, cin, c, stride=1, d=1, downsample=None):
            super().__init__()
            self.conv1 = conv3(cin, c, stride, d)
            self.bn1 = nn.BatchNorm3d(c)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3(c, c)
            self.bn2 = nn.BatchNorm3d(c)
            self.downsample = downsample

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            res = x if self.downsample is None else self.downsample(x)
            return self.relu(out + res)

    def transp(cin):
        return nn.Sequential(nn.ConvTranspose3d(cin, 256, 2, 2), nn.BatchNorm3d(256), nn.ReLU())

    class TranspConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.transp_1, self.transp_2, self.transp_3 = transp(512), transp(256), transp(256)
            self.conv_1 = nn.Sequential(conv3(256, 128), nn.BatchNorm3d(128), nn.ReLU())
            self.conv_final = nn.Conv3d(128, classes, 1, bias=False)

        def forward(self, x):
            return self.conv_final(self.conv_1(self.transp_3(self.transp_2(self.transp_1(x)))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv3d(in_channels, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm3d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool3d(3, 2, 1)
            cin = 64
            for i, (c, s, d) in enumerate(((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))):
                down = None
                if s != 1 or cin != c:
                    down = nn.Sequential(nn.Conv3d(cin, c, 1, s, bias=False), nn.BatchNorm3d(c))
                blocks = [BasicBlock(cin, c, s, d, down)]
                blocks += [BasicBlock(c, c, d=d) for _ in range(1, layers[i])]
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
                cin = c
            self.segm = TranspConvNet()

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.segm(x)

    return Net()


def _count(model, shape):
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def test_param_count_matches_original():
    assert _count(ResNetMed3D(), (1, 8, 8, 8, 2)) == 36_166_912
    assert _count(ResNetMed3D(in_channels=4), (1, 8, 8, 8, 4)) == 36_210_816


@pytest.mark.reference
def test_matches_torch():
    tmod = mt.randomise(_torch_resnet_med3d(2, 3))
    sd = tmod.state_dict()
    assert "layer2.0.downsample.0.weight" in sd and "segm.transp_1.0.weight" in sd
    variables = load_torch_state_dict(sd)  # depth 18 read from the blocks per layer
    model = ResNetMed3D(in_channels=2, num_classes=3)
    mt.eval_and_train(
        model, variables, tmod, mt.rand((1, 8, 8, 8, 2)), x_train=mt.rand((2, 16, 16, 16, 2))
    )


@pytest.mark.reference
def test_depth10_count_and_mismatched_checkpoint():
    tmod = _torch_resnet_med3d(1, 2, layers=(1, 1, 1, 1))
    n = sum(p.numel() for p in tmod.parameters())
    assert _count(ResNetMed3D(in_channels=1, num_classes=2, depth=10), (1, 8, 8, 8, 1)) == n
    sd = {k: v.numpy() for k, v in tmod.state_dict().items()}
    load_torch_state_dict(sd)  # depth 10 read from the keys
    bad = dict(sd)
    bad["layer3.0.conv2.weight"] = np.zeros((256, 256, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="layer3_0/conv2"):
        load_torch_state_dict(bad)
    bad = dict(sd)
    del bad["segm.conv_1.1.running_var"]
    with pytest.raises(ValueError, match="segm_conv_1_bn"):
        load_torch_state_dict(bad)
    with pytest.raises(ValueError, match="depth"):
        load_torch_state_dict(sd, depth=50)


def test_input_constraints():
    init = lambda m, s: jax.eval_shape(m.init, jax.random.key(0), np.zeros(s, np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        init(ResNetMed3D(), (1, 12, 8, 8, 2))
    with pytest.raises(ValueError, match="depth"):
        init(ResNetMed3D(depth=50), (1, 8, 8, 8, 2))
    with pytest.raises(ValueError, match="in_channels=2"):
        init(ResNetMed3D(), (1, 8, 8, 8, 3))
