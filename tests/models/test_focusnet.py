"""FocusNetV2 (S-Net, SOL, SOS, ConvAE) against PyTorch re-creations of yhygao/focusnet-v2.

The torch classes below follow ORIGINALS.md section 5 and keep the original's attribute names, so
their ``state_dict`` keys are the real checkpoints'. Weights are random (BN statistics randomised)
and imported through ``load_pytorch_weights``; outputs are compared in eval and train mode. The one
liberty taken: the re-created ``center_locate`` clamps to the test volume instead of the hard-coded
40x192x192, so that a small volume runs (the clamp itself is checked against a literal port of the
original at 40x192x192 in ``test_locate_equals_original_at_batch_1``).

Every network is traced or compiled as few times as possible (XLA:CPU compiles a 3D network slowly):
one jitted eval and one jitted train forward of the full FocusNetV2 serve every FocusNetV2 check.
"""

import copy
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.focusnet import (
    ConvAE,
    FocusNetV2,
    HeatmapHead,
    SOSBranch,
    crop_small_labels,
    focusnet_from_state_dict,
    load_pytorch_weights,
    locate_small_organs,
    paste_small_organs,
    torch_spec,
)
from tests.conftest import require_reference

VOL = (4, 16, 16)  # the test volume (D even, H and W multiples of 4)
CROP = (2, 8, 8)  # the SOS crop (the branch is size-agnostic; the original's is 8x64x64)
ORGANS = (2, 4, 5)
ATOL, RTOL = 1e-4, 1e-4
# LLVM's cheap pipeline: XLA:CPU compiles the 3D nets about twice as fast (same numbers, the convs
# are library calls either way). Tests only.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    """``jax.jit(fn)`` compiled once for ``args`` with :data:`FAST_COMPILE`, then called on them."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


# ------------------------------------------------------------------------------------------------
# PyTorch re-creation (model/net.py, model/model.py, model/AE3D.py), the original's names


@functools.lru_cache(maxsize=1)
def _T():
    torch = require_reference("torch")
    nn, F = torch.nn, torch.nn.functional

    def conv3x3(cin, cout, kernel_size=3, stride=1, padding=1, dilation_rate=1):
        pad = (0, 1, 1) if kernel_size == (1, 3, 3) else padding
        return nn.Conv3d(cin, cout, kernel_size, stride, pad, bias=False, dilation=dilation_rate)

    class SELayer(nn.Module):
        def __init__(self, channel, reduction=4):
            super().__init__()
            self.avg_pool = nn.AdaptiveAvgPool3d(1)
            self.conv = nn.Sequential(
                nn.Conv3d(channel, channel // reduction, 1),
                nn.ReLU(),
                nn.Conv3d(channel // reduction, channel, 1),
                nn.Sigmoid(),
            )

        def forward(self, x):
            return x * self.conv(self.avg_pool(x))

    class SEBasicBlock(nn.Module):
        def __init__(self, inplanes, planes, kernel_size=3, stride=1, reduction=4, dilation_rate=1):
            super().__init__()
            self.conv1 = conv3x3(inplanes, planes, kernel_size, stride)
            self.bn1 = nn.BatchNorm3d(inplanes)
            self.relu = nn.ReLU()
            self.conv2 = conv3x3(planes, planes, kernel_size, 1, dilation_rate, dilation_rate)
            self.bn2 = nn.BatchNorm3d(planes)
            self.se = SELayer(planes, reduction)
            self.shortcut = nn.Sequential()
            if stride != 1 or inplanes != planes:
                self.shortcut = nn.Sequential(
                    nn.BatchNorm3d(inplanes),
                    nn.ReLU(),
                    nn.Conv3d(inplanes, planes, 1, stride, bias=False),
                )

        def forward(self, x):
            out = self.conv1(self.relu(self.bn1(x)))
            out = self.conv2(self.relu(self.bn2(out)))
            return self.se(out) + self.shortcut(x)

    class inconv(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv1 = nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1), bias=False)
            self.relu = nn.ReLU()
            self.conv2 = SEBasicBlock(cout, cout, kernel_size=(1, 3, 3))

        def forward(self, x):
            return self.conv2(self.relu(self.conv1(x)))

    class conv_block(nn.Module):
        def __init__(self, cin, cout, reduction=2, dilation_rate=1):
            super().__init__()
            self.conv = SEBasicBlock(cin, cout, reduction=reduction, dilation_rate=dilation_rate)

        def forward(self, x):
            return self.conv(x)

    class up_block(nn.Module):
        def __init__(self, in_ch, out_ch, scale=(2, 2, 2)):
            super().__init__()
            self.scale = scale
            self.conv = nn.Sequential(conv_block(in_ch + out_ch, out_ch))

        def forward(self, x1, x2):
            x1 = F.interpolate(x1, scale_factor=self.scale, mode="trilinear", align_corners=True)
            return self.conv(torch.cat([x2, x1], 1))

    class DenseASPPBlock(nn.Sequential):
        def __init__(self, input_num, num1, num2, dilation_rate):
            super().__init__()
            self.add_module("norm_1", nn.BatchNorm3d(input_num))
            self.add_module("relu_1", nn.ReLU())
            self.add_module("conv_1", nn.Conv3d(input_num, num1, 1))
            self.add_module("norm_2", nn.BatchNorm3d(num1))
            self.add_module("relu_2", nn.ReLU())
            self.add_module(
                "conv_2", nn.Conv3d(num1, num2, 3, dilation=dilation_rate, padding=dilation_rate)
            )

    def layer(cin, cout, dilation_rate=1):
        return nn.Sequential(
            conv_block(cin, cout, dilation_rate=dilation_rate),
            conv_block(cout, cout, dilation_rate=dilation_rate),
        )

    def aspp(self, prefix, x, n=4):
        for k in range(1, n + 1):
            x = torch.cat((getattr(self, f"{prefix}{k}")(x), x), 1)
        return x

    class heatmap_pred(nn.Module):
        def __init__(self, in_ch, out_ch):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm3d(in_ch), conv3x3(in_ch, in_ch)
            self.bn2, self.conv2 = nn.BatchNorm3d(in_ch), conv3x3(in_ch, in_ch)
            self.conv3 = nn.Conv3d(in_ch, out_ch, 1)

        def forward(self, x):
            out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
            return torch.sigmoid(self.conv3(out))

    class SOS_branch(nn.Module):
        def __init__(self, channel, num_classes):
            super().__init__()
            self.share_conv1x = inconv(channel, 24)
            self.share_conv1x_2 = layer(24, 32)
            self.share_maxpool1 = nn.MaxPool3d((1, 2, 2))
            self.share_conv2x = layer(32, 48)
            self.share_maxpool2 = nn.MaxPool3d((2, 2, 2))
            self.share_conv4x = layer(48, 64)
            for k, d in enumerate((3, 5, 7, 9)):
                setattr(self, f"share_ASPP_{k + 1}", DenseASPPBlock(64 + 32 * k, 64, 32, (1, d, d)))
            self.share_up1 = up_block(192, 48)
            self.share_literal1 = nn.Conv3d(48, 48, 3, padding=1)
            self.share_up2 = up_block(48, 32, (1, 2, 2))
            self.share_literal2 = nn.Conv3d(32, 32, 3, padding=1)
            self.out_conv = nn.Conv3d(32, num_classes, 1, 1)

        def forward(self, x):
            o1 = self.share_conv1x_2(self.share_conv1x(x[:, -1:]))  # only the raw image
            o2 = self.share_conv2x(self.share_maxpool1(o1))
            o3 = self.share_conv4x(self.share_maxpool2(o2))
            feature = aspp(self, "share_ASPP_", o3)
            out = self.share_up1(feature, self.share_literal1(o2))
            return self.out_conv(self.share_up2(out, self.share_literal2(o1)))

    class SOSNet_sep(nn.Module):
        def __init__(self, num, crop, volume):
            super().__init__()
            self.SOS_module = nn.ModuleList([SOS_branch(1, 1) for _ in range(num)])
            self.h = tuple(c // 2 for c in crop)
            self.volume = volume  # the original: 40, 192, 192

        def center_locate(self, heatmap):  # the original's: one argmax over the whole batch
            b, d, w, h = heatmap.shape
            index = int(torch.argmax(heatmap))
            z = index // w // h
            index -= z * w * h
            x = index // h
            y = index - x * h
            (hd, hh, hw), (vd, vh, vw) = self.h, self.volume
            return min(max(z, hd), vd - hd), min(max(x, hh), vh - hh), min(max(y, hw), vw - hw)

        def forward(self, x, heatmap, raw, o1):
            (hd, hh, hw), results, locations = self.h, [], []
            for i, branch in enumerate(self.SOS_module):
                z, u, v = self.center_locate(heatmap[:, i])
                box = (
                    slice(None),
                    slice(None),
                    slice(z - hd, z + hd),
                    slice(u - hh, u + hh),
                    slice(v - hw, v + hw),
                )
                hm = heatmap[:, i : i + 1]
                feat = torch.cat((x[box], o1[box], hm[box], raw[box]), 1).detach()  # 66 channels
                results.append(branch(feat))
                locations.append((z, u, v))
            return locations, torch.cat(results, 1)

    class focus_net(nn.Module):
        def __init__(self, channel, num_classes, SOSNet=False, sol=True, crop=CROP, volume=VOL):
            super().__init__()
            self.SOSNet, self.sol = SOSNet, sol
            self.conv1x = inconv(channel, 32)
            self.maxpool1 = nn.MaxPool3d((1, 2, 2))
            self.conv2x = layer(32, 48)
            self.maxpool2 = nn.MaxPool3d((2, 2, 2))
            self.conv4x = layer(48, 64)
            self.conv4xd2 = layer(64, 64, dilation_rate=(1, 2, 2))
            for k, d in enumerate((3, 6, 12, 18)):
                setattr(self, f"ASPP_{k + 1}", DenseASPPBlock(64 + 32 * k, 64, 32, (1, d, d)))
            self.up1 = up_block(192, 48)
            self.literal1 = nn.Conv3d(48, 48, 3, padding=1)
            self.up2 = up_block(48, 32, (1, 2, 2))
            self.literal2 = nn.Conv3d(32, 32, 3, padding=1)
            self.out_conv = nn.Conv3d(32, num_classes, 1, 1)
            if sol:
                self.SOL = heatmap_pred(32, 3)
            if SOSNet:
                self.SOS = SOSNet_sep(3, crop, volume)

        def forward(self, x):
            o1 = self.conv1x(x)
            o2 = self.conv2x(self.maxpool1(o1))
            o4 = self.conv4xd2(self.conv4x(self.maxpool2(o2)))
            feature = aspp(self, "ASPP_", o4)
            out = self.up1(feature, self.literal1(o2))
            feature_map = self.up2(out, self.literal2(o1))
            result = {"main_result": self.out_conv(feature_map)}
            if self.sol:
                result["heatmap"] = self.SOL(feature_map)
            if self.SOSNet:
                result["location"], result["small_result"] = self.SOS(
                    feature_map, result["heatmap"], x, o1
                )
            return result

    class ConvAE(nn.Module):
        def __init__(self, channel=1, num_classes=1, latent_num=512):
            super().__init__()
            chans = [
                (1, 64, 2),
                (64, 128, 2),
                (128, 128, 1),
                (128, 256, 2),
                (256, 128, 1),
                (128, 128, 1),
                (128, 64, 1),
                (64, 1, 1),
            ]
            for i, (ci, co, s) in enumerate(chans, 1):
                setattr(self, f"conv{i}", nn.Conv3d(ci, co, 5, s, 2))
                if i < 8:
                    setattr(self, f"bn{i}", nn.BatchNorm3d(co))
            self.relu = nn.ReLU()
            self.fc1 = nn.Linear(256 * 8 * 8, latent_num)
            self.fc2 = nn.Linear(latent_num, 256 * 8 * 8)

        def forward(self, x):
            n = x.shape[0]
            for i in range(1, 5):
                x = self.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            code = self.fc1(x.reshape(n, -1))  # the original: view (the same where it works)
            x = self.relu(self.fc2(code).view(n, 256, 1, 8, 8))
            up = functools.partial(
                F.interpolate, scale_factor=2, mode="trilinear", align_corners=True
            )
            x = self.relu(self.bn5(self.conv5(up(x))))
            x1 = self.relu(self.bn6(self.conv6(x)))
            x2 = self.relu(self.bn7(self.conv7(up(x1))))
            return torch.sigmoid(self.conv8(up(x2))), code, None, [x1, x2]

    return dict(torch=torch, focus_net=focus_net, SOS_branch=SOS_branch, ConvAE=ConvAE)


def _randomise_bn(tmod, seed=0):
    torch = _T()["torch"]
    g = torch.Generator().manual_seed(seed)
    for m in tmod.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=g))
    return tmod


def _ncdhw(x):
    return _T()["torch"].from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


def _ndhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def _shapes(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _input(seed=0, b=2):
    return np.random.default_rng(seed).normal(size=(b, *VOL, 1)).astype(np.float32)


def _np_locate(heatmap, crop):
    """NumPy reference: each sample's and organ's argmax, clamped to [c//2, S - c//2]."""
    b, *spatial, n = heatmap.shape
    out = np.zeros((b, n, 3), np.int64)
    for i in range(b):
        for j in range(n):
            c = np.unravel_index(np.argmax(heatmap[i, ..., j]), spatial)
            out[i, j] = [min(max(c[a], crop[a] // 2), spatial[a] - crop[a] // 2) for a in range(3)]
    return out


def _np_crop(x, centre, crop):
    lo = [c - s // 2 for c, s in zip(centre, crop, strict=True)]
    return x[lo[0] : lo[0] + crop[0], lo[1] : lo[1] + crop[1], lo[2] : lo[2] + crop[2]]


# ------------------------------------------------------------------------------------------------
# Fixtures: one torch full model, its import, one jitted eval and train forward


@pytest.fixture(scope="module")
def torch_focus():
    T = _T()
    T["torch"].manual_seed(0)
    return _randomise_bn(T["focus_net"](1, 10, SOSNet=True)).eval()


@pytest.fixture(scope="module")
def imported(torch_focus):
    model = FocusNetV2(crop_size=CROP)
    return model, load_pytorch_weights(torch_focus.state_dict(), model)


@pytest.fixture(scope="module")
def eval_out(imported):
    model, v = imported
    x, thr = _input(), jnp.float32(0)
    apply = jax.jit(lambda v, x, t: model.apply(v, x, heatmap_threshold=t))
    apply = apply.lower(v, x, thr).compile(compiler_options=FAST_COMPILE)
    outs = {t: apply(v, x, jnp.float32(t)) for t in (-np.inf, 2.0)}
    return x, jax.tree.map(np.asarray, outs)


# ------------------------------------------------------------------------------------------------
# Parameter counts and errors (eval_shape only)


def test_parameter_counts_equal_the_originals():
    sh = (1, 2, 8, 8, 1)
    assert _count(_shapes(FocusNetV2(sol=False, sos=False), sh)["params"]) == 1_963_114
    assert _count(_shapes(FocusNetV2(sos=False), sh)["params"]) == 2_018_637
    assert _count(_shapes(FocusNetV2(sos=False, norm="instance"), sh)["params"]) == 2_014_157
    assert _count(_shapes(HeatmapHead(3), (1, 2, 4, 4, 32))["params"]) == 55_523
    assert _count(_shapes(SOSBranch(), (1, 2, 4, 4, 1))["params"]) == 1_610_031
    full = _shapes(FocusNetV2(), (1, 8, 64, 64, 1))
    assert _count(full["params"]) == 6_848_730 == 2_018_637 + 3 * 1_610_031
    # The organs are one vmapped axis of stacked branch parameters.
    assert full["params"]["SOS"]["out_conv"]["kernel"].shape == (3, 1, 1, 1, 32, 1)
    assert full["batch_stats"]["SOS"]["share_conv1x"]["conv2"]["norm1"]["mean"].shape == (3, 24)
    assert _count(_shapes(ConvAE(), (1, 8, 64, 64, 1))["params"]) == 31_148_801


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(sos=False), (1, 3, 8, 8, 1), "D even"),
        (dict(sos=False), (1, 2, 6, 8, 1), "multiples of 4"),
        (dict(sos=False), (1, 2, 8, 8, 2), "1 input channels"),
        (dict(sos=False), (1, 8, 8, 1), r"\(B, D, H, W, C\)"),
        (dict(), (1, 8, 32, 64, 1), "at least crop_size"),
        (dict(crop_size=(3, 8, 8)), (1, 8, 64, 64, 1), "crop_size"),
        (dict(sol=False), (1, 8, 64, 64, 1), "needs the SOL heatmaps"),
        (dict(small_organs=(2, 10, 5)), (1, 8, 64, 64, 1), "small_organs"),
    ],
)
def test_input_constraints_raise(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        _shapes(FocusNetV2(**kwargs), shape)


@pytest.mark.parametrize("shape", [(1, 8, 64, 32, 1), (1, 4, 64, 64, 1), (1, 8, 64, 64, 2)])
def test_convae_needs_exactly_8x64x64(shape):
    with pytest.raises(ValueError, match="8, 64, 64, 1"):
        _shapes(ConvAE(), shape)


# ------------------------------------------------------------------------------------------------
# The full FocusNetV2 against the torch re-creation


@pytest.mark.reference
def test_eval_matches_torch_per_sample(torch_focus, eval_out):
    """Batch 2 in medjax equals the original run on each sample alone (batch 1, where it is right)."""
    x, outs = eval_out
    out = outs[-np.inf]
    torch = _T()["torch"]
    with torch.no_grad():
        whole = torch_focus(_ncdhw(x))
        for b in range(2):
            t = torch_focus(_ncdhw(x[b : b + 1]))
            np.testing.assert_array_equal(out["location"][b], np.asarray(t["location"]))
            chex.assert_trees_all_close(
                out["small_result"][b],
                t["small_result"][0].numpy()[..., None],
                atol=ATOL,
                rtol=RTOL,
            )
    chex.assert_trees_all_close(
        out["main_result"], _ndhwc(whole["main_result"]), atol=ATOL, rtol=RTOL
    )
    chex.assert_trees_all_close(out["heatmap"], _ndhwc(whole["heatmap"]), atol=ATOL, rtol=RTOL)
    assert out["small_result"].shape == (2, 3, *CROP, 1)
    assert out["location"].shape == (2, 3, 3) and out["location"].dtype == np.int32


def test_each_sample_gets_its_own_crop(eval_out, torch_focus):
    x, outs = eval_out
    out = outs[-np.inf]
    ref = _np_locate(out["heatmap"], CROP)
    np.testing.assert_array_equal(out["location"], ref)
    assert (ref[0] != ref[1]).any(), "the test needs different per-sample peaks"
    # Each crop is the sample's own image box, segmented by its organ's branch.
    torch = _T()["torch"]
    for b in range(2):
        for j in range(3):
            crop = _np_crop(x[b], ref[b, j], CROP)[None]
            with torch.no_grad():
                t = torch_focus.SOS.SOS_module[j](_ncdhw(crop))
            chex.assert_trees_all_close(
                out["small_result"][b, j], _ndhwc(t)[0], atol=ATOL, rtol=RTOL
            )


def _np_refine(main, small, location, organs, mask):
    out = main.copy()
    for b in range(main.shape[0]):
        for j, lab in enumerate(organs):
            if not mask[b, j]:
                continue
            lo = [c - s // 2 for c, s in zip(location[b, j], CROP, strict=True)]
            box = out[b, lo[0] : lo[0] + CROP[0], lo[1] : lo[1] + CROP[1], lo[2] : lo[2] + CROP[2]]
            others = np.delete(box, lab, axis=-1).max(-1)
            box[..., lab] = others + small[b, j, ..., 0]
    return out


def test_refined_pastes_each_organ_and_threshold_skips(eval_out):
    _, outs = eval_out
    out = outs[-np.inf]
    assert out["refined_mask"].all()
    ref = _np_refine(
        out["main_result"], out["small_result"], out["location"], ORGANS, out["refined_mask"]
    )
    np.testing.assert_allclose(out["refined"], ref, atol=1e-6)
    # Inside the last organ's box, its class is the argmax exactly where its crop logit is > 0.
    b, j = 0, 2
    lo = out["location"][b, j] - np.asarray(CROP) // 2
    box = out["refined"][b, lo[0] : lo[0] + 2, lo[1] : lo[1] + 8, lo[2] : lo[2] + 8]
    np.testing.assert_array_equal(box.argmax(-1) == 5, out["small_result"][b, j, ..., 0] > 0)
    # No heatmap peak is above 2: nothing is pasted, and nothing breaks.
    none = outs[2.0]
    assert not none["refined_mask"].any()
    np.testing.assert_array_equal(none["refined"], none["main_result"])
    np.testing.assert_array_equal(none["small_result"], out["small_result"])


@pytest.mark.reference
def test_train_mode_matches_torch(torch_focus, imported):
    """Batch statistics: S-Net + SOL on the batch, each branch on its organ's batch of crops."""
    model, v = imported
    x = _input(1)
    out, upd = _compiled(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), v, x)
    out = jax.tree.map(np.asarray, out)
    tnet = copy.deepcopy(torch_focus).train()
    tnet.SOSNet = False  # the original's batch-global crop differs; branches are checked below
    t = tnet(_ncdhw(x))
    chex.assert_trees_all_close(out["main_result"], _ndhwc(t["main_result"]), atol=ATOL, rtol=RTOL)
    chex.assert_trees_all_close(out["heatmap"], _ndhwc(t["heatmap"]), atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(out["location"], _np_locate(out["heatmap"], CROP))
    for j in range(3):
        crops = np.stack([_np_crop(x[b], out["location"][b, j], CROP) for b in range(2)])
        tj = tnet.SOS.SOS_module[j](_ncdhw(crops))
        chex.assert_trees_all_close(out["small_result"][:, j], _ndhwc(tj), atol=ATOL, rtol=RTOL)
    # Running statistics after the step, in the trunk and in branch 1.
    chex.assert_trees_all_close(
        np.asarray(upd["batch_stats"]["up2"]["block"]["norm1"]["var"]),
        tnet.up2.conv[0].conv.bn1.running_var.numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    chex.assert_trees_all_close(
        np.asarray(upd["batch_stats"]["SOS"]["share_aspp"]["branch_3"]["conv"]["norm"]["mean"][1]),
        tnet.SOS.SOS_module[1].share_ASPP_4.norm_2.running_mean.numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


# ------------------------------------------------------------------------------------------------
# Localisation: the original's rule at batch 1 and 40x192x192, per sample otherwise


def _original_center_locate(heatmap_ncdhw, i, crop=(8, 64, 64), volume=(40, 192, 192)):
    """A literal NumPy port of ``SOSNet_sep.center_locate`` (one argmax over the whole batch)."""
    hm = heatmap_ncdhw[:, i]
    b, d, w, h = hm.shape
    index = int(np.argmax(hm))
    z = index // w // h
    index -= z * w * h
    x = index // h
    y = index - x * h
    (hd, hh, hw), (vd, vh, vw) = [c // 2 for c in crop], volume
    return min(max(z, hd), vd - hd), min(max(x, hh), vh - hh), min(max(y, hw), vw - hw)


def test_locate_equals_original_at_batch_1():
    rng = np.random.default_rng(0)
    hm = rng.random((2, 40, 192, 192, 3), dtype=np.float32) * 0.5
    peaks = [[(10, 100, 100), (0, 3, 190), (39, 150, 20)], [(38, 5, 5), (20, 96, 96), (2, 191, 40)]]
    for b in range(2):
        for j in range(3):
            hm[(b, *peaks[b][j], j)] = 0.9
    loc, peak = locate_small_organs(jnp.asarray(hm), (8, 64, 64))
    loc = np.asarray(loc)
    for b in range(2):
        nc = np.moveaxis(hm[b : b + 1], -1, 1)
        for j in range(3):
            assert tuple(loc[b, j]) == _original_center_locate(nc, j)
    np.testing.assert_allclose(np.asarray(peak), 0.9)
    assert tuple(loc[0, 1]) == (4, 32, 160) and tuple(loc[1, 0]) == (36, 32, 32)
    # The original at batch 2 takes one argmax over the batch: sample 1 gets sample 0's peak, and
    # (ORIGINALS.md's check) a lone peak at (10, 100, 100) in sample 1 comes back as (36, 100, 100).
    both = np.moveaxis(hm, -1, 1)
    assert _original_center_locate(both, 0) == (10, 100, 100) != tuple(loc[1, 0]) == (36, 32, 32)
    lone = np.zeros((2, 40, 192, 192, 1), np.float32)
    lone[1, 10, 100, 100] = 1.0
    assert _original_center_locate(np.moveaxis(lone, -1, 1), 0) == (36, 100, 100)
    assert tuple(np.asarray(locate_small_organs(lone, (8, 64, 64))[0])[1, 0]) == (10, 100, 100)
    # No gradient flows into the centre choice.
    g = jax.grad(lambda h: locate_small_organs(h, (2, 8, 8))[1].sum())(jnp.ones((1, 4, 16, 16, 3)))
    assert not np.asarray(g).any()


def test_crop_small_labels_is_the_original_small_label():
    lab = np.zeros((2, *VOL), np.int32)
    lab[0, 1, 3, 4] = 2
    lab[1, 2, 10, 12] = 5
    lab[1, 2, 10, 13] = 4
    loc = np.asarray([[[1, 4, 4]] * 3, [[2, 12, 12]] * 3], np.int32)
    crops = np.asarray(crop_small_labels(lab, loc, ORGANS, CROP))
    assert crops.shape == (2, 3, *CROP, 1)
    assert crops[0, 0, 1, 3, 4, 0] == 1 and crops[0].sum() == 1
    assert crops[1, 2, 1, 2, 4, 0] == 1 and crops[1, 1, 1, 2, 5, 0] == 1 and crops[1].sum() == 2


def test_paste_small_organs_overlap_and_mask():
    logits = np.zeros((1, 2, 4, 4, 6), np.float32)
    logits[..., 1] = 1.0  # class 1 everywhere
    small = np.full((1, 2, 2, 4, 4, 1), -1.0, np.float32)
    small[0, 0, 0, 0, 0, 0] = small[0, 1, 0, 0, 0, 0] = 3.0  # both organs claim voxel (0, 0, 0)
    small[0, 0, 1, 1, 1, 0] = 2.0
    loc = np.asarray([[[1, 2, 2], [1, 2, 2]]], np.int32)
    out = np.asarray(paste_small_organs(logits, small, loc, (2, 4)))
    lab = out.argmax(-1)[0]
    assert lab[0, 0, 0] == 4 and lab[1, 1, 1] == 2  # the later organ wins an overlap
    assert (lab[0, 1:] == 1).all() and out[0, 0, 1, 1, 2] == out[0, 0, 1, 1, 1] - 1.0
    same = paste_small_organs(logits, small, loc, (2, 4), mask=np.asarray([[False, False]]))
    np.testing.assert_array_equal(np.asarray(same), logits)


# ------------------------------------------------------------------------------------------------
# Checkpoint import


def test_import_detects_each_checkpoint_and_strips_dataparallel(torch_focus, imported):
    _, v = imported
    sd = {k: t.numpy() for k, t in torch_focus.state_dict().items()}
    model, v2 = focusnet_from_state_dict({"module." + k: a for k, a in sd.items()}, crop_size=CROP)
    assert (model.sol, model.sos, model.num_classes, model.norm) == (True, True, 10, "batch")
    chex.assert_trees_all_equal(v, v2)
    sol_only = {k: a for k, a in sd.items() if not k.startswith("SOS.")}
    m, vs = focusnet_from_state_dict(sol_only)
    assert (m.sol, m.sos) == (True, False)
    s_net = {k: a for k, a in sol_only.items() if not k.startswith("SOL.")}
    m, vs = focusnet_from_state_dict(s_net)
    assert (m.sol, m.sos) == (False, False)
    chex.assert_trees_all_equal(vs["params"]["up2"], v["params"]["up2"])
    # One SOS_branch state_dict is branch 1 of the stacked organ axis.
    p = "SOS.SOS_module.1."
    m, vb = focusnet_from_state_dict({k[len(p) :]: a for k, a in sd.items() if k.startswith(p)})
    assert isinstance(m, SOSBranch)
    chex.assert_trees_all_equal(vb, jax.tree.map(lambda a: a[1], {c: v[c]["SOS"] for c in v}))


def test_mismatched_checkpoints_are_refused(torch_focus):
    sd = {k: t.numpy() for k, t in torch_focus.state_dict().items() if not k.startswith("SOS.")}
    bad = dict(sd)
    bad["up1.conv.0.conv.conv1.weight"] = bad["up1.conv.0.conv.conv1.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"up1/block/conv1/kernel has shape"):
        load_pytorch_weights(bad)
    missing = {k: a for k, a in sd.items() if k != "ASPP_2.conv_2.weight"}
    with pytest.raises(ValueError, match="ASPP_2.conv_2.weight"):
        load_pytorch_weights(missing)
    extra = dict(sd, **{"SOL.conv4.weight": sd["SOL.conv3.weight"]})
    with pytest.raises(ValueError, match="SOL.conv4.weight"):
        load_pytorch_weights(extra)
    with pytest.raises(ValueError, match="not a FocusNetV2 checkpoint"):
        load_pytorch_weights({"encoder.weight": np.zeros((1, 1))})
    with pytest.raises(ValueError, match="sos=False"):
        load_pytorch_weights(sd, FocusNetV2())


def test_spec_covers_every_key(torch_focus):
    keys = {k for k in torch_focus.state_dict() if not k.endswith("num_batches_tracked")}
    spec = torch_spec(FocusNetV2())
    covered = {
        f"{t}.{s}" for _, t, kind in spec for s in ("weight", "bias", "running_mean", "running_var")
    }
    assert keys <= covered
    assert len(spec) == len({t for _, t, _ in spec})


# ------------------------------------------------------------------------------------------------
# ConvAE


@pytest.mark.reference
def test_convae_matches_torch_eval_and_train():
    T = _T()
    T["torch"].manual_seed(1)
    tae = _randomise_bn(T["ConvAE"](1, 1, 512))
    model = ConvAE()
    v = load_pytorch_weights({"module." + k: a for k, a in tae.state_dict().items()})
    x = (np.random.default_rng(2).random((1, 8, 64, 64, 1)) > 0.7).astype(np.float32)

    def run(v, x):
        out = model.apply(v, x)
        d = model.apply(v, x, return_dict=True)
        logits = model.apply(v, model.apply(v, x, method=ConvAE.encode), method=ConvAE.decode)
        train, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        return out, d, logits, train, upd

    (recon, code, none, (x1, x2)), d, logits, train, upd = _compiled(run, v, x)
    assert none is None
    tae.eval()
    with T["torch"].no_grad():
        trec, tcode, _, (tx1, tx2) = tae(_ncdhw(x))
    close = functools.partial(chex.assert_trees_all_close, atol=ATOL, rtol=RTOL)
    close(np.asarray(recon), _ndhwc(trec))
    close(np.asarray(code), tcode.numpy())
    close(np.asarray(x1), _ndhwc(tx1))
    close(np.asarray(x2), _ndhwc(tx2))
    assert x1.shape == (1, 2, 16, 16, 128) and x2.shape == (1, 4, 32, 32, 64)
    chex.assert_trees_all_equal(d, {"recon": recon, "code": code, "features": [x1, x2]})
    close(np.asarray(jax.nn.sigmoid(logits)), np.asarray(recon))
    tae.train()
    trec, tcode, _, (tx1, tx2) = tae(_ncdhw(x))
    close(np.asarray(train[0]), _ndhwc(trec))
    close(np.asarray(train[1]), tcode.detach().numpy())
    close(np.asarray(train[3][1]), _ndhwc(tx2))
    close(np.asarray(upd["batch_stats"]["bn4"]["var"]), tae.bn4.running_var.numpy())


def test_sos_branches_take_another_gradient_lowering_on_cpu(monkeypatch):
    """The SOS branches, vmapped over organs, take forward-form gradients on CPU (XLA:CPU runs a
    grouped convolution's gradient several times slower). That those gradients equal XLA's under
    vmap is tests/nn/test_conv.py's."""
    from medjax.models.focusnet import SOSBranches
    from medjax.nn import conv as mconv

    model = SOSBranches(1, features=(4, 4, 6, 8), aspp_features=(4, 4))
    crops = jax.ShapeDtypeStruct((2, 1, 2, 8, 8, 1), jnp.float32)
    v = jax.eval_shape(lambda k, c: model.init(k, c, False), jax.random.key(0), crops)

    def loss(p, x):
        y, _ = model.apply({**v, "params": p}, x, True, mutable=["batch_stats"])
        return jnp.sum(y)

    texts = {}
    for enabled in (True, False):  # the suite runs with XLA's convolution (False)
        monkeypatch.setattr(mconv, "enabled", enabled)
        texts[enabled] = jax.jit(jax.grad(loss)).lower(v["params"], crops).as_text()
    # XLA's weight gradient of a per-organ convolution is a batch-grouped convolution (the slow
    # one); the forward-form gradients have none
    assert "batch_group_count = 2" in texts[False]
    assert "batch_group_count = 2" not in texts[True]
