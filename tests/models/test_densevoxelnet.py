"""DenseVoxelNet against a torch re-creation of ``DenseVoxelNet.py`` (the original's key names).

Dropout: eval mode runs the rate 0.2 (off in eval); train mode sets it to 0 on both sides.
Batch 2 at 8^3 (the dense_2 block runs at 2^3, so batch statistics have 16 values).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import densevoxelnet as dv
from tests.models import _zoo_parity as zp


def _torch_densevoxel(in_channels=2, classes=4, drop_rate=0.2):
    torch = zp.torch()
    torch.manual_seed(0)  # the re-creation's weights are torch's default init
    nn = torch.nn

    class DenseLayer(nn.Sequential):
        def __init__(self, cin):
            super().__init__()
            self.add_module("norm1", nn.BatchNorm3d(cin))
            self.add_module("relu1", nn.ReLU())
            self.add_module("conv1", nn.Conv3d(cin, 12, 3, padding=1, bias=False))
            self.drop_rate = drop_rate
            self.drop_layer = nn.Dropout(drop_rate)  # registered: Sequential.forward runs it too

        def forward(self, x):
            new = super().forward(x)
            return torch.cat([x, self.drop_layer(new) if self.drop_rate > 0 else new], 1)

    def dense(cin):
        block = nn.Sequential()
        for j in range(12):
            block.add_module(f"denselayer{j + 1}", DenseLayer(cin + 12 * j))
        return block

    class Transition(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.BatchNorm3d(160), nn.ReLU(), nn.Conv3d(160, 160, 1))
            self.max_pool = nn.MaxPool3d(2, 2)

        def forward(self, x):
            k = self.conv(x)
            return self.max_pool(k), k

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_init = nn.Conv3d(in_channels, 16, 1, stride=2, bias=False)
            self.dense_1 = dense(16)
            self.trans = Transition()
            self.dense_2 = dense(160)
            self.up_block = nn.Sequential()
            self.up_block.add_module("norm", nn.BatchNorm3d(304))
            self.up_block.add_module("relu", nn.ReLU())
            self.up_block.add_module("conv", nn.Conv3d(304, 304, 1, bias=False))
            self.up_block.add_module("transp_conv_1", nn.ConvTranspose3d(304, 128, 2, stride=2))
            self.up_block.add_module("transp_conv_2", nn.ConvTranspose3d(128, 64, 2, stride=2))
            self.conv_final = nn.Conv3d(64, classes, 1, bias=False)
            self.transpose = nn.ConvTranspose3d(160, 64, 2, stride=2)

        def forward(self, x):
            x, k = self.trans(self.dense_1(self.conv_init(x)))
            y1 = self.conv_final(self.up_block(self.dense_2(x)))
            return y1, self.conv_final(self.transpose(k))

    return Net()


@pytest.mark.reference
def test_matches_torch_eval_and_train():
    tmod = _torch_densevoxel()
    assert zp.torch_param_count(tmod) == 1_783_296
    model = dv.DenseVoxelNet()
    assert zp.param_count(model, (1, 4, 4, 4, 2)) == 1_783_296
    zp.check_parity(
        model,
        model.clone(drop_rate=0.0),
        tmod,
        dv.load_torch_state_dict,
        zp.x_input((2, 8, 8, 8, 2)),
        outputs=tuple,
        check_stats=True,
    )


@pytest.mark.reference
def test_class_defaults_count_and_inferred_settings():
    """The class's own defaults (1 channel, 3 classes): 1,783,216, not the docstring's 1,783,408."""
    tmod = _torch_densevoxel(1, 3)
    assert zp.torch_param_count(tmod) == 1_783_216
    assert zp.param_count(dv.DenseVoxelNet(1, 3), (1, 4, 4, 4, 1)) == 1_783_216
    v = dv.load_torch_state_dict(tmod.state_dict())
    assert v["params"]["conv_init"]["kernel"].shape == (1, 1, 1, 1, 16)
    assert v["params"]["conv_final"]["kernel"].shape == (1, 1, 1, 64, 3)
    y1, y2 = jax.eval_shape(dv.DenseVoxelNet(1, 3).apply, v, jnp.zeros((1, 4, 8, 12, 1)))
    assert y1.shape == y2.shape == (1, 4, 8, 12, 3)


def _trace(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 4, 4, 6, 2), "multiples of 4"),
        ((1, 3, 3, 3, 2), "multiples of 4"),
        ((1, 4, 4, 4, 1), "in_channels=2"),
        ((1, 4, 4, 2), r"\(B, D, H, W, C\)"),
    ],
)
def test_value_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        _trace(dv.DenseVoxelNet(), shape)


@pytest.mark.reference
def test_mismatched_checkpoints_are_refused():
    sd = {k: v.numpy() for k, v in _torch_densevoxel().state_dict().items()}
    key = "trans.conv.2.weight"  # its bias stays: still refused, by name
    with pytest.raises(ValueError, match=f"missing key {key}"):
        dv.load_torch_state_dict({k: a for k, a in sd.items() if k != key})
    key = "up_block.transp_conv_2.weight"
    wrong = dict(sd, **{key: np.zeros((128, 32, 2, 2, 2), np.float32)})
    with pytest.raises(ValueError, match=rf"{key} has shape \(128, 32, 2, 2, 2\)"):
        dv.load_torch_state_dict(wrong)
    with pytest.raises(ValueError, match="unexpected key conv_final.bias"):
        dv.load_torch_state_dict(dict(sd, **{"conv_final.bias": np.zeros(4, np.float32)}))


@pytest.mark.reference
def test_loads_an_npz_with_dataparallel_prefixes(tmp_path):
    sd = {f"module.{k}": v.numpy() for k, v in _torch_densevoxel(1, 3).state_dict().items()}
    np.savez(tmp_path / "dvn.npz", **sd)
    v = dv.load_torch_state_dict(tmp_path / "dvn.npz")
    assert v["params"]["transpose"]["kernel"].shape == (2, 2, 2, 160, 64)
