"""PnP-AdaNet: counts against ORIGINALS.md's hand counts, the DAM split, critics, ops.PS order, padding.

The original is TensorFlow 1 (not runnable here), so the references are ORIGINALS.md section 3's
per-scope counts and NumPy transcriptions of the TF ops written below.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medjax.nn.conv as medjax_conv
from medjax.models.pnp_adanet import (
    PnPAdaNet,
    PnPAdaNetBack,
    PnPAdaNetCritic,
    PnPAdaNetFront,
    PnPAdaNetMaskCritic,
    clip_critic_weights,
    clip_mask,
    critic_inputs,
    dam_params_from_segmenter,
    tf_pixel_shuffle,
)
from medjax.nn.layers import Conv
from medjax.ops import pixel_shuffle

S = jax.ShapeDtypeStruct
F32 = jnp.float32

# ORIGINALS.md 3.1: conv weights and BN channels per group at f = 16.
SEGMENTER_TABLE = {
    "group_1": (5_040, 16 + 16),
    "group_2": (13_824, 32 + 32),
    "group_3": (129_024, 4 * 64),
    "group_4": (516_096, 4 * 128),
    "group_5": (2_064_384, 4 * 256),
    "group_6": (2_359_296, 4 * 256),
    "group_7": (8_257_536, 4 * 512),
    "group_8": (9_437_184, 4 * 512),
    "group_9": (4_718_592, 2 * 512),
    "group_10": (11_796_480, 0),
    "output": (5_000, 0),
}
# ORIGINALS.md 3.2 / 3.3: weights and trainable BN parameters per scope.
CRITIC_TABLE = {
    "cls_1": (92_160, 384),
    "cls_2": (630_784, 768),
    "cls_3": (1_474_560, 1_536),
    "cls_4": (5_898_240, 3_072),
    "cls_5": (11_272_192, 3_072),
    "cls_6": (2_359_296, 1_024),
    "cls_out": (2_048, 0),
}
MASK_CRITIC_TABLE = {
    "mask_cls_1": (720, 32),
    "mask_cls_2": (17_408, 128),
    "mask_cls_3": (260_096, 512),
    "mask_cls_4": (819_200, 512),
    "m_cls_out": (1_024, 0),
}


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _split_count(tree):
    """(kernel values, BN scale/bias values) of a params subtree."""
    kern = bn = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = path[-1].key
        assert name in ("kernel", "scale", "bias"), path
        if name == "kernel":
            kern += math.prod(leaf.shape)
        else:
            bn += math.prod(leaf.shape)
    return kern, bn


def _shapes(model, *args, **kwargs):
    return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)


def _np_variables(model, *args, seed=0, **kwargs):
    """Random variables of the model's tree, drawn on the host (BN statistics randomised too)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            v = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        elif name == "var":
            v = rng.uniform(0.5, 1.5, s.shape)
        else:
            v = rng.normal(size=s.shape) * 0.1 + (name == "scale")
        return jnp.asarray(v, F32)

    return jax.tree_util.tree_map_with_path(draw, _shapes(model, *args, **kwargs))


@pytest.fixture
def xla_convs():
    """Whole-network tests compile with lax convolutions (the CPU lowering only slows compiles)."""
    old = medjax_conv.enabled
    medjax_conv.enabled = False
    yield
    medjax_conv.enabled = old


# ------------------------------------------------------------------------------------------------
# Parameter counts (eval_shape only)


def test_segmenter_counts_group_by_group():
    v = _shapes(PnPAdaNet(), S((1, 256, 256, 3), F32))
    p = v["params"]
    assert p.keys() == SEGMENTER_TABLE.keys()
    for name, (weights, bn_channels) in SEGMENTER_TABLE.items():
        assert _split_count(p[name]) == (weights, 2 * bn_channels), name
    assert _split_count(p) == (39_302_456, 16_064)
    assert _count(p) == 39_318_520
    assert _count(v["batch_stats"]) == 16_064
    # TF names, creation order: group_1/Variable [3,3,3,16], output/Variable [5,5,40,5]
    assert p["group_1"]["conv"]["kernel"].shape == (3, 3, 3, 16)
    assert p["group_1"]["block_1"]["conv1"]["kernel"].shape == (3, 3, 16, 16)
    assert p["group_2"]["block_1"]["conv1"]["kernel"].shape == (3, 3, 16, 32)
    assert p["group_9"]["conv_2"]["conv"]["kernel"].shape == (3, 3, 512, 512)
    assert p["group_10"]["conv"]["kernel"].shape == (3, 3, 512, 2560)
    assert p["output"]["kernel"].shape == (5, 5, 40, 5)


def test_dam_and_back_share_the_segmenter_paths():
    full = _shapes(PnPAdaNet(), S((1, 64, 64, 3), F32))
    front = _shapes(PnPAdaNetFront(depth=6), S((1, 64, 64, 3), F32))
    assert _count(front["params"]) == 5_093_488  # ORIGINALS 3.1: the DAM adapt_1..adapt_6
    assert _split_count(front["params"]) == (5_087_664, 5_824)
    assert front["params"].keys() == {f"group_{k}" for k in range(1, 7)}
    back = _shapes(PnPAdaNetBack(depth=6), S((1, 8, 8, 256), F32))
    assert back["params"].keys() == {"group_7", "group_8", "group_9", "group_10", "output"}
    paths = lambda t: {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    for col in ("params", "batch_stats"):
        assert paths(front[col]) | paths(back[col]) == paths(full[col])
        assert not paths(front[col]) & paths(back[col])
    dam = jax.eval_shape(lambda v: dam_params_from_segmenter(v, 6), full)
    assert jax.tree.map(lambda s: s.shape, dam) == jax.tree.map(lambda s: s.shape, front)


def test_critic_counts_scope_by_scope():
    p = _shapes(PnPAdaNetCritic(), S((2, 256, 256, 32), F32))
    assert list(p) == ["params"]  # batch statistics only: no running statistics
    p = p["params"]
    assert p.keys() == CRITIC_TABLE.keys()
    for name, counts in CRITIC_TABLE.items():
        assert _split_count(p[name]) == counts, name
    assert _count(p) == 21_739_136
    assert p["cls_2"]["down"]["conv"]["kernel"].shape == (5, 5, 128, 128)
    assert p["cls_out"]["kernel"].shape == (2048, 1)

    m = _shapes(PnPAdaNetMaskCritic(), S((2, 256, 256, 5), F32))["params"]
    assert m.keys() == MASK_CRITIC_TABLE.keys()
    for name, counts in MASK_CRITIC_TABLE.items():
        assert _split_count(m[name]) == counts, name
    assert _count(m) == 1_099_632
    assert m["m_cls_out"]["kernel"].shape == (1024, 1)


# ------------------------------------------------------------------------------------------------
# Shapes at tiny widths (eval_shape)


def _forward_shapes(model, x, **kwargs):
    """Output shapes of ``model`` on ``x`` (init and apply in one trace, nothing computed)."""
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, **kwargs)[0], x)


def test_tiny_forward_shapes(xla_convs):
    f, x = 2, S((2, 32, 32, 3), F32)
    logits, feats = _forward_shapes(PnPAdaNet(features=f), x, return_features=True)
    assert logits.shape == (2, 32, 32, 5)
    assert {k: a.shape for k, a in feats.items()} == {
        "block4_2": (2, 4, 4, 8 * f),
        "block6_2": (2, 4, 4, 16 * f),
        "block7_2": (2, 4, 4, 32 * f),
        "conv9_2": (2, 4, 4, 32 * f),
        "logits": (2, 32, 32, 5),
    }
    expected = {1: (16, f), 2: (8, 2 * f), 6: (4, 16 * f), 9: (4, 32 * f)}
    for depth, (size, width) in expected.items():
        h, ff = _forward_shapes(PnPAdaNetFront(depth, features=f), x, return_features=True)
        assert h.shape == (2, size, size, width), depth
        out, fb = _forward_shapes(PnPAdaNetBack(depth, features=f), h, return_features=True)
        assert out.shape == (2, 32, 32, 5)
        assert set(ff) | set(fb) == set(feats) and not set(ff) & set(fb)

    # The critics on reduced-width segmenters: f = 8 (19 channels), f = 4 with repeat_to_fill (14).
    xs = S((2, 64, 64, 3), F32)
    for f_seg, fill, channels in ((8, False, 19), (4, True, 14)):
        logits, feats = _forward_shapes(PnPAdaNet(features=f_seg), xs, return_features=True)
        c_in = jax.eval_shape(functools.partial(critic_inputs, repeat_to_fill=fill), feats, logits)
        assert c_in.shape == (2, 64, 64, channels)
        critic = PnPAdaNetCritic(features=f_seg, in_channels=channels)
        assert _forward_shapes(critic, c_in).shape == (2, 1)
    assert _forward_shapes(PnPAdaNetMaskCritic(features=2), logits).shape == (2, 1)


# ------------------------------------------------------------------------------------------------
# Numerics at tiny widths


def test_front_back_with_copied_dam_weights_equal_the_segmenter(xla_convs):
    seg = PnPAdaNet(features=2)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), F32)
    v = _np_variables(seg, x)

    def full_fn(v, x):
        return seg.apply(v, x, capture_intermediates=True, mutable=["intermediates"])

    logits, inter = jax.jit(full_fn)(v, x)
    inter = inter["intermediates"]
    # group 10 = conv, (no dropout in eval), then the batch > 1 pixel shuffle
    g10 = inter["group_10"]
    np.testing.assert_array_equal(
        tf_pixel_shuffle(g10["conv"]["__call__"][0], 8), g10["__call__"][0]
    )
    assert g10["__call__"][0].shape == (2, 32, 32, 40)

    depth = 6
    dam = dam_params_from_segmenter(v, depth)
    assert dam["params"].keys() == dam["batch_stats"].keys() == {f"group_{k}" for k in range(1, 7)}
    h = jax.jit(PnPAdaNetFront(depth, features=2).apply)(dam, x)
    back_vars = {c: {k: t[k] for k in t if k not in dam[c]} for c, t in v.items()}
    out = jax.jit(PnPAdaNetBack(depth, features=2).apply)(back_vars, h)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(h), inter["group_6"]["__call__"][0])

    # Training (batch statistics; dropout off to keep the compile short): the two halves'
    # statistics updates are the full network's.
    kw = dict(train=True, mutable=["batch_stats"])
    nodrop = dict(features=2, dropout=0.0)
    logits_t, st = jax.jit(lambda v, x: PnPAdaNet(**nodrop).apply(v, x, **kw))(v, x)
    h_t, st_f = jax.jit(lambda v, x: PnPAdaNetFront(depth, **nodrop).apply(v, x, **kw))(dam, x)
    out_t, st_b = jax.jit(lambda v, h: PnPAdaNetBack(depth, **nodrop).apply(v, h, **kw))(
        back_vars, h_t
    )
    np.testing.assert_array_equal(np.asarray(out_t), np.asarray(logits_t))
    assert not np.allclose(logits_t, logits)
    merged = {**st_f["batch_stats"], **st_b["batch_stats"]}
    assert merged.keys() == st["batch_stats"].keys()
    for k in merged:
        jax.tree.map(np.testing.assert_array_equal, merged[k], st["batch_stats"][k])

    # copies, not aliases: the frozen segmenter survives a donated DAM
    a, b = v["params"]["group_1"]["conv"]["kernel"], dam["params"]["group_1"]["conv"]["kernel"]
    np.testing.assert_array_equal(a, b)
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()


def test_batch_norm_is_tf_fused_batch_norm(xla_convs):
    """group_1/block_1/norm1: batch statistics (biased) in training, decay 0.9, Bessel-corrected update."""
    front = PnPAdaNetFront(1, features=2, dropout=0.0)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)), F32)
    v = _np_variables(front, x, seed=3)

    def run(train):
        return jax.jit(
            lambda v, x: front.apply(
                v,
                x,
                train=train,
                capture_intermediates=True,
                mutable=["intermediates", "batch_stats"],
            )
        )(v, x)[1]

    bs = v["batch_stats"]["group_1"]["block_1"]["norm1"]
    p = v["params"]["group_1"]["block_1"]["norm1"]
    m0, v0 = np.asarray(bs["mean"]), np.asarray(bs["var"])
    scale, bias = np.asarray(p["scale"]), np.asarray(p["bias"])
    for train in (True, False):
        state = run(train)
        block = state["intermediates"]["group_1"]["block_1"]
        c1 = np.asarray(block["conv1"]["__call__"][0], np.float64)
        y = np.asarray(block["norm1"]["__call__"][0])
        if train:
            mean, var = c1.mean((0, 1, 2)), c1.var((0, 1, 2))
            new = state["batch_stats"]["group_1"]["block_1"]["norm1"]
            n = c1.size // c1.shape[-1]
            np.testing.assert_allclose(new["mean"], 0.9 * m0 + 0.1 * mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                new["var"], 0.9 * v0 + 0.1 * var * n / (n - 1), rtol=1e-5, atol=1e-6
            )
        else:
            mean, var = m0, v0
            assert "batch_stats" not in state or jax.tree.all(
                jax.tree.map(np.array_equal, state["batch_stats"], v["batch_stats"])
            )
        ref = (c1 - mean) / np.sqrt(var + 1e-3) * scale + bias
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_dropout_acts_only_in_training(xla_convs):
    front = PnPAdaNetFront(1, features=2)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8, 3)), F32)
    v = _np_variables(front, x)

    @jax.jit
    def run(v, x, key):
        return front.apply(
            v,
            x,
            train=True,
            rngs={"dropout": key},
            capture_intermediates=True,
            mutable=["intermediates", "batch_stats"],
        )

    eval_out = jax.jit(front.apply)(v, x)  # no dropout rng needed
    out1, st1 = run(v, x, jax.random.key(0, impl="rbg"))
    out2, _ = run(v, x, jax.random.key(1, impl="rbg"))
    assert not np.allclose(out1, out2)
    g1 = st1["intermediates"]["group_1"]
    conv, dropped = np.asarray(g1["conv"]["__call__"][0]), np.asarray(g1["dropout"]["__call__"][0])
    kept = dropped != 0
    assert 0.6 < kept.mean() < 0.9  # keep_prob 0.75
    np.testing.assert_allclose(dropped[kept], conv[kept] / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(eval_out, jax.jit(front.apply)(v, x))


def test_critics_use_batch_statistics_and_train_dropout(xla_convs):
    critic = PnPAdaNetCritic(features=2)
    x = np.random.default_rng(5).normal(size=(2, 16, 16, 4)).astype(np.float32)
    v = _np_variables(critic, jnp.asarray(x))
    assert list(v) == ["params"]  # no running statistics
    x2 = x.copy()
    x2[1] = x2[1] * 2 + 1  # only sample 1 changes
    a, b = jax.jit(jax.vmap(critic.apply, in_axes=(None, 0)))(v, jnp.stack([x, x2]))
    assert a.shape == (2, 1)
    assert not np.allclose(a[0], b[0])  # sample 0's score depends on sample 1: batch statistics
    # dropout only in training: it then needs the "dropout" rng (the segmenter's test checks the
    # dropout itself; the critics use the same layer)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: critic.apply(v, x, train=True), v, x)
    rngs = {"dropout": jax.random.key(0)}
    score = jax.eval_shape(lambda v, x: critic.apply(v, x, train=True, rngs=rngs), v, x)
    assert score.shape == (2, 1)

    mask = PnPAdaNetMaskCritic(features=2)
    lg = jnp.asarray(np.random.default_rng(6).normal(size=(2, 16, 16, 5)), F32)
    vm = _np_variables(mask, lg)
    assert list(vm) == ["params"]
    assert jax.jit(mask.apply)(vm, lg).shape == (2, 1)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: mask.apply(v, x, train=True), vm, lg)


# ------------------------------------------------------------------------------------------------
# TF padding against a NumPy convolution


def _np_conv_tf(x, w, s, padding):
    """NumPy 2D cross-correlation with TF's 'SAME' rule or TF's SYMMETRIC pad + 'VALID'."""
    k = w.shape[0]
    if padding == "SAME":
        pads = []
        for n in x.shape[1:3]:
            out = -(-n // s)
            total = max((out - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))  # TF: the extra pixel at the bottom/right
        xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    else:
        xp = np.pad(x, [(0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)], mode="symmetric")
    ho, wo = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * s : i * s + k, j * s : j * s + k, :]
            y[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
    return y


@pytest.mark.parametrize(
    "k, s, hw, padding",
    [
        (5, 2, (8, 9), "SAME"),  # cls_2_3: (1, 2) on even sizes; (2, 2) on odd
        (3, 2, (8, 7), "SAME"),  # cls_1_3 / mask_cls_1: (0, 1) on even sizes
        (5, 4, (16, 16), "SAME"),  # cls_5_3 / m_cls_2_3: (0, 1)
        (3, 2, (4, 4), "SYMMETRIC"),  # cls_6: 4 -> 2
        (5, 4, (8, 8), "SYMMETRIC"),  # mask_cls_4: 8 -> 2
    ],
)
def test_tf_padding_of_strided_convs(k, s, hw, padding):
    rng = np.random.default_rng(k * 10 + s)
    x = rng.normal(size=(1, *hw, 3)).astype(np.float32)
    conv = Conv(2, k, strides=s, padding=padding, use_bias=False)
    w = rng.normal(size=(k, k, 3, 2)).astype(np.float32)
    y = conv.apply({"params": {"kernel": jnp.asarray(w)}}, jnp.asarray(x))
    np.testing.assert_allclose(y, _np_conv_tf(x, w, s, padding), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# ops.PS, transcribed op by op from ops.py:3-27


def _np_phase_shift(img, r, batch_size):
    _, a, b, _ = img.shape
    x = img.reshape(batch_size, a, b, r, r)
    x = x.transpose(0, 1, 2, 4, 3)
    x = np.split(x, a, 1)
    x = np.concatenate([np.squeeze(t) for t in x], 2)
    if batch_size == 1:
        x = x[None]
    x = np.split(x, b, 1)
    if batch_size == 1:
        x = np.concatenate(x, 2)
    else:
        x = np.concatenate([np.squeeze(t) for t in x], 2)
    out = x.reshape(batch_size, a * r, b * r, 1)
    if batch_size == 1:
        out = out.transpose(0, 2, 1, 3)
    return out


def _np_ps(x, r, n_channel, batch_size):
    return np.concatenate(
        [_np_phase_shift(c, r, batch_size) for c in np.split(x, n_channel, -1)], 3
    )


@pytest.mark.parametrize("batch", [2, 6])
@pytest.mark.parametrize("r, n", [(2, 3), (8, 2)])
def test_tf_pixel_shuffle_is_ops_ps_for_batches_above_one(batch, r, n):
    x = np.random.default_rng(batch + r).normal(size=(batch, 3, 4, n * r * r)).astype(np.float32)
    ref = _np_ps(x, r, n, batch)
    assert ref.shape == (batch, 3 * r, 4 * r, n)
    np.testing.assert_array_equal(tf_pixel_shuffle(jnp.asarray(x), r), ref)
    # the transpose of torch's / medjax's pixel_shuffle
    assert not np.array_equal(pixel_shuffle(jnp.asarray(x), r), ref)
    # out[h r + dy, w r + dx, k] = in[h, w, k r^2 + dx r + dy]
    h, w, dy, dx, k = 2, 1, 1, 0, n - 1
    assert ref[0, h * r + dy, w * r + dx, k] == x[0, h, w, k * r * r + dx * r + dy]


def test_ops_ps_batch_one_is_the_other_order():
    """Documents why one order was chosen: batch 1 gives pixel_shuffle's order (and swaps H, W)."""
    x = np.random.default_rng(7).normal(size=(1, 3, 3, 2 * 4)).astype(np.float32)
    ref = _np_ps(x, 2, 2, 1)
    np.testing.assert_array_equal(pixel_shuffle(jnp.asarray(x), 2), ref)
    assert not np.array_equal(tf_pixel_shuffle(jnp.asarray(x), 2), ref)
    assert _np_ps(np.zeros((1, 3, 4, 4), np.float32), 2, 1, 1).shape == (1, 8, 6, 1)


def test_critic_inputs_channel_order():
    rng = np.random.default_rng(8)
    b, hs, r = 2, 2, 8
    feats = {
        "block4_2": rng.normal(size=(b, hs, hs, 128)),
        "block6_2": rng.normal(size=(b, hs, hs, 256)),
        "block7_2": rng.normal(size=(b, hs, hs, 512)),
        "conv9_2": rng.normal(size=(b, hs, hs, 512)),
        "logits": None,  # ignored
    }
    feats = {k: (None if a is None else a.astype(np.float32)) for k, a in feats.items()}
    logits = rng.normal(size=(b, hs * r, hs * r, 5)).astype(np.float32)
    out = np.asarray(critic_inputs({k: a for k, a in feats.items() if a is not None}, logits))
    assert out.shape == (b, 16, 16, 32)
    p4 = _np_ps(feats["block4_2"], 8, 2, b)
    np.testing.assert_array_equal(out[..., :6], np.concatenate([p4, p4, p4], -1))  # [a,b,a,b,a,b]
    np.testing.assert_array_equal(out[..., 6:10], _np_ps(feats["block6_2"], 8, 4, b))
    np.testing.assert_array_equal(out[..., 10:18], _np_ps(feats["block7_2"], 8, 8, b))
    np.testing.assert_array_equal(out[..., 18:26], _np_ps(feats["conv9_2"], 8, 8, b))
    np.testing.assert_array_equal(out[..., 26:31], logits)
    np.testing.assert_array_equal(out[..., 31], np.argmax(logits, -1).astype(np.float32))

    small = {k: a[..., :32] for k, a in feats.items() if a is not None}  # f = 4 widths
    with pytest.raises(ValueError, match="divisible by 64"):
        critic_inputs(small, logits)
    filled = critic_inputs(small, logits, repeat_to_fill=True)
    assert filled.shape == (b, 16, 16, 3 + 1 + 1 + 1 + 5 + 1)
    np.testing.assert_array_equal(
        filled[..., 0], _np_ps(np.tile(small["block4_2"], 2), 8, 1, b)[..., 0]
    )


# ------------------------------------------------------------------------------------------------
# Errors and clipping


def test_value_errors():
    def init(model, shape):
        return _shapes(model, S(shape, F32))

    with pytest.raises(ValueError, match="multiples of 8"):
        init(PnPAdaNet(features=2), (1, 36, 32, 3))
    with pytest.raises(ValueError, match="multiples of 8"):
        init(PnPAdaNetFront(2, features=2), (1, 32, 20, 3))
    with pytest.raises(ValueError, match="3 channels"):
        init(PnPAdaNet(features=2), (1, 32, 32, 1))
    for depth in (0, 10, 2.0):
        with pytest.raises(ValueError, match="depth"):
            init(PnPAdaNetFront(depth, features=2), (1, 32, 32, 3))
        with pytest.raises(ValueError, match="depth"):
            init(PnPAdaNetBack(depth, features=2), (1, 4, 4, 64))
        with pytest.raises(ValueError, match="depth"):
            dam_params_from_segmenter({"params": {}}, depth)
    with pytest.raises(ValueError, match="width 32 channels"):
        init(PnPAdaNetBack(6, features=2), (1, 4, 4, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        init(PnPAdaNetBack(1, features=2), (1, 6, 8, 2))
    with pytest.raises(ValueError, match="group_2"):
        dam_params_from_segmenter({"params": {"group_1": {}}}, 2)
    with pytest.raises(ValueError, match="4 channels"):
        init(PnPAdaNetCritic(features=2), (1, 32, 32, 5))
    with pytest.raises(ValueError, match="at most 4 \\* features = 8"):
        init(PnPAdaNetCritic(features=2, in_channels=9), (1, 32, 32, 9))
    with pytest.raises(ValueError, match="5 logit channels"):
        init(PnPAdaNetMaskCritic(features=2), (1, 32, 32, 4))
    with pytest.raises(ValueError, match="divisible by r"):
        tf_pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def test_clip_mask_marks_critic_kernels_only():
    params = {
        "critic": _shapes(PnPAdaNetCritic(features=2), S((1, 32, 32, 4), F32))["params"],
        "mask_critic": _shapes(PnPAdaNetMaskCritic(features=2), S((1, 32, 32, 5), F32))["params"],
        "dam": _shapes(PnPAdaNetFront(1, features=2), S((1, 8, 8, 3), F32))["params"],
    }
    mask = clip_mask(params)
    flat = {jax.tree_util.keystr(k): m for k, m in jax.tree_util.tree_leaves_with_path(mask)}
    clipped = {k for k, m in flat.items() if m}
    assert clipped == {k for k in flat if k.endswith("['kernel']") and "cls" in k}
    assert "['critic']['cls_out']['kernel']" in clipped
    assert "['mask_critic']['m_cls_out']['kernel']" in clipped
    assert "['critic']['cls_1']['block']['conv1']['kernel']" in clipped
    assert "['critic']['cls_1']['block']['norm1']['scale']" not in clipped
    assert not any(k.startswith("['dam']") for k in clipped)
    n_clipped = sum(
        math.prod(params_leaf.shape)
        for params_leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
        if m
    )
    assert n_clipped == _split_count(params["critic"])[0] + _split_count(params["mask_critic"])[0]

    tree = {
        "cls_1": {
            "down": {
                "conv": {"kernel": jnp.array([-1.0, 0.01, 1.0])},
                "norm": {"scale": jnp.array([2.0])},
            }
        }
    }
    out = clip_critic_weights(tree)
    np.testing.assert_array_equal(
        out["cls_1"]["down"]["conv"]["kernel"], np.float32([-0.03, 0.01, 0.03])
    )
    np.testing.assert_array_equal(out["cls_1"]["down"]["norm"]["scale"], [2.0])
