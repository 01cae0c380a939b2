"""Tests for medjax.models.joint_regseg (Estienne 2020) and the V-Net blocks it is built from."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from medjax.losses import background_mask, joint_loss, joint_loss_terms
from medjax.models.joint_regseg import JointRegSeg, SegmentationNet
from medjax.nn.blocks import ResidualLevel, fast_init

S = 16  # divisible by 2**4 for the five-level encoder


def _images(key, b=2, c=4, s=S):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (b, s, s, s, c)), jax.random.normal(k2, (b, s, s, s, c))


def _model(**kw):
    kw.setdefault("f", 2)
    return JointRegSeg(**kw)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def setup():
    model = _model()
    mov, fix = _images(jax.random.key(0))
    params = fast_init(model, jax.random.key(1), mov, fix)["params"]
    return model, params, mov, fix


def test_output_shapes(setup):
    model, params, mov, fix = setup
    apply = jax.jit(model.apply)  # one compilation instead of op-by-op dispatch (twice)
    out = apply({"params": params}, mov, fix)
    b = mov.shape[0]
    assert out["phi"].shape == (b, S, S, S, 3)
    assert out["displacement"].shape == (b, S, S, S, 3)
    assert out["warped"].shape == mov.shape
    for k in ("seg_moving", "seg_fixed", "warped_seg", "seg_moving_logits", "seg_fixed_logits"):
        assert out[k].shape == (b, S, S, S, 4), k
    phi = np.asarray(out["phi"])
    assert np.all((phi > 0) & (phi < 1))
    np.testing.assert_allclose(np.asarray(out["seg_moving"]).sum(-1), 1.0, rtol=1e-5)
    # Segmentations of S and R come from the same shared decoder: swapping the inputs swaps them.
    swapped = apply({"params": params}, fix, mov)
    np.testing.assert_allclose(swapped["seg_fixed"], out["seg_moving"], rtol=1e-5, atol=1e-6)


def test_input_validation(setup):
    model, params, mov, fix = setup
    with pytest.raises(ValueError, match="moving"):
        model.apply({"params": params}, mov[..., :1], fix)
    with pytest.raises(ValueError, match="fixed"):
        model.apply({"params": params}, mov, fix[:, :8, :8, :8])
    with pytest.raises(ValueError, match="merge"):
        _model(merge="sum").init(jax.random.key(0), mov, fix)
    with pytest.raises(ValueError, match="divisible"):
        _model().init(jax.random.key(0), mov[:, :12, :12, :12], fix[:, :12, :12, :12])


def _identity_params(params):
    p = flax.core.unfreeze(jax.tree_util.tree_map(lambda x: x, params))
    p["reg_head"]["kernel"] = jnp.zeros_like(p["reg_head"]["kernel"])
    p["reg_head"]["bias"] = jnp.zeros_like(p["reg_head"]["bias"])
    return p


def test_phi_half_is_exact_identity(setup):
    model, params, mov, fix = setup
    out = model.apply({"params": _identity_params(params)}, mov, fix)
    assert np.all(np.asarray(out["phi"]) == 0.5)
    assert np.all(np.asarray(out["displacement"]) == 0.0)
    # Sampling exactly at the voxels (the last voxel interpolates with weight 1 on its upper corner).
    np.testing.assert_allclose(out["warped"], mov, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["warped_seg"], out["seg_moving"], rtol=0, atol=1e-6)


def test_original_offset_shifts_by_one_voxel(setup):
    _, params, mov, fix = setup
    model = _model(original_offset=True)
    out = model.apply({"params": _identity_params(params)}, mov, fix)
    # The Keras code's cumsum(2 * 0.5) = 1..N moves every voxel by +1 along every axis.
    np.testing.assert_array_equal(np.asarray(out["displacement"]), 1.0)
    ref = np.asarray(mov)[:, 1:, 1:, 1:]
    np.testing.assert_allclose(np.asarray(out["warped"])[:, :-1, :-1, :-1], ref, atol=1e-6)


def test_subtraction_vs_concat_param_counts(setup):
    _, params_sub, mov, fix = setup
    f = 2
    params_cat = jax.eval_shape(_model(merge="concat").init, jax.random.key(1), mov, fix)["params"]
    w = [f * m for m in (1, 2, 4, 8, 16)]
    # Concatenation doubles the merged skip width: the deepest transposed conv (2^3 kernel) reads
    # 2*w5 instead of w5 channels, and the first 3^3 conv of each decoder level reads an extra w_l.
    extra = 8 * w[4] * w[3] + sum(27 * w[i] * w[i] for i in range(4))
    assert _count(params_cat) - _count(params_sub) == extra
    # The encoder and the segmentation branch are identical.
    for k in ("encoder", "seg_decoder", "seg_head"):
        assert _count(params_cat[k]) == _count(params_sub[k])


def _paper_param_count(f, modalities, classes, merge):
    """Parameters of the Estienne 2020 network, counted by hand from SYSTEMS.md section 1.

    Encoder: 1^3 lift to f; levels of widths f*(1,2,4,8,16) with 1,2,3,3,3 3^3 convs; 2^3 stride-2
    convs between levels. Decoders (deep to shallow): 2^3 transposed conv, concat [skip, up],
    3,3,2,1 3^3 convs. Heads: 1^3 convs to the classes (softmax) and to 3 (sigmoid Phi).
    """
    w = [f * m for m in (1, 2, 4, 8, 16)]
    conv = lambda k, cin, cout: k**3 * cin * cout + cout  # noqa: E731
    enc = conv(1, modalities, w[0])
    for i, n in enumerate((1, 2, 3, 3, 3)):
        enc += n * conv(3, w[i], w[i])
        if i < 4:
            enc += conv(2, w[i], w[i + 1])

    def decoder(skip_factor):
        total, cin = 0, skip_factor * w[4]
        for i, n in zip((3, 2, 1, 0), (3, 3, 2, 1), strict=True):
            total += conv(2, cin, w[i])  # transposed conv
            total += conv(3, skip_factor * w[i] + w[i], w[i]) + (n - 1) * conv(3, w[i], w[i])
            cin = w[i]
        return total

    reg_skip = 2 if merge == "concat" else 1
    return enc + decoder(1) + conv(1, w[0], classes) + decoder(reg_skip) + conv(1, w[0], 3)


@pytest.mark.parametrize(("merge", "modalities"), [("subtract", 4), ("concat", 1)])
def test_paper_network_parameter_count(merge, modalities):
    """f = 8 as published: the layer counts and widths are the paper's, counted independently."""
    x = jnp.zeros((1, 16, 16, 16, modalities))
    model = JointRegSeg(f=8, n_modalities=modalities, n_classes=4, merge=merge)
    params = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
    assert _count(params) == _paper_param_count(8, modalities, 4, merge)


def test_segmentation_net_matches_joint_branch(setup):
    model, params, mov, _ = setup
    seg = SegmentationNet(f=2)
    sp = {k: params[k] for k in ("encoder", "seg_decoder", "seg_head")}
    out = seg.apply({"params": sp}, mov)
    joint = model.apply({"params": params}, mov, mov)
    np.testing.assert_allclose(out["probs"], joint["seg_moving"], rtol=1e-5, atol=1e-6)
    ref_params = jax.eval_shape(seg.init, jax.random.key(3), mov)["params"]
    assert jax.tree_util.tree_structure(ref_params) == jax.tree_util.tree_structure(sp)


def test_residual_level_matches_scipy():
    x = jax.random.normal(jax.random.key(0), (1, 6, 5, 4, 2))
    block = ResidualLevel(features=2, num_convs=1)
    p = block.init(jax.random.key(1), x)["params"]
    y = np.asarray(block.apply({"params": p}, x))
    k = np.asarray(p["ConvAct_0"]["Conv_0"]["kernel"])  # (3, 3, 3, cin, cout)
    bias = np.asarray(p["ConvAct_0"]["Conv_0"]["bias"])
    xn = np.asarray(x)[0]
    ref = np.zeros_like(xn)
    for o in range(2):
        acc = np.full(xn.shape[:3], bias[o], np.float64)
        for i in range(2):
            acc += ndimage.correlate(xn[..., i], k[..., i, o], mode="constant", cval=0.0)
        ref[..., o] = np.maximum(acc, 0) + xn[..., o]
    np.testing.assert_allclose(y[0], ref, rtol=1e-4, atol=1e-5)


def _np_ce(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return -picked.mean()


def _tiny_case(seed=0):
    rng = np.random.default_rng(seed)
    b, s, c, n = 2, (3, 4, 2), 2, 3
    fixed = rng.normal(size=(b, *s, c)).astype(np.float32)
    warped = rng.normal(size=(b, *s, c)).astype(np.float32)
    lm = rng.normal(size=(b, *s, n)).astype(np.float32)
    lf = rng.normal(size=(b, *s, n)).astype(np.float32)
    sm = np.exp(lm) / np.exp(lm).sum(-1, keepdims=True)
    sf = np.exp(lf) / np.exp(lf).sum(-1, keepdims=True)
    # The warped moving segmentation deliberately disagrees with the unwarped one.
    wl = rng.normal(size=(b, *s, n)).astype(np.float32)
    ws = np.exp(wl) / np.exp(wl).sum(-1, keepdims=True)
    phi = rng.uniform(0.1, 0.9, size=(b, *s, 3)).astype(np.float32)
    tm = rng.integers(0, n, size=(b, *s))
    tf = rng.integers(0, n, size=(b, *s))
    outputs = {
        "phi": phi,
        "warped": warped,
        "seg_moving_logits": lm,
        "seg_fixed_logits": lf,
        "seg_moving": sm,
        "seg_fixed": sf,
        "warped_seg": ws,
    }
    batch = {"fixed": fixed, "tumour_moving": tm, "tumour_fixed": tf}
    return outputs, batch


@pytest.mark.parametrize("masked", [True, False])
def test_joint_loss_closed_form(masked):
    outputs, batch = _tiny_case()
    alpha, beta = 0.3, 0.7
    o = {k: jnp.asarray(v) for k, v in outputs.items()}
    bt = {k: jnp.asarray(v) for k, v in batch.items()}
    got = joint_loss_terms(o, bt, masked=masked, alpha=alpha, beta=beta)

    sq = (batch["fixed"] - outputs["warped"]) ** 2
    if masked:
        m = (outputs["warped_seg"].argmax(-1) == 0) & (outputs["seg_fixed"].argmax(-1) == 0)
        assert 0 < m.sum() < m.size  # a non-trivial mask
        reg = (sq * m[..., None]).sum() / sq.size  # normaliser: TOTAL voxel count
        unwarped = (outputs["seg_moving"].argmax(-1) == 0) & (outputs["seg_fixed"].argmax(-1) == 0)
        assert (unwarped != m).any()  # the test distinguishes warped from unwarped masks
    else:
        reg = sq.mean()
    seg = 0.5 * _np_ce(outputs["seg_moving_logits"], batch["tumour_moving"]) + 0.5 * _np_ce(
        outputs["seg_fixed_logits"], batch["tumour_fixed"]
    )
    phi_l1 = np.abs(outputs["phi"] - 0.5).sum()
    np.testing.assert_allclose(got["reg"], reg, rtol=1e-5)
    np.testing.assert_allclose(got["seg"], seg, rtol=1e-5)
    np.testing.assert_allclose(got["phi_l1"], phi_l1, rtol=1e-5)
    total = reg + beta * seg + alpha * phi_l1
    np.testing.assert_allclose(got["loss"], total, rtol=1e-5)
    np.testing.assert_allclose(
        joint_loss(o, bt, masked=masked, alpha=alpha, beta=beta), total, rtol=1e-5
    )


def test_background_mask_uses_warped_source():
    outputs, _ = _tiny_case(1)
    o = {k: jnp.asarray(v) for k, v in outputs.items()}
    m = np.asarray(background_mask(o))[..., 0]
    ref = (outputs["warped_seg"].argmax(-1) == 0) & (outputs["seg_fixed"].argmax(-1) == 0)
    np.testing.assert_array_equal(m, ref.astype(np.float32))


def test_joint_loss_requires_labels():
    outputs, batch = _tiny_case()
    del batch["tumour_fixed"]
    with pytest.raises(ValueError, match="tumour_fixed"):
        joint_loss(outputs, batch)
    # Registration-only (beta = 0, as on OASIS) needs no tumour labels.
    assert np.isfinite(joint_loss(outputs, batch, masked=False, beta=0.0))


def test_gradients_finite_and_nonzero(setup):
    model, params, mov, fix = setup
    tm = jnp.zeros(mov.shape[:-1], jnp.int32).at[:, 4:8, 4:8, 4:8].set(1)
    batch = {"moving": mov, "fixed": fix, "tumour_moving": tm, "tumour_fixed": tm}

    def loss_fn(p):
        return joint_loss(model.apply({"params": p}, mov, fix), batch, masked=True)

    grads = jax.jit(jax.grad(loss_fn))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    for k in ("encoder", "seg_decoder", "reg_decoder", "reg_head", "seg_head"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[k])) > 0, k


def test_bfloat16_compute_keeps_float32_params(setup):
    _, params32, mov, fix = setup
    model = _model(dtype=jnp.bfloat16)
    params = jax.eval_shape(model.init, jax.random.key(1), mov, fix)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    out = jax.jit(model.apply)({"params": params32}, mov, fix)
    ref = jax.jit(_model().apply)({"params": params32}, mov, fix)
    for k in ("phi", "displacement", "warped", "seg_moving"):
        assert out[k].dtype == jnp.float32, k
    np.testing.assert_allclose(out["seg_moving"], ref["seg_moving"], atol=0.05)
    np.testing.assert_allclose(out["phi"], ref["phi"], atol=0.01)


def test_training_registers_a_shifted_blob():
    """The Phi-gradient head learns a real registration: a blob moved 2 voxels is brought back."""
    import optax

    g = np.stack(np.meshgrid(*[np.arange(S)] * 3, indexing="ij"), -1).astype(np.float32)

    def blob(centre):
        return np.exp(-np.sum((g - np.asarray(centre)) ** 2, -1) / (2 * 3.0**2))[None, ..., None]

    mov, fix = jnp.asarray(blob((6, 8, 8))), jnp.asarray(blob((8, 8, 8)))
    model = JointRegSeg(f=2, n_modalities=1, n_classes=2)
    params = fast_init(model, jax.random.key(0), mov, fix)["params"]
    tx = optax.adam(2e-3)  # the paper's Adam 2e-3
    opt = tx.init(params)
    batch = {"moving": mov, "fixed": fix}

    @jax.jit
    def step(params, opt):
        def lf(p):
            out = model.apply({"params": p}, mov, fix)
            return joint_loss(out, batch, masked=False, beta=0.0)

        loss, grads = jax.value_and_grad(lf)(params)
        upd, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    for _ in range(60):
        params, opt, loss = step(params, opt)
    out = jax.jit(model.apply)({"params": params}, mov, fix)
    before = float(jnp.mean((mov - fix) ** 2))
    after = float(jnp.mean((out["warped"] - fix) ** 2))
    assert after < 0.25 * before, (before, after)
    # the fixed blob's centre samples the moving image about 2 voxels back along axis 0
    assert -2.6 < float(out["displacement"][0, 8, 8, 8, 0]) < -1.4
    assert abs(float(out["displacement"][0, 8, 8, 8, 1])) < 0.4
    # and the masks overlap better (Dice of the half-maximum regions)
    fm = np.asarray(fix)[0, ..., 0] > 0.5
    for img, better in ((mov, False), (out["warped"], True)):
        m = np.asarray(img)[0, ..., 0] > 0.5
        dice = 2 * np.sum(m & fm) / (m.sum() + fm.sum())
        assert (dice > 0.9) == better, dice
