"""HyperDenseNet (2 and 3 modalities) against a torch re-creation of ``HyperDensenet.py``.

The re-creation keeps the original's module names and ``convBlock`` layouts (``.0`` PReLU, ``.2``
conv; ``.0`` BN, ``.1`` PReLU, ``.3`` conv), so its ``state_dict`` has the real keys. Its dropout
has p = 0 as in the original (the original never passes another rate), so eval and train
mode compare the same networks; PReLU slopes and BN statistics are randomised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import hyperdensenet as hd
from tests.models import _zoo_parity as zp

GROWTHS = (25, 25, 25, 50, 50, 50, 75, 75, 75)


def _torch_hyperdense(paths, classes=4):
    """The original's network with ``paths`` (("Top", "Bottom") or ("Top", "Middle", "Bottom"))."""
    torch = zp.torch()
    torch.manual_seed(0)  # the re-creation's weights are torch's default init
    nn = torch.nn

    def conv_block(cin, cout, batch_norm):
        mods = [nn.BatchNorm3d(cin)] if batch_norm else []
        mods += [nn.PReLU(), nn.Dropout(p=0.0), nn.Conv3d(cin, cout, 3)]
        return nn.Sequential(*mods)

    def crop(t):
        return t[:, :, 1:-1, 1:-1, 1:-1]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            n, cin = len(paths), 1
            for k, g in enumerate(GROWTHS, start=1):
                for p in paths:
                    setattr(self, f"conv{k}_{p}", conv_block(cin, g, k > 1))
                cin = n * g if k == 1 else cin + n * g
            self.fully_1 = nn.Conv3d(n * cin, 400, 1)
            self.fully_2 = nn.Conv3d(400, 200, 1)
            self.fully_3 = nn.Conv3d(200, 150, 1)
            self.final = nn.Conv3d(150, classes, 1)

        def forward(self, x):
            n = len(paths)

            def others(ys, p):
                return [ys[p]] + ys[:p] + ys[p + 1 :]

            ys = [getattr(self, f"conv1_{q}")(x[:, p : p + 1]) for p, q in enumerate(paths)]
            ins = [torch.cat(others(ys, p), 1) for p in range(n)]
            for k in range(2, len(GROWTHS) + 1):
                ys = [getattr(self, f"conv{k}_{q}")(ins[p]) for p, q in enumerate(paths)]
                ins = [torch.cat([crop(ins[p])] + others(ys, p), 1) for p in range(n)]
            y = self.fully_3(self.fully_2(self.fully_1(torch.cat(ins, 1))))
            return self.final(y)

    return Net()


CASES = [
    (hd.HyperDenseNet_2Mod, ("Top", "Bottom"), 10_361_922, 20),
    (hd.HyperDenseNet, ("Top", "Middle", "Bottom"), 23_173_431, 19),
]


@pytest.mark.reference
@pytest.mark.parametrize("cls, paths, count, size", CASES)
def test_matches_torch_eval_and_train(cls, paths, count, size):
    tmod = _torch_hyperdense(paths)
    n = len(paths)
    assert zp.torch_param_count(tmod) == count
    model = cls()
    assert zp.param_count(model, (1, 19, 19, 19, n)) == count
    x = zp.x_input((1, size, size, size, n))
    zp.check_parity(model, model, tmod, hd.load_torch_state_dict, x, check_stats=n == 2)
    out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)
    assert out.shape == (1, size - 18, size - 18, size - 18, 4)


def _trace(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize(
    "model, shape, match",
    [
        (
            hd.HyperDenseNet_2Mod(in_channels=3),
            (1, 19, 19, 19, 3),
            r"got 3; use HyperDenseNet\b(?!_)",
        ),
        (hd.HyperDenseNet(in_channels=2), (1, 19, 19, 19, 2), "use HyperDenseNet_2Mod"),
        (hd.HyperDenseNet(in_channels=4), (1, 19, 19, 19, 4), "only 2 or 3 modalities"),
        (hd.HyperDenseNet_2Mod(), (1, 19, 19, 19, 3), "expects 2 channels"),
        (hd.HyperDenseNet_2Mod(), (1, 18, 18, 18, 2), ">= 19"),
        (hd.HyperDenseNet(), (1, 24, 24, 18, 3), ">= 19"),
        (hd.HyperDenseNet(), (1, 24, 24, 3), r"\(B, D, H, W, C\)"),
    ],
)
def test_value_errors(model, shape, match):
    with pytest.raises(ValueError, match=match):
        _trace(model, shape)


@pytest.mark.reference
def test_mismatched_checkpoints_are_refused():
    sd = {k: v.numpy() for k, v in _torch_hyperdense(("Top", "Bottom"), 3).state_dict().items()}
    v = hd.load_torch_state_dict(sd)  # 2 modalities and 3 classes inferred
    assert v["params"]["final"]["kernel"].shape == (1, 1, 1, 150, 3)
    assert v["params"]["conv1_Top"]["act"]["negative_slope"].shape == ()
    key = "conv5_Bottom.3.weight"
    with pytest.raises(ValueError, match=f"missing key {key}"):
        hd.load_torch_state_dict({k: a for k, a in sd.items() if k != key})
    wrong = dict(sd, **{"fully_2.weight": np.zeros((200, 399, 1, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"fully_2.weight has shape \(200, 399, 1, 1, 1\)"):
        hd.load_torch_state_dict(wrong)
    with pytest.raises(ValueError, match="missing key conv1_Middle"):
        hd.load_torch_state_dict(sd, in_channels=3)
    with pytest.raises(ValueError, match="unexpected keys"):
        hd.load_torch_state_dict(dict(sd, **{"conv1_Top.1.weight": np.zeros(1, np.float32)}))
