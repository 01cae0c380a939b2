"""UniverSeg: parameter count, init, weight import parity with a PyTorch re-creation, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.universeg import (
    UniverSeg,
    UniverSeg3D,
    load_pytorch_weights,
    predict,
    predict_ensemble,
    predict_multiclass,
    segment_volume_2d,
)
from tests.conftest import require_reference

TINY = dict(encoder_features=(4, 4, 4, 4))


def _inputs(seed, b=1, s=2, hw=(16, 16)):
    rng = np.random.default_rng(seed)
    q = rng.random((b, *hw, 1), dtype=np.float32)
    si = rng.random((b, s, *hw, 1), dtype=np.float32)
    sl = (rng.random((b, s, *hw, 1)) > 0.5).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(si), jnp.asarray(sl)


def _np_params(model, *inputs, seed=0):
    """Random parameters of the right tree and shapes, drawn on the host (no PRNG compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)

    def draw(s):
        fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 10
        return jnp.asarray(rng.normal(size=s.shape) * math.sqrt(2.0 / fan_in), jnp.float32)

    return jax.tree.map(draw, shapes)


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_default_parameter_count_is_exact():
    shapes_in = [(1, 128, 128, 1), (1, 4, 128, 128, 1), (1, 4, 128, 128, 1)]
    q, si, sl = (jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes_in)
    shapes = jax.eval_shape(UniverSeg().init, jax.random.key(0), q, si, sl)
    assert _count(shapes) == 1_182_785
    p = shapes["params"]
    assert sorted(p) == ["dec_0", "dec_1", "dec_2", "enc_0", "enc_1", "enc_2", "enc_3", "head"]
    assert p["enc_0"]["cross"]["kernel"].shape == (3, 3, 3, 64)  # query (1) + image/label (2)
    assert p["dec_0"]["cross"]["kernel"].shape == (3, 3, 256, 64)  # [up || skip] x (query, support)
    assert p["head"]["kernel"].shape == (1, 1, 64, 1)


def test_init_kaiming_gains_and_zero_bias():
    q, si, sl = _inputs(1, hw=(8, 8), s=1)
    p = jax.jit(UniverSeg().init)(jax.random.key(2, impl="rbg"), q, si, sl)["params"]
    # enc_1 cross conv: fan_in = 9 * 128, linear gain; enc_1 query conv: fan_in = 9 * 64, gain sqrt(2)
    np.testing.assert_allclose(np.std(p["enc_1"]["cross"]["kernel"]), np.sqrt(1 / 1152), rtol=0.03)
    np.testing.assert_allclose(
        np.std(p["enc_1"]["query_conv"]["kernel"]), np.sqrt(2 / 576), rtol=0.03
    )
    np.testing.assert_allclose(np.std(p["dec_0"]["cross"]["kernel"]), np.sqrt(1 / 2304), rtol=0.03)
    for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(p):
        if leaf_path[-1].key == "bias":
            assert not np.any(np.asarray(leaf))


def _torch_universeg(torch, features=(64, 64, 64, 64)):
    """PyTorch re-creation of JJGO/UniverSeg v1 with the official module names (state_dict keys)."""
    tnn = torch.nn

    class ConvOp(tnn.Sequential):
        def __init__(self, cin, cout, k=3, act=True):
            super().__init__()
            self.conv = tnn.Conv2d(cin, cout, k, padding=k // 2)
            if act:
                self.nonlin = tnn.LeakyReLU()

    class Vmap(tnn.Module):
        def __init__(self, module):
            super().__init__()
            self.vmapped = module

        def forward(self, x):
            b, s = x.shape[:2]
            return self.vmapped(x.flatten(0, 1)).unflatten(0, (b, s))

    class CrossConv2d(tnn.Conv2d):
        def forward(self, x, y):  # x (B, 1, Cx, H, W), y (B, S, Cy, H, W) -> (B, S, Co, H, W)
            b, s = y.shape[:2]
            xy = torch.cat([x.expand(-1, s, -1, -1, -1), y], dim=2)
            return super().forward(xy.flatten(0, 1)).unflatten(0, (b, s))

    class CrossOp(tnn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.cross_conv = CrossConv2d(sum(cin), cout, 3, padding=1)

        def forward(self, target, support):
            z = self.cross_conv(target, support)
            return z.mean(dim=1, keepdim=True), z

    class CrossBlock(tnn.Module):
        def __init__(self, cin, c):
            super().__init__()
            self.cross = CrossOp(cin, c)
            self.target = Vmap(ConvOp(c, c))
            self.support = Vmap(ConvOp(c, c))

        def forward(self, target, support):
            target, support = self.cross(target, support)
            return self.target(target), self.support(support)

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.downsample = tnn.MaxPool2d(2, 2)
            self.upsample = tnn.UpsamplingBilinear2d(scale_factor=2)
            self.enc_blocks = tnn.ModuleList()
            self.dec_blocks = tnn.ModuleList()
            cin, skips = (1, 2), []
            for c in features:
                self.enc_blocks.append(CrossBlock(cin, c))
                cin = (c, c)
                skips.append(c)
            for c, sk in zip(features[-2::-1], skips[-2::-1], strict=True):
                self.dec_blocks.append(CrossBlock((cin[0] + sk, cin[1] + sk), c))
                cin = (c, c)
            self.out_conv = ConvOp(cin[0], 1, k=1, act=False)

        def forward(self, target_image, support_images, support_labels):
            vm = lambda f, x: f(x.flatten(0, 1)).unflatten(0, x.shape[:2])
            target = target_image[:, None]
            support = torch.cat([support_images, support_labels], dim=2)
            skips = []
            for i, block in enumerate(self.enc_blocks):
                target, support = block(target, support)
                if i == len(self.enc_blocks) - 1:
                    break
                skips.append((target, support))
                target, support = vm(self.downsample, target), vm(self.downsample, support)
            for block in self.dec_blocks:
                ts, ss = skips.pop()
                target = torch.cat([vm(self.upsample, target), ts], dim=2)
                support = torch.cat([vm(self.upsample, support), ss], dim=2)
                target, support = block(target, support)
            return self.out_conv(target[:, 0])

    net = Net()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.named_parameters():
            if name.endswith("weight"):
                fan_in = t.shape[1] * t.shape[2] * t.shape[3]
                t.copy_(torch.randn(t.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    return net.eval()


@pytest.mark.reference
def test_load_pytorch_weights_matches_torch_recreation(tmp_path):
    torch = require_reference("torch")
    net = _torch_universeg(torch)
    sd = net.state_dict()
    assert sum(v.numel() for v in sd.values()) == 1_182_785
    assert "enc_blocks.0.cross.cross_conv.weight" in sd
    assert "dec_blocks.2.target.vmapped.conv.bias" in sd
    assert "out_conv.conv.weight" in sd

    rng = np.random.default_rng(0)
    q = rng.random((2, 32, 32, 1), dtype=np.float32)
    si = rng.random((2, 3, 32, 32, 1), dtype=np.float32)
    sl = (rng.random((2, 3, 32, 32, 1)) > 0.5).astype(np.float32)
    with torch.no_grad():
        ref = net(
            torch.from_numpy(q.transpose(0, 3, 1, 2)),
            torch.from_numpy(si.transpose(0, 1, 4, 2, 3)),
            torch.from_numpy(sl.transpose(0, 1, 4, 2, 3)),
        ).numpy()
    ref = ref.transpose(0, 2, 3, 1)

    model = UniverSeg()
    params = load_pytorch_weights(sd)
    init_shapes = jax.eval_shape(model.init, jax.random.key(0), q, si, sl)
    assert jax.tree.structure(params) == jax.tree.structure(init_shapes)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init_shapes)
    apply = jax.jit(model.apply)
    out = np.asarray(apply(params, q, si, sl))
    assert np.std(ref) > 1e-2  # a non-trivial output
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)

    # the same weights from a .pt file and from an .npz of the same keys
    pt = tmp_path / "universeg_v1.pt"
    torch.save(sd, pt)
    npz = tmp_path / "universeg_v1.npz"
    np.savez(npz, **{k: v.numpy() for k, v in sd.items()})
    for src in (pt, str(npz)):
        out2 = np.asarray(apply(load_pytorch_weights(src), q, si, sl))
        np.testing.assert_allclose(out2, out, atol=1e-6)
    # wrapped once more, as a bare params tree would be, the weights work too
    out3 = np.asarray(jax.jit(model.apply)({"params": params}, q, si, sl))
    np.testing.assert_allclose(out3, out, atol=1e-6)


def test_load_pytorch_weights_rejects_wrong_keys():
    with pytest.raises(ValueError, match="enc_blocks"):
        load_pytorch_weights({"conv.weight": np.zeros((1, 1, 3, 3))})
    with pytest.raises(ValueError, match="does not exist"):
        load_pytorch_weights("/nonexistent/universeg.pt")


@pytest.fixture(scope="module")
def tiny():
    model = UniverSeg(**TINY)
    q, si, sl = _inputs(3, b=2, s=3)
    params = _np_params(model, q, si, sl)
    return model, params, (q, si, sl)


def test_forward_shape_any_support_size_and_permutation_invariance(tiny):
    model, params, (q, si, sl) = tiny
    apply = jax.jit(model.apply)
    out = apply(params, q, si, sl)
    assert out.shape == (2, 16, 16, 1) and out.dtype == jnp.float32
    perm = np.array([2, 0, 1])
    np.testing.assert_allclose(
        np.asarray(apply(params, q, si[:, perm], sl[:, perm])), np.asarray(out), atol=1e-5
    )
    one = apply(params, q, si[:, :1], sl[:, :1])  # the same params serve any support size
    assert one.shape == out.shape and not np.allclose(one, out)
    # duplicating every support element leaves the mean, hence the output, unchanged
    dup = apply(params, q, jnp.concatenate([si, si], 1), jnp.concatenate([sl, sl], 1))
    np.testing.assert_allclose(np.asarray(dup), np.asarray(out), atol=1e-5)


def test_input_errors(tiny):
    model, params, (q, si, sl) = tiny
    with pytest.raises(ValueError, match="support_images"):
        model.apply(params, q, si[:, :, :8], sl[:, :, :8])  # wrong spatial size
    with pytest.raises(ValueError, match="support_images"):
        model.apply(params, q, si[:, 0], sl[:, 0])  # missing the support axis
    with pytest.raises(ValueError, match="one label per support image"):
        model.apply(params, q, si, sl[:, :2])
    with pytest.raises(ValueError, match="empty"):
        model.apply(params, q, si[:, :0], sl[:, :0])
    with pytest.raises(ValueError, match="binary"):
        model.apply(params, q, si, sl * 3.0)
    with pytest.raises(ValueError, match=r"binary masks with values 0 and 1 .* e.g. \[0.5\]"):
        model.apply(params, q, si, sl * 0.5)  # a soft (e.g. resized) mask inside [0, 1]
    with pytest.raises(ValueError, match="query"):
        model.apply(params, q[..., :12, :], si, sl)


def test_predict_ensemble_and_multiclass(tiny):
    model, params, (q, si, sl) = tiny
    p = predict(params, q, si, sl, model=model)
    np.testing.assert_allclose(
        np.asarray(p), np.asarray(jax.nn.sigmoid(jax.jit(model.apply)(params, q, si, sl)))
    )
    # subsets of the full size are permutations: the ensemble equals the plain prediction
    pe = predict_ensemble(
        params, q, si, sl, key=jax.random.key(0), num_subsets=3, subset_size=3, model=model
    )
    np.testing.assert_allclose(np.asarray(pe), np.asarray(p), atol=1e-5)
    # subsets of size 1: the mean of the single-element predictions it drew
    pe1 = predict_ensemble(
        params, q, si, sl, key=jax.random.key(0), num_subsets=2, subset_size=1, model=model
    )
    singles = [
        np.asarray(predict(params, q, si[:, i : i + 1], sl[:, i : i + 1], model=model))
        for i in range(3)
    ]
    candidates = [(singles[i] + singles[j]) / 2 for i in range(3) for j in range(3)]
    assert min(np.abs(np.asarray(pe1) - c).max() for c in candidates) < 1e-5

    label_map = jnp.round(si * 2.0) * (sl > 0)  # values {0, 1, 2}
    pred = predict_multiclass(params, q, si, label_map, labels=(1, 2), model=model, threshold=0.5)
    p1 = np.asarray(predict(params, q, si, (label_map == 1).astype(jnp.float32), model=model))[
        ..., 0
    ]
    p2 = np.asarray(predict(params, q, si, (label_map == 2).astype(jnp.float32), model=model))[
        ..., 0
    ]
    ref = np.where(np.maximum(p1, p2) > 0.5, np.where(p2 > p1, 2, 1), 0)
    np.testing.assert_array_equal(np.asarray(pred), ref)


def test_segment_volume_2d_equals_per_slice_loop(tiny):
    model, params, _ = tiny
    rng = np.random.default_rng(1)
    vol = rng.random((16, 5, 16), dtype=np.float32)
    si = rng.random((2, 16, 16, 1), dtype=np.float32)
    sl = (rng.random((2, 16, 16, 1)) > 0.5).astype(np.float32)
    out = segment_volume_2d(model, params, vol, si, sl, axis=1, batch_size=2)
    assert out.shape == vol.shape
    apply = jax.jit(model.apply)
    for k in range(5):
        ref = jax.nn.sigmoid(apply(params, vol[None, :, k, :, None], si[None], sl[None]))
        np.testing.assert_allclose(np.asarray(out[:, k, :]), np.asarray(ref[0, ..., 0]), atol=1e-5)
    with pytest.raises(ValueError, match="support_images"):
        segment_volume_2d(model, params, vol, si, sl, axis=0)  # slices are 5x16, support 16x16


def test_universeg3d_native_volume():
    model = UniverSeg3D(encoder_features=(4, 4, 4))
    q, si, sl = _inputs(5, b=1, s=2, hw=(8, 8, 8))
    params = _np_params(model, q, si, sl)
    assert params["params"]["enc_0"]["cross"]["kernel"].shape == (3, 3, 3, 3, 4)
    out = jax.jit(model.apply)(params, q, si, sl)
    assert out.shape == (1, 8, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
    out_perm = jax.jit(model.apply)(params, q, si[:, ::-1], sl[:, ::-1])
    np.testing.assert_allclose(np.asarray(out_perm), np.asarray(out), atol=1e-5)
