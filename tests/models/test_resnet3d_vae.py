"""ResNet3dVAE (MedicalZoo's RESNET3DVAE) against a torch re-creation of ``ResNet3D_VAE.py``.

The original draws the VAE noise on every call, even in eval; the re-creation decodes the mean
(``eps = 0``), as medjax does with ``train=False``, so all four outputs are compared in eval
mode at dim 16^3. The network has GroupNorm only, so training differs from eval by dropout and
sampling alone: the training pass (``dropout_rate=0``) is checked to give eval's ``y``, ``mu``
and ``logvar`` and a sampled, key-determined reconstruction.
"""

import jax
import numpy as np
import pytest

from medjax.models.resnet3d_vae import ResNet3dVAE, load_torch_state_dict
from tests.models import _medzoo_torch as mt
from tests.models._medzoo_torch import xla_conv  # noqa: F401  (autouse)


def _torch_vae(in_channels, classes, dim):
    """``ResNet3D_VAE.py``'s ResNet3dVAE with its module names; reparametrize uses eps = 0."""
    t = mt.torch()
    t.manual_seed(0)
    nn = t.nn

    class GreenBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.layer_1 = nn.Sequential(nn.GroupNorm(8, c), nn.ReLU())
            self.layer_2 = nn.Sequential(nn.Conv3d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.ReLU())
            self.conv_3 = nn.Conv3d(c, c, 3, 1, 1)

        def forward(self, x):
            x = self.layer_2(self.layer_1(x))
            return self.conv_3(x) + x

    class Conv(nn.Module):  # DownBlock (stride 2) / BlueBlock
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv = nn.Conv3d(cin, cout, 3, stride, 1)

        def forward(self, x):
            return self.conv(x)

    class UpBlock2(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv_1 = nn.Conv3d(cin, cout, 1)
            self.up_sample_1 = nn.Upsample(scale_factor=2, mode="nearest")

        def forward(self, x):
            return self.up_sample_1(self.conv_1(x))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blue_1 = Conv(in_channels, 32)
            self.drop = nn.Dropout3d(0.2)
            self.green_1 = GreenBlock(32)
            self.down_1 = Conv(32, 64, 2)
            self.green_2_1, self.green_2_2 = GreenBlock(64), GreenBlock(64)
            self.down_2 = Conv(64, 128, 2)
            self.green_3_1, self.green_3_2 = GreenBlock(128), GreenBlock(128)
            self.down_3 = Conv(128, 256, 2)
            for i in (1, 2, 3, 4):
                setattr(self, f"green_4_{i}", GreenBlock(256))

        def forward(self, x):
            x1 = self.green_1(self.drop(self.blue_1(x)))
            x2 = self.green_2_2(self.green_2_1(self.down_1(x1)))
            x3 = self.green_3_2(self.green_3_1(self.down_2(x2)))
            x = self.down_3(x3)
            for i in (1, 2, 3, 4):
                x = getattr(self, f"green_4_{i}")(x)
            return x1, x2, x3, x

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_1, self.green_1 = UpBlock2(256, 128), GreenBlock(128)
            self.up_2, self.green_2 = UpBlock2(128, 64), GreenBlock(64)
            self.up_3, self.green_3 = UpBlock2(64, 32), GreenBlock(32)
            self.blue = Conv(32, classes)

        def forward(self, x1, x2, x3, x4):
            x = self.green_1(self.up_1(x4) + x3)
            x = self.green_2(self.up_2(x) + x2)
            return self.blue(self.green_3(self.up_3(x) + x1))

    small = tuple(d // 16 for d in dim)
    n = 16 * small[0] * small[1] * small[2]

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.VD = nn.Sequential(nn.GroupNorm(8, 256), nn.ReLU(), nn.Conv3d(256, 16, 3, 2, 1))
            self.linear_1 = nn.Linear(n, 256)
            self.linear_vu = nn.Linear(128, n)
            self.VU = nn.Sequential(nn.ReLU(), UpBlock2(16, 256))
            self.Vup2, self.Vblock2 = UpBlock2(256, 128), GreenBlock(128)
            self.Vup1, self.Vblock1 = UpBlock2(128, 64), GreenBlock(64)
            self.Vup0, self.Vblock0 = UpBlock2(64, 32), GreenBlock(32)
            self.Vend = Conv(32, in_channels)

        def forward(self, x):
            x = self.linear_1(self.VD(x).view(-1, n))
            mu, logvar = x[:, :128], x[:, 128:]
            z = mu + 0.0 * t.exp(0.5 * logvar)  # the original: + randn_like(std) * std
            y = self.VU(self.linear_vu(z).view(-1, 16, *small))
            y = self.Vblock2(self.Vup2(y))
            y = self.Vblock1(self.Vup1(y))
            y = self.Vblock0(self.Vup0(y))
            return self.Vend(y), mu, logvar

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder, self.vae = Encoder(), Decoder(), VAE()

        def forward(self, x):
            x1, x2, x3, x4 = self.encoder(x)
            vae_out, mu, logvar = self.vae(x4)
            return self.decoder(x1, x2, x3, x4), vae_out, mu, logvar

    return Net()


def _count(model, shape):
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def test_param_counts_match_original():
    for d, n in ((16, 20_133_638), (32, 20_176_758), (64, 20_521_718)):
        assert _count(ResNet3dVAE(dim=(d,) * 3), (1, d, d, d, 2)) == n
    assert _count(ResNet3dVAE(in_channels=4), (1, 32, 32, 32, 4)) == 20_176_758 + 3_458


@pytest.mark.reference
def test_matches_torch():
    dim = (16, 16, 16)
    tmod = mt.randomise(_torch_vae(3, 2, dim))
    sd = tmod.state_dict()
    assert "encoder.green_4_4.layer_2.1.weight" in sd and "vae.VU.1.conv_1.weight" in sd
    variables = load_torch_state_dict(sd)  # in_channels, num_classes and dim from the shapes
    x = mt.rand((2, *dim, 3))
    model = ResNet3dVAE(in_channels=3, num_classes=2, dim=dim, dropout_rate=0.0)
    ev, _ = mt.eval_and_train(model, variables, tmod, x, train=False)
    # Training: same y / mu / logvar, a sampled reconstruction fixed by the "vae" key.
    train = jax.jit(lambda v, a, k: model.apply(v, a, train=True, rngs={"vae": k}))
    t1, t1b, t2 = (train(variables, x, jax.random.key(k)) for k in (1, 1, 2))
    for i in (0, 2, 3):
        mt.assert_close(t1[i], ev[i])
    assert t1[1].shape == ev[1].shape and np.isfinite(np.asarray(t1[1])).all()
    np.testing.assert_array_equal(np.asarray(t1[1]), np.asarray(t1b[1]))
    assert np.abs(np.asarray(t1[1]) - np.asarray(t2[1])).max() > 1e-4
    assert np.abs(np.asarray(t1[1]) - np.asarray(ev[1])).max() > 1e-4


@pytest.mark.reference
def test_mismatched_checkpoint_refused():
    sd = {k: v.numpy() for k, v in _torch_vae(2, 4, (16, 16, 16)).state_dict().items()}
    bad = dict(sd)
    bad["vae.linear_vu.weight"] = np.zeros((17, 128), np.float32)
    with pytest.raises(ValueError, match="vae_linear_vu"):
        load_torch_state_dict(bad)
    with pytest.raises(ValueError, match="vae_linear_1"):
        load_torch_state_dict(sd, dim=(32, 32, 32))  # a 16^3 checkpoint into a 32^3 network
    bad = {k.replace("decoder.green_2.conv_3", "decoder.green_2.conv3"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="decoder.green_2.conv_3"):
        load_torch_state_dict(bad)


def test_input_constraints():
    init = lambda m, s: jax.eval_shape(m.init, jax.random.key(0), np.zeros(s, np.float32))
    with pytest.raises(ValueError, match="multiples of 16"):
        init(ResNet3dVAE(dim=(24, 24, 24)), (1, 24, 24, 24, 2))
    with pytest.raises(ValueError, match="must equal"):
        init(ResNet3dVAE(dim=(16, 16, 16)), (1, 32, 32, 32, 2))
    with pytest.raises(ValueError, match="in_channels=2"):
        init(ResNet3dVAE(dim=(16, 16, 16)), (1, 16, 16, 16, 4))
