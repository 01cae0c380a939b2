"""VNet / VNetLight (MedicalZoo's VNET / VNET2) against a torch re-creation of ``Vnet.py``.

Eval mode and train mode (BatchNorm batch statistics) are compared; in train mode dropout is off
on both sides (torch's Dropout3d modules in eval, medjax's ``dropout_rate=0``), so the outputs,
not the dropout masks, are compared. Batch 4: at the smallest sizes the bottleneck has one voxel,
and batch statistics over 2 values amplify float rounding (errors ~5e-4); over 4 they are ~5e-6.
"""

import jax
import numpy as np
import pytest

from medjax.models import vnet
from medjax.models.vnet import VNet, VNetLight, load_torch_state_dict
from tests.models import _medzoo_torch as mt
from tests.models._medzoo_torch import xla_conv  # noqa: F401  (autouse)


def _torch_vnet(in_channels, classes, *, elu=False, light=False):
    """``Vnet.py``'s VNet / VNetLight with its module names. ``in_channels`` must divide 16."""
    t = mt.torch()
    t.manual_seed(0)
    nn = t.nn

    def act(n):
        return nn.ELU(inplace=True) if elu else nn.PReLU(n)

    class LUConv(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.relu1 = act(n)
            self.conv1 = nn.Conv3d(n, n, 5, padding=2)
            self.bn1 = nn.BatchNorm3d(n)

        def forward(self, x):
            return self.relu1(self.bn1(self.conv1(x)))

    class InputTransition(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv3d(in_channels, 16, 5, padding=2)
            self.bn1 = nn.BatchNorm3d(16)
            self.relu1 = act(16)

        def forward(self, x):
            return self.relu1(self.bn1(self.conv1(x)) + x.repeat(1, 16 // in_channels, 1, 1, 1))

    class Down(nn.Module):
        def __init__(self, c, n, dropout=False):
            super().__init__()
            self.down_conv = nn.Conv3d(c, 2 * c, 2, stride=2)
            self.bn1 = nn.BatchNorm3d(2 * c)
            self.do1 = nn.Dropout3d() if dropout else nn.Identity()
            self.relu1, self.relu2 = act(2 * c), act(2 * c)
            self.ops = nn.Sequential(*[LUConv(2 * c) for _ in range(n)])

        def forward(self, x):
            down = self.relu1(self.bn1(self.down_conv(x)))
            return self.relu2(self.ops(self.do1(down)) + down)

    class Up(nn.Module):
        def __init__(self, cin, cout, n, dropout=False):
            super().__init__()
            self.up_conv = nn.ConvTranspose3d(cin, cout // 2, 2, stride=2)
            self.bn1 = nn.BatchNorm3d(cout // 2)
            self.do1 = nn.Dropout3d() if dropout else nn.Identity()
            self.do2 = nn.Dropout3d()
            self.relu1, self.relu2 = act(cout // 2), act(cout)
            self.ops = nn.Sequential(*[LUConv(cout) for _ in range(n)])

        def forward(self, x, skip):
            out = self.relu1(self.bn1(self.up_conv(self.do1(x))))
            cat = t.cat((out, self.do2(skip)), 1)
            return self.relu2(self.ops(cat) + cat)

    class Output(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv3d(32, classes, 5, padding=2)
            self.bn1 = nn.BatchNorm3d(classes)
            self.conv2 = nn.Conv3d(classes, classes, 1)
            self.relu1 = act(classes)

        def forward(self, x):
            return self.conv2(self.relu1(self.bn1(self.conv1(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_tr = InputTransition()
            self.down_tr32 = Down(16, 1)
            self.down_tr64 = Down(32, 2)
            self.down_tr128 = Down(64, 3, dropout=True)
            if light:
                self.up_tr128 = Up(128, 128, 2, dropout=True)
            else:
                self.down_tr256 = Down(128, 2, dropout=True)
                self.up_tr256 = Up(256, 256, 2, dropout=True)
                self.up_tr128 = Up(256, 128, 2, dropout=True)
            self.up_tr64 = Up(128, 64, 1)
            self.up_tr32 = Up(64, 32, 1)
            self.out_tr = Output()

        def forward(self, x):
            o16 = self.in_tr(x)
            o32 = self.down_tr32(o16)
            o64 = self.down_tr64(o32)
            o128 = self.down_tr128(o64)
            out = self.up_tr128(o128, o64) if light else None
            if not light:
                out = self.up_tr256(self.down_tr256(o128), o128)
                out = self.up_tr128(out, o64)
            out = self.up_tr32(self.up_tr64(out, o32), o16)
            return self.out_tr(out)

    return Net()


def _count(model, shape):
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def test_param_counts_match_original():
    s = (1, 16, 16, 16)
    assert _count(VNet(), s + (2,)) == 45_613_956
    assert _count(VNet(in_channels=1), s + (1,)) == 45_611_956
    assert _count(VNet(in_channels=4), s + (4,)) == 45_617_956
    assert _count(VNetLight(), s + (2,)) == 12_249_988
    assert _count(VNetLight(in_channels=4), s + (4,)) == 12_253_988
    # ELU has no parameters: the 3,620 PReLU slopes go.
    assert _count(VNet(elu=True), s + (2,)) == 45_613_956 - 3_620


@pytest.mark.reference
def test_vnet_matches_torch():
    """VNet (PReLU, the factory's elu=False) at 16^3, eval and batch-statistics training."""
    tmod = mt.randomise(_torch_vnet(2, 3))
    sd = tmod.state_dict()
    assert "in_tr.relu1.weight" in sd and "down_tr32.down_conv.weight" in sd
    variables = load_torch_state_dict(sd)
    model = VNet(in_channels=2, num_classes=3, dropout_rate=0.0)
    _, upd = mt.eval_and_train(model, variables, tmod, mt.rand((4, 16, 16, 16, 2)))
    mt.assert_close(
        upd["batch_stats"]["down_tr256"]["bn1"]["var"],
        tmod.down_tr256.bn1.running_var.numpy(),
    )


@pytest.mark.reference
def test_vnet_light_elu_matches_torch():
    """VNetLight with ELU at 8^3 (the smallest), eval and batch-statistics training."""
    tmod = mt.randomise(_torch_vnet(4, 2, elu=True, light=True))
    variables = load_torch_state_dict(tmod.state_dict())  # light and elu read from the keys
    model = VNetLight(in_channels=4, num_classes=2, elu=True, dropout_rate=0.0)
    mt.eval_and_train(model, variables, tmod, mt.rand((4, 8, 8, 8, 4)))


def test_any_channel_count_tiles_the_input():
    """in_channels=3 (the original fails): tile channel k is input channel k mod 3."""
    block = vnet._InputTransition(elu=False)
    x = mt.rand((1, 4, 4, 4, 3))
    shapes = jax.eval_shape(lambda k, a: block.init(k, a, False), jax.random.key(0), x)
    variables = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), shapes)
    variables["batch_stats"]["bn1"]["var"] = np.ones(16, np.float32)  # zero conv, BN identity
    out = np.asarray(block.apply(variables, x, False))
    tiled = x[..., np.arange(16) % 3]
    np.testing.assert_allclose(out, np.where(tiled >= 0, tiled, 0.0), atol=1e-5)


def test_shape_constraints():
    init = lambda m, s: jax.eval_shape(m.init, jax.random.key(0), np.zeros(s, np.float32))
    with pytest.raises(ValueError, match="multiples of 16"):
        init(VNet(), (1, 8, 8, 8, 2))
    with pytest.raises(ValueError, match="multiples of 8"):
        init(VNetLight(), (1, 12, 8, 8, 2))
    with pytest.raises(ValueError, match="in_channels=2"):
        init(VNet(), (1, 16, 16, 16, 1))


@pytest.mark.reference
def test_mismatched_checkpoint_refused():
    sd = {k: v.numpy() for k, v in _torch_vnet(1, 2, light=True).state_dict().items()}
    bad = dict(sd)
    bad["up_tr64.up_conv.weight"] = np.zeros((128, 31, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="up_tr64"):
        load_torch_state_dict(bad)
    bad = dict(sd)
    del bad["down_tr64.relu2.weight"]
    with pytest.raises(ValueError, match="down_tr64.relu2"):
        load_torch_state_dict(bad)
    bad = dict(sd, **{"out_tr.conv3.weight": sd["out_tr.conv2.weight"]})
    with pytest.raises(ValueError, match="out_tr.conv3"):
        load_torch_state_dict(bad)
