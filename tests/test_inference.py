"""Sliding-window inference: MONAI parity, exactness for one window, compile-once, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.inference import importance_map, sliding_window_inference
from tests.conftest import require_reference

K = 2


def _weights(c):
    rng = np.random.default_rng(42)
    return rng.normal(size=(c, K)).astype(np.float32), rng.normal(size=(K,)).astype(np.float32)


def jax_predictor(x):
    """(n, *roi, C) -> (n, *roi, K): pointwise mix + window-position ramp + in-window 3-tap context."""
    w, b = _weights(x.shape[-1])
    roi0 = x.shape[1]
    h = jnp.tanh(jnp.einsum("...c,ck->...k", x, w))
    ramp = (jnp.arange(roi0, dtype=jnp.float32) / roi0).reshape((1, roi0) + (1,) * (x.ndim - 2))
    pad = [(0, 0), (0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 3)
    hp = jnp.pad(h, pad)
    n1 = x.shape[2]
    ctx = (hp[:, :, 0:n1] + hp[:, :, 1 : n1 + 1] + hp[:, :, 2 : n1 + 2]) / 3.0
    return ctx + ramp * b


def torch_predictor(x):
    """The same function on channels-first torch tensors (n, C, *roi) -> (n, K, *roi)."""
    import torch

    w, b = _weights(x.shape[1])
    xl = torch.movedim(x, 1, -1)
    h = torch.tanh(xl @ torch.from_numpy(w))
    roi0 = xl.shape[1]
    ramp = (torch.arange(roi0, dtype=torch.float32) / roi0).reshape(
        (1, roi0) + (1,) * (xl.ndim - 2)
    )
    n1 = xl.shape[2]
    hp = torch.nn.functional.pad(torch.movedim(h, 2, -1), [1, 1])  # spatial axis 1, zero padded
    ctx = torch.movedim((hp[..., 0:n1] + hp[..., 1 : n1 + 1] + hp[..., 2 : n1 + 2]) / 3.0, -1, 2)
    out = ctx + ramp * torch.from_numpy(b)
    return torch.movedim(out, -1, 1)


def _monai(volume, roi, overlap, mode, sw, sigma_scale=0.125, pad_value=0.0):
    torch = require_reference("torch")
    monai = require_reference("monai")
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 1)))
    with torch.no_grad():
        out = monai.inferers.sliding_window_inference(
            x,
            roi,
            sw,
            torch_predictor,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            padding_mode="constant",
            cval=pad_value,
        )
    return np.moveaxis(out.numpy(), 1, -1)


@pytest.mark.parametrize(
    "shape,roi,overlap,mode,sw",
    [
        ((1, 13, 11, 9, 2), (6, 5, 4), 0.25, "gaussian", 1),
        ((2, 12, 10, 7, 1), (5, 5, 5), 0.5, "constant", 3),
        ((2, 7, 12, 1), (10, 5), 0.4, "gaussian", 4),  # axis 0 smaller than the ROI: padded
    ],
)
def test_matches_monai(shape, roi, overlap, mode, sw):
    vol = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = _monai(vol, roi, overlap, mode, sw)
    # the torch and JAX predictors agree on a window
    win = vol[:, : min(roi[0], shape[1])]
    if win.shape[1] == roi[0]:
        win = win[(slice(None), slice(None), *[slice(0, r) for r in roi[1:]])]
        import torch

        tp = torch_predictor(torch.from_numpy(np.moveaxis(win, -1, 1))).numpy()
        np.testing.assert_allclose(
            np.asarray(jax_predictor(jnp.asarray(win))), np.moveaxis(tp, 1, -1), atol=1e-6
        )
    got = sliding_window_inference(
        vol, roi, jax_predictor, overlap=overlap, mode=mode, sw_batch_size=sw, pad_value=0.0
    )
    assert got.shape == shape[:-1] + (K,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_nonzero_pad_value_and_sigma_scale_match_monai():
    vol = np.random.default_rng(1).normal(size=(1, 5, 9, 3)).astype(np.float32)
    want = _monai(vol, (8, 4), 0.5, "gaussian", 2, sigma_scale=0.3, pad_value=1.5)
    got = sliding_window_inference(
        vol, (8, 4), jax_predictor, overlap=0.5, sw_batch_size=2, sigma_scale=0.3, pad_value=1.5
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_single_window_is_exactly_one_call():
    vol = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 6, 5, 2)).astype(np.float32))
    full = np.asarray(jax.jit(jax_predictor)(vol))
    got = sliding_window_inference(vol, (8, 6, 5), jax_predictor, mode="gaussian", sw_batch_size=2)
    np.testing.assert_array_equal(np.asarray(got), full)
    got = sliding_window_inference(vol, (-1, None, 5), jax_predictor, sw_batch_size=2)
    np.testing.assert_array_equal(np.asarray(got), full)
    # a ROI larger than the volume: one call on the padded volume, cropped back
    small = vol[:, :5, :4]
    padded = jnp.pad(small, [(0, 0), (1, 2), (1, 1), (0, 0), (0, 0)])
    want = np.asarray(jax.jit(jax_predictor)(padded))[:, 1:6, 1:5]
    got = sliding_window_inference(small, (8, 6, 5), jax_predictor, sw_batch_size=2)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_identity_predictor_reproduces_volume(mode):
    vol = np.random.default_rng(3).normal(size=(1, 11, 9, 2)).astype(np.float32)
    got = sliding_window_inference(
        vol, (4, 5), lambda x: x, overlap=0.6, mode=mode, sw_batch_size=3
    )
    np.testing.assert_allclose(np.asarray(got), vol, rtol=1e-5, atol=1e-6)


def test_predictor_traced_once_per_window_shape():
    traces = []

    def predictor(x):
        traces.append(x.shape)
        return 2.0 * x[..., :1]

    vol = np.ones((1, 10, 10, 1), np.float32)  # 4 x 4 = 16 windows in groups of 3 (last one short)
    out = sliding_window_inference(vol, (4, 4), predictor, overlap=0.25, sw_batch_size=3)
    assert traces == [(3, 4, 4, 1)]
    np.testing.assert_allclose(np.asarray(out), 2.0, rtol=1e-6)


def test_parameters_as_args_compile_once_across_calls():
    traces = []

    def apply(x, params):
        traces.append(x.shape)
        return params["w"] * x[..., :1] + params["b"]

    vol = np.ones((1, 10, 10, 1), np.float32)
    for w in (2.0, 3.0):  # new weights, new volume: no new compilation
        params = {"w": jnp.float32(w), "b": jnp.float32(1.0)}
        out = sliding_window_inference(vol * w, (4, 4), apply, sw_batch_size=3, args=(params,))
        np.testing.assert_allclose(np.asarray(out), w * w + 1.0, rtol=1e-6)
    assert traces == [(3, 4, 4, 1)]

    class Model:  # like a flax module: model.apply is a new bound method at every access
        def apply(self, x, params):
            traces.append(x.shape)
            return params["w"] * x[..., :1]

    model = Model()
    for w in (2.0, 3.0):
        out = sliding_window_inference(vol, (4, 4), model.apply, args=({"w": jnp.float32(w)},))
        np.testing.assert_allclose(np.asarray(out), w, rtol=1e-6)
    assert traces == [(3, 4, 4, 1), (1, 4, 4, 1)]


def test_importance_map_matches_monai():
    torch = require_reference("torch")
    monai = require_reference("monai")
    want = monai.data.utils.compute_importance_map((7, 4, 9), mode="gaussian", sigma_scale=0.125)
    np.testing.assert_allclose(importance_map((7, 4, 9)), want.numpy(), rtol=1e-6)
    assert torch is not None


def test_validation_errors():
    vol = np.zeros((1, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="volume"):
        sliding_window_inference(vol[0, 0], 4, jax_predictor)
    with pytest.raises(ValueError, match="roi_size"):
        sliding_window_inference(vol, (4, 4, 4), jax_predictor)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(vol, 4, jax_predictor, overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(vol, 4, jax_predictor, mode="linear")
    with pytest.raises(ValueError, match="sw_batch_size"):
        sliding_window_inference(vol, 4, jax_predictor, sw_batch_size=0)
    with pytest.raises(ValueError, match="predictor"):
        sliding_window_inference(vol, 4, lambda x: x[:, :2])
