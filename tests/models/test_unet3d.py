"""UNet3D (MedicalZoo's UNET3D) against a torch re-creation of ``lib/medzoo/Unet3D.py``."""

import jax
import numpy as np
import pytest

from medjax.models.unet3d import UNet3D, load_torch_state_dict
from tests.models import _medzoo_torch as mt
from tests.models._medzoo_torch import xla_conv  # noqa: F401  (autouse)


def _torch_unet3d(in_channels, n_classes, f=8):
    """The original's modules and forward, with its attribute names (so its state_dict keys)."""
    nn = mt.torch().nn
    cat = mt.torch().cat

    def conv(i, o, k=3, s=1):
        return nn.Conv3d(i, o, k, s, k // 2, bias=False)

    def norm_lrelu_conv(i, o):
        return nn.Sequential(nn.InstanceNorm3d(i), nn.LeakyReLU(), conv(i, o))

    def conv_norm_lrelu(i, o):
        return nn.Sequential(conv(i, o), nn.InstanceNorm3d(o), nn.LeakyReLU())

    def upscale(i, o):
        return nn.Sequential(
            nn.InstanceNorm3d(i),
            nn.LeakyReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv(i, o),
            nn.InstanceNorm3d(o),
            nn.LeakyReLU(),
        )

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lrelu = nn.LeakyReLU()
            self.dropout3d = nn.Dropout3d(p=0.6)
            self.upsacle = nn.Upsample(scale_factor=2, mode="nearest")
            self.conv3d_c1_1 = conv(in_channels, f)
            self.conv3d_c1_2 = conv(f, f)
            self.lrelu_conv_c1 = nn.Sequential(nn.LeakyReLU(), conv(f, f))
            self.inorm3d_c1 = nn.InstanceNorm3d(f)
            for lvl, m in ((2, 2), (3, 4), (4, 8), (5, 16)):
                setattr(self, f"conv3d_c{lvl}", conv(f * m // 2, f * m, s=2))
                setattr(self, f"norm_lrelu_conv_c{lvl}", norm_lrelu_conv(f * m, f * m))
                if lvl < 5:
                    setattr(self, f"inorm3d_c{lvl}", nn.InstanceNorm3d(f * m))
            self.norm_lrelu_upscale_conv_norm_lrelu_l0 = upscale(f * 16, f * 8)
            self.conv3d_l0 = conv(f * 8, f * 8, 1)
            self.inorm3d_l0 = nn.InstanceNorm3d(f * 8)
            for lvl, m in ((1, 16), (2, 8), (3, 4)):
                setattr(self, f"conv_norm_lrelu_l{lvl}", conv_norm_lrelu(f * m, f * m))
                setattr(self, f"conv3d_l{lvl}", conv(f * m, f * m // 2, 1))
                setattr(
                    self,
                    f"norm_lrelu_upscale_conv_norm_lrelu_l{lvl}",
                    upscale(f * m // 2, f * m // 4),
                )
            self.conv_norm_lrelu_l4 = conv_norm_lrelu(f * 2, f * 2)
            self.conv3d_l4 = conv(f * 2, n_classes, 1)
            self.ds2_1x1_conv3d = conv(f * 8, n_classes, 1)
            self.ds3_1x1_conv3d = conv(f * 4, n_classes, 1)

        def forward(self, x):
            out = self.conv3d_c1_1(x)
            res = out
            out = self.dropout3d(self.conv3d_c1_2(self.lrelu(out)))
            out = self.lrelu_conv_c1(out) + res
            ctx = [self.lrelu(out)]
            out = self.lrelu(self.inorm3d_c1(out))
            for lvl in (2, 3, 4, 5):
                out = getattr(self, f"conv3d_c{lvl}")(out)
                res = out
                shared = getattr(self, f"norm_lrelu_conv_c{lvl}")
                out = shared(self.dropout3d(shared(out))) + res
                if lvl < 5:
                    out = self.lrelu(getattr(self, f"inorm3d_c{lvl}")(out))
                    ctx.append(out)
            out = self.norm_lrelu_upscale_conv_norm_lrelu_l0(out)
            out = self.lrelu(self.inorm3d_l0(self.conv3d_l0(out)))
            ds = []
            for lvl in (1, 2, 3):
                out = getattr(self, f"conv_norm_lrelu_l{lvl}")(cat([out, ctx[4 - lvl]], 1))
                ds.append(out)
                out = getattr(self, f"conv3d_l{lvl}")(out)
                out = getattr(self, f"norm_lrelu_upscale_conv_norm_lrelu_l{lvl}")(out)
            out = self.conv_norm_lrelu_l4(cat([out, ctx[0]], 1))
            pred = self.conv3d_l4(out)
            ds2 = self.upsacle(self.ds2_1x1_conv3d(ds[1]))
            return pred + self.upsacle(ds2 + self.ds3_1x1_conv3d(ds[2]))

    return Net()


def _count(model, shape):
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def test_param_count_matches_original():
    assert _count(UNet3D(), (1, 32, 32, 32, 2)) == 1_781_744
    assert _count(UNet3D(in_channels=4), (1, 32, 32, 32, 4)) == 1_782_176


@pytest.mark.reference
def test_matches_torch_eval():
    """Eval mode at the smallest input, 32^3 (instance norm: train differs only by dropout)."""
    tmod = _torch_unet3d(3, 5)
    sd = tmod.state_dict()
    assert len(sd) == 26 and "norm_lrelu_conv_c2.2.weight" in sd
    variables = load_torch_state_dict(sd)  # in_channels=3, num_classes=5 read from the shapes
    model = UNet3D(in_channels=3, num_classes=5)
    mt.eval_and_train(model, variables, tmod, mt.rand((1, 32, 32, 32, 3)), train=False)


def test_shape_constraints():
    model = UNet3D()
    with pytest.raises(ValueError, match="multiples of 16"):
        jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 24, 2), np.float32))
    with pytest.raises(ValueError, match="more than one voxel"):
        jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 16, 2), np.float32))
    with pytest.raises(ValueError, match="in_channels=2"):
        jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 32, 3), np.float32))


def test_mismatched_checkpoint_refused():
    f = 2
    sd = {k: np.zeros(s, np.float32) for k, s in _shapes(f).items()}
    load_torch_state_dict(sd)  # a consistent (tiny, base_n_filter=2) checkpoint loads
    bad = dict(sd)
    bad["ds2_1x1_conv3d.weight"] = np.zeros((4, f * 8 + 1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="ds2_1x1_conv3d"):
        load_torch_state_dict(bad)
    bad = dict(sd)
    bad["extra.weight"] = bad.pop("conv3d_l0.weight")
    with pytest.raises(ValueError, match="conv3d_l0"):
        load_torch_state_dict(bad)


def _shapes(f, cin=2, k=4):
    """The original's state_dict shapes at width ``f`` (without building it)."""
    s = {"conv3d_c1_1.weight": (f, cin, 3, 3, 3), "conv3d_c1_2.weight": (f, f, 3, 3, 3)}
    s["lrelu_conv_c1.1.weight"] = (f, f, 3, 3, 3)
    for lvl, m in ((2, 2), (3, 4), (4, 8), (5, 16)):
        s[f"conv3d_c{lvl}.weight"] = (f * m, f * m // 2, 3, 3, 3)
        s[f"norm_lrelu_conv_c{lvl}.2.weight"] = (f * m, f * m, 3, 3, 3)
    s["norm_lrelu_upscale_conv_norm_lrelu_l0.3.weight"] = (f * 8, f * 16, 3, 3, 3)
    s["conv3d_l0.weight"] = (f * 8, f * 8, 1, 1, 1)
    for lvl, m in ((1, 16), (2, 8), (3, 4)):
        s[f"conv_norm_lrelu_l{lvl}.0.weight"] = (f * m, f * m, 3, 3, 3)
        s[f"conv3d_l{lvl}.weight"] = (f * m // 2, f * m, 1, 1, 1)
        s[f"norm_lrelu_upscale_conv_norm_lrelu_l{lvl}.3.weight"] = (f * m // 4, f * m // 2, 3, 3, 3)
    s["conv_norm_lrelu_l4.0.weight"] = (f * 2, f * 2, 3, 3, 3)
    s["conv3d_l4.weight"] = (k, f * 2, 1, 1, 1)
    s["ds2_1x1_conv3d.weight"] = (k, f * 8, 1, 1, 1)
    s["ds3_1x1_conv3d.weight"] = (k, f * 4, 1, 1, 1)
    return s
