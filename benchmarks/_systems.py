"""The system rows of ``benchmarks/models.py``: networks outside the MedicalZoo zoo, each with its
medjax functions and, where one exists, a PyTorch re-creation checked against medjax in the run.

Every row is a :class:`Spec`: its inputs (channels-last NumPy, from a seed), the medjax network's
variables, forward pass and training loss, and the PyTorch side's. Two directions of weights:

- JointRegSeg, SegmentationNet, VoxelMorph and SmallUNet have no public PyTorch original (Estienne
  2020 and VoxelMorph's first release are Keras; SmallUNet is ours). The PyTorch side is written
  here as plain functions of the medjax parameters (``F.conv3d`` on the same weights, transposed to
  torch's layout), so the two libraries run the same network on the same weights;
- FocusNetV2's parts and UniverSeg have PyTorch re-creations of the originals in the weight-import
  parity tests (``tests/models/test_focusnet.py``, ``test_universeg.py``); both workers build the
  same seeded module, and medjax imports its ``state_dict``.

Either way the torch worker compares its forward outputs with the medjax worker's (written to an
exchange file) and records the largest absolute difference, so a row whose two networks differ
shows it. PnP-AdaNet's original is TensorFlow 1 and no PyTorch re-creation exists: medjax only.

Each row's training loss is a stand-in that exercises every output the system trains (the same
formula in both libraries), not the experiment's full objective; the row says which.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One system row: its stand-in loss (text), its input shape for the ``--size`` given, its
    inputs, its medjax side, its PyTorch side (None: none exists) and what that side is (text)."""

    loss_text: str
    shape: Callable  # --size -> spatial shape tuple
    inputs: Callable  # (shape) -> dict of channels-last numpy arrays
    #: (shape, inputs) -> (variables, forward(v, inputs) -> tuple, loss(params, state, inputs, key))
    medjax: Callable
    #: (shape, inputs, exchange) -> (module or parameter list, forward() -> tuple of channels-first
    #: tensors, loss() -> scalar), closed over the inputs as torch tensors
    torch: Callable | None
    reference: str = ""


# ------------------------------------------------------------------------------ shared pieces


def _rng(seed=0):
    return np.random.default_rng(seed)


def _labels(rng, shape, k):
    return rng.integers(0, k, size=(1, *shape)).astype(np.int32)


def _jax_dice(logits, y):
    from medjax.losses import soft_dice_loss

    return soft_dice_loss(logits, y, squared=True, eps=1e-6)


def _torch_dice(z, y, k):
    """The zoo's Dice on channels-first logits ``z`` and integer labels ``y`` (same as medjax's)."""
    import torch

    p = torch.softmax(z, 1)
    t = torch.nn.functional.one_hot(y.long(), k).movedim(-1, 1).float()
    dims = (0, *range(2, z.dim()))
    inter = (p * t).sum(dims)
    den = (p * p).sum(dims) + (t * t).sum(dims)
    return 1 - (2 * inter / den.clamp(min=1e-6)).mean()


def _cf(a):
    """channels-last numpy -> channels-first torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def _flat(tree):
    """{'a/b/kernel': array} of a nested dict of arrays."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) or hasattr(v, "items"):
                walk(v, f"{prefix}{k}/")
            else:
                out[f"{prefix}{k}"] = np.asarray(v)

    walk(tree, "")
    return out


def _torch_params(flat):
    """medjax parameters -> torch leaf tensors in torch's layouts (conv OI*k, transposed IO*k)."""
    import torch

    out = {}
    for path, a in flat.items():
        if path.endswith("kernel") and a.ndim >= 3:
            nd = a.ndim - 2
            if "ConvTranspose" in path:  # (*k, I, O) -> (I, O, *k), spatially flipped
                a = np.transpose(a, (nd, nd + 1, *range(nd)))[
                    (slice(None),) * 2 + (slice(None, None, -1),) * nd
                ]
            else:  # (*k, I, O) -> (O, I, *k)
                a = np.transpose(a, (nd + 1, nd, *range(nd)))
        out[path] = torch.tensor(np.ascontiguousarray(a), requires_grad=True)
    return out


def _conv(P, path, x, stride=1, act=None):
    """flax ``nn.Conv(padding='SAME')`` in torch on the medjax parameters ``P[path + '/kernel']``."""
    import torch.nn.functional as F

    w = P[path + "/kernel"]
    b = P.get(path + "/bias")
    k = w.shape[-1]
    pads = []
    for n in x.shape[2:]:
        out = -(-n // stride)
        total = max((out - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    if all(lo == hi for lo, hi in pads):
        pad = tuple(lo for lo, _ in pads)
    else:  # flax's SAME puts the odd voxel after; torch pads symmetrically
        x = F.pad(x, [p for lo_hi in reversed(pads) for p in lo_hi])
        pad = 0
    conv = F.conv3d if w.dim() == 5 else F.conv2d
    y = conv(x, w, b, stride, pad)
    return y if act is None else act(y)


def _identity(torch, spatial):
    """The identity grid ``(*S, ndim)`` in voxels."""
    axes = [torch.arange(s, dtype=torch.float32) for s in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _warp(torch, img, disp):
    """``medjax.ops.warp(order=1, padding='border')`` as ``grid_sample(align_corners=True)``.

    ``img`` (B, C, *S) channels-first, ``disp`` (B, *S, ndim) voxel displacements.
    """
    spatial = img.shape[2:]
    ident = _identity(torch, spatial)
    scale = torch.tensor([s - 1 for s in spatial], dtype=torch.float32)
    grid = (2.0 * (ident + disp) / scale - 1.0).flip(-1)  # torch wants (x, y, z)
    return torch.nn.functional.grid_sample(
        img, grid, mode="bilinear", padding_mode="border", align_corners=True
    )


def _exchange_check(exchange, outs):
    """Largest |torch - medjax| over the forward outputs the medjax worker wrote to ``exchange``."""
    ref = np.load(exchange)
    diffs = []
    for i, o in enumerate(outs):
        r = ref[f"out{i}"]
        if r.shape != o.shape:
            raise ValueError(f"output {i}: medjax {r.shape}, torch {o.shape}")
        diffs.append(float(np.max(np.abs(r - o))))
    return max(diffs), max(float(np.max(np.abs(ref[f"out{i}"]))) for i in range(len(outs)))


# ------------------------------------------------------------------------------ Estienne 2020


def _estienne_medjax(model_name, kwargs):
    def build(shape, inp):
        import jax
        import jax.numpy as jnp

        from medjax.models import registry
        from medjax.nn.blocks import fast_init

        model = registry.entry(model_name).load()(**kwargs)
        joint = model_name == "JointRegSeg"
        args = (inp["moving"], inp["fixed"]) if joint else (inp["fixed"],)
        v = fast_init(model, jax.random.key(0), *map(jnp.asarray, args))

        def forward(v, inp):
            if not joint:
                return (model.apply(v, inp["fixed"])["logits"],)
            o = model.apply(v, inp["moving"], inp["fixed"])
            return o["seg_fixed_logits"], o["seg_moving_logits"], o["displacement"], o["warped"]

        def loss(p, s, inp, key):
            out = forward({"params": p}, inp)
            value = _jax_dice(out[0], inp["y_fixed"])
            if joint:
                value += _jax_dice(out[1], inp["y_moving"])
                value += jnp.mean(jnp.square(out[3] - inp["fixed"]))
            return value, s

        return v, forward, loss

    return build


def _residual_encoder(torch, P, pre, x, levels, convs):
    relu = torch.relu
    x = _conv(P, f"{pre}/ConvAct_0/Conv_0", x)
    skips = []
    for i, n in enumerate(convs[:levels]):
        if i > 0:
            x = _conv(P, f"{pre}/ConvAct_{i}/Conv_0", x, 2, relu)
        y = x
        for j in range(n):
            y = _conv(P, f"{pre}/ResidualLevel_{i}/ConvAct_{j}/Conv_0", y, 1, relu)
        x = y + x
        skips.append(x)
    return skips


def _residual_decoder(torch, P, pre, skips, convs):
    import torch.nn.functional as F

    x = skips[-1]
    for j, n in enumerate(convs):
        q = f"{pre}/ResidualUpLevel_{j}"
        t = f"{q}/UpConvAct_0/ConvTranspose_0"
        up = torch.relu(F.conv_transpose3d(x, P[t + "/kernel"], P[t + "/bias"], stride=2))
        y = torch.cat([skips[len(skips) - 2 - j], up], 1)
        for k in range(n):
            y = _conv(P, f"{q}/ConvAct_{k}/Conv_0", y, 1, torch.relu)
        x = y + up
    return x


def _estienne_torch(model_name, enc_convs=(1, 2, 3, 3, 3), dec_convs=(3, 3, 2, 1)):
    def build(shape, inp, exchange):
        import torch

        P = _torch_params(dict(np.load(exchange.with_suffix(".params.npz"))))
        joint = model_name == "JointRegSeg"
        t = {k: (_cf(v) if v.dtype == np.float32 else torch.from_numpy(v)) for k, v in inp.items()}

        def seg(skips):
            return _conv(
                P, "seg_head/Conv_0", _residual_decoder(torch, P, "seg_decoder", skips, dec_convs)
            )

        def forward(t):
            enc = lambda x: _residual_encoder(torch, P, "encoder", x, 5, enc_convs)  # noqa: E731
            skips_r = enc(t["fixed"])
            if not joint:
                return (seg(skips_r),)
            skips_s = enc(t["moving"])
            merged = [s - r for s, r in zip(skips_s, skips_r, strict=True)]
            feats = _residual_decoder(torch, P, "reg_decoder", merged, dec_convs)
            phi = torch.sigmoid(_conv(P, "reg_head", feats))  # (B, 3, *S)
            grid = torch.stack([torch.cumsum(2 * phi[:, k], dim=1 + k) for k in range(3)], -1) - 1
            disp = grid - _identity(torch, shape)
            warped = _warp(torch, t["moving"], disp)
            return seg(skips_r), seg(skips_s), disp.movedim(-1, 1), warped

        def loss(t):
            out = forward(t)
            value = _torch_dice(out[0], t["y_fixed"], 4)
            if joint:
                value = value + _torch_dice(out[1], t["y_moving"], 4)
                value = value + ((out[3] - t["fixed"]) ** 2).mean()
            return value

        return list(P.values()), lambda: forward(t), lambda: loss(t)

    return build


def _pair_inputs(channels, classes=4):
    def make(shape):
        rng = _rng()
        x = lambda: rng.normal(size=(1, *shape, channels)).astype(np.float32)  # noqa: E731
        return {
            "moving": x(),
            "fixed": x(),
            "y_moving": _labels(rng, shape, classes),
            "y_fixed": _labels(rng, shape, classes),
        }

    return make


# ------------------------------------------------------------------------------ VoxelMorph


def _voxelmorph_medjax(shape, inp):
    import jax
    import jax.numpy as jnp

    from medjax.models.voxelmorph import VoxelMorph
    from medjax.nn.blocks import fast_init

    model = VoxelMorph(n_modalities=1)
    v = fast_init(model, jax.random.key(0), jnp.asarray(inp["moving"]), jnp.asarray(inp["fixed"]))

    def forward(v, inp):
        o = model.apply(v, inp["moving"], inp["fixed"])
        return o["displacement"], o["warped"]

    def loss(p, s, inp, key):
        d, w = forward({"params": p}, inp)
        smooth = sum(jnp.mean(jnp.square(jnp.diff(d, axis=1 + k))) for k in range(3))
        return jnp.mean(jnp.square(w - inp["fixed"])) + 0.01 * smooth, s

    return v, forward, loss


def _voxelmorph_torch(shape, inp, exchange, enc=4, dec=7):
    import torch

    P = _torch_params(dict(np.load(exchange.with_suffix(".params.npz"))))
    lrelu = lambda x: torch.nn.functional.leaky_relu(x, 0.2)  # noqa: E731
    t = {k: _cf(v) for k, v in inp.items()}

    def forward(t):
        x = torch.cat([t["moving"], t["fixed"]], 1)
        skips = [x]
        for i in range(enc):
            x = _conv(P, f"ConvAct_{i}/Conv_0", x, 2, lrelu)
            skips.append(x)
        for i in range(dec):
            x = _conv(P, f"ConvAct_{enc + i}/Conv_0", x, 1, lrelu)
            if i < enc:
                up = x.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
                x = torch.cat([up, skips[enc - 1 - i]], 1)
        d = _conv(P, "flow", x)
        return d, _warp(torch, t["moving"], d.movedim(1, -1))

    def loss(t):
        d, w = forward(t)
        smooth = sum((torch.diff(d, dim=2 + k) ** 2).mean() for k in range(3))
        return ((w - t["fixed"]) ** 2).mean() + 0.01 * smooth

    return list(P.values()), lambda: forward(t), lambda: loss(t)


# ------------------------------------------------------------------------------ SmallUNet (co-training)

SMALL = {"features": 32, "levels": 5, "norm": "instance", "out_channels": 4}


def _small_inputs(shape):
    rng = _rng()
    return {"x": rng.normal(size=(1, *shape, 1)).astype(np.float32), "y": _labels(rng, shape, 4)}


def _small_medjax(shape, inp):
    import jax
    import jax.numpy as jnp

    from medjax.models.small_unet import SmallUNet
    from medjax.nn.blocks import fast_init

    model = SmallUNet(**SMALL)
    v = fast_init(model, jax.random.key(0), jnp.asarray(inp["x"]))

    def forward(v, inp):
        return (model.apply(v, inp["x"]),)

    def loss(p, s, inp, key):
        return _jax_dice(forward({"params": p}, inp)[0], inp["y"]), s

    return v, forward, loss


def _small_torch(shape, inp, exchange):
    import torch
    import torch.nn.functional as F

    P = _torch_params(dict(np.load(exchange.with_suffix(".params.npz"))))
    t = {"x": _cf(inp["x"]), "y": torch.from_numpy(inp["y"])}
    levels = SMALL["levels"]

    def forward(t):
        n = iter(range(4 * levels))

        def block(h):
            for _ in range(2):
                h = _conv(P, f"Conv_{next(n)}", h)
                h = torch.relu(F.instance_norm(h, eps=1e-5))
            return h

        skips, h = [], t["x"]
        for _ in range(levels - 1):
            h = block(h)
            skips.append(h)
            h = F.max_pool3d(h, 2)
        h = block(h)
        for level in reversed(range(levels - 1)):
            up = F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=True)
            h = block(torch.cat([up, skips[level]], 1))
        return (_conv(P, f"Conv_{next(n)}", h),)

    def loss(t):
        return _torch_dice(forward(t)[0], t["y"], 4)

    return list(P.values()), lambda: forward(t), lambda: loss(t)


# ------------------------------------------------------------------------------ FocusNetV2

FOCUS_CROP = (8, 64, 64)


def _focus_torch_module(kind, shape):
    sys.path.insert(0, str(ROOT))
    from tests.models.test_focusnet import _T, _randomise_bn

    T = _T()
    T["torch"].manual_seed(0)
    if kind == "convae":
        net = T["ConvAE"]()
    else:
        sos, sol = kind == "focusnet", kind != "snet"
        net = T["focus_net"](1, 10, SOSNet=sos, sol=sol, crop=FOCUS_CROP, volume=shape)
    return T["torch"], _randomise_bn(net)


def _focus_inputs(kind):
    def make(shape):
        rng = _rng()
        if kind == "convae":
            return {"x": (rng.random(size=(1, *shape, 1)) > 0.5).astype(np.float32)}
        return {
            "x": rng.normal(size=(1, *shape, 1)).astype(np.float32),
            "y": _labels(rng, shape, 10),
        }

    return make


def _focus_medjax(kind):
    def build(shape, inp):
        import jax.numpy as jnp

        from medjax.models.focusnet import ConvAE, FocusNetV2, load_pytorch_weights

        _, net = _focus_torch_module(kind, shape)
        if kind == "convae":
            model = ConvAE()
        else:
            sos, sol = kind == "focusnet", kind != "snet"
            model = FocusNetV2(sol=sol, sos=sos, crop_size=FOCUS_CROP)
        v = load_pytorch_weights(net.state_dict(), model)

        def forward(v, inp, train=False, mutable=False):
            return model.apply(v, inp["x"], train=train, mutable=mutable)

        def outputs(o):
            if kind == "convae":
                return (o[0],)
            if kind == "focusnet":
                return o["main_result"], o["heatmap"], o["small_result"]
            if kind == "snet":
                return (o["main_result"],)
            return o["main_result"], o["heatmap"]

        def loss(p, s, inp, key):
            o, new = forward({"params": p, **s}, inp, True, ["batch_stats"])
            o = outputs(o)
            if kind == "convae":
                value = jnp.mean(jnp.square(o[0] - inp["x"]))
            elif kind == "snet":
                value = _jax_dice(o[0], inp["y"])
            else:
                value = _jax_dice(o[0], inp["y"]) + jnp.mean(jnp.square(o[1]))
                if kind == "focusnet":
                    value += jnp.mean(jnp.square(o[2]))
            return value, dict(new)

        return v, lambda v, inp: outputs(forward(v, inp)), loss

    return build


def _focus_torch(kind):
    def build(shape, inp, exchange):
        torch, net = _focus_torch_module(kind, shape)
        t = {k: (_cf(v) if v.dtype == np.float32 else torch.from_numpy(v)) for k, v in inp.items()}

        def outputs(o):
            if kind == "convae":
                return (o[0],)
            if kind == "snet":
                return (o["main_result"],)
            out = [o["main_result"], o["heatmap"]]
            if kind == "focusnet":  # (B, n_small, *crop) -> medjax's (B, n_small, *crop, 1)
                out.append(o["small_result"][:, None])
            return tuple(out)

        def loss(t):
            o = outputs(net(t["x"]))
            if kind == "convae":
                return ((o[0] - t["x"]) ** 2).mean()
            if kind == "snet":
                return _torch_dice(o[0], t["y"], 10)
            value = _torch_dice(o[0], t["y"], 10) + (o[1] ** 2).mean()
            if kind == "focusnet":
                value = value + (o[2] ** 2).mean()
            return value

        return net, lambda: outputs(net(t["x"])), lambda: loss(t)

    return build


def _focus_spec(kind, loss_text):
    """A FocusNetV2 row: ``snet`` (S-Net alone), ``snet_sol`` (with the heatmap head),
    ``focusnet`` (the whole model) on 16 x 2size x 2size, or ``convae`` on an 8x64x64 mask."""
    shape = (
        (lambda size: FOCUS_CROP) if kind == "convae" else (lambda size: (16, 2 * size, 2 * size))
    )
    return Spec(
        loss_text,
        shape,
        _focus_inputs(kind),
        _focus_medjax(kind),
        _focus_torch(kind),
        reference="tests/models/test_focusnet.py re-creation",
    )


# ------------------------------------------------------------------------------ UniverSeg

UNIVERSEG_SUPPORT = 16


def _universeg_inputs(shape):
    rng = _rng()
    s = UNIVERSEG_SUPPORT
    return {
        "target": rng.random((1, *shape, 1), dtype=np.float32),
        "support_images": rng.random((1, s, *shape, 1), dtype=np.float32),
        "support_labels": (rng.random((1, s, *shape, 1)) > 0.5).astype(np.float32),
        "target_label": (rng.random((1, *shape, 1)) > 0.5).astype(np.float32),
    }


def _universeg_module():
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.models.test_universeg import _torch_universeg

    torch.manual_seed(0)
    return torch, _torch_universeg(torch)


def _universeg_medjax(shape, inp):
    import jax
    import jax.numpy as jnp

    from medjax.models.universeg import UniverSeg, load_pytorch_weights

    _, net = _universeg_module()
    model = UniverSeg()
    v = load_pytorch_weights(net.state_dict())

    def forward(v, inp):
        return (model.apply(v, inp["target"], inp["support_images"], inp["support_labels"]),)

    def loss(p, s, inp, key):
        pred = jax.nn.sigmoid(forward({"params": p}, inp)[0])
        return jnp.mean(jnp.square(pred - inp["target_label"])), s

    return v, forward, loss


def _universeg_torch(shape, inp, exchange):
    torch, net = _universeg_module()
    t = {
        "target": _cf(inp["target"]),
        "target_label": _cf(inp["target_label"]),
        # (B, S, H, W, 1) -> (B, S, 1, H, W)
        "support_images": torch.from_numpy(
            np.ascontiguousarray(np.moveaxis(inp["support_images"], -1, 2))
        ),
        "support_labels": torch.from_numpy(
            np.ascontiguousarray(np.moveaxis(inp["support_labels"], -1, 2))
        ),
    }

    def forward(t):
        return (net(t["target"], t["support_images"], t["support_labels"]),)

    def loss(t):
        return ((torch.sigmoid(forward(t)[0]) - t["target_label"]) ** 2).mean()

    return net, lambda: forward(t), lambda: loss(t)


# ------------------------------------------------------------------------------ PnP-AdaNet


def _pnp_inputs(shape):
    rng = _rng()
    return {"x": rng.normal(size=(1, *shape, 3)).astype(np.float32), "y": _labels(rng, shape, 5)}


def _pnp_medjax(shape, inp):
    import jax
    import jax.numpy as jnp

    from medjax.models.pnp_adanet import PnPAdaNet
    from medjax.nn.blocks import fast_init

    model = PnPAdaNet()
    v = fast_init(model, jax.random.key(0), jnp.asarray(inp["x"]))

    def logits(o):
        return o["logits"] if isinstance(o, dict) else o

    def forward(v, inp):
        return (logits(model.apply(v, inp["x"], train=False)),)

    def loss(p, s, inp, key):
        mutable = ["batch_stats"] if "batch_stats" in s else False
        rngs = {"dropout": key}
        o = model.apply({"params": p, **s}, inp["x"], train=True, rngs=rngs, mutable=mutable)
        o, new = o if mutable else (o, s)
        return _jax_dice(logits(o), inp["y"]), dict(new)

    return v, forward, loss


def _pnp_critic_inputs(channels):
    def make(shape):
        return {"x": _rng().normal(size=(1, *shape, channels)).astype(np.float32)}

    return make


def _pnp_critic_medjax(cls_name):
    def build(shape, inp):
        import jax
        import jax.numpy as jnp

        from medjax.models import pnp_adanet
        from medjax.nn.blocks import fast_init

        model = getattr(pnp_adanet, cls_name)()
        v = fast_init(model, jax.random.key(0), jnp.asarray(inp["x"]))

        def forward(v, inp):
            return (model.apply(v, inp["x"], train=False),)

        def loss(p, s, inp, key):
            mutable = ["batch_stats"] if "batch_stats" in s else False
            rngs = {"dropout": key}
            o = model.apply({"params": p, **s}, inp["x"], train=True, rngs=rngs, mutable=mutable)
            o, new = o if mutable else (o, s)
            return jnp.mean(o), dict(new)

        return v, forward, loss

    return build


# ------------------------------------------------------------------------------ the rows


def _cube(size):
    return (size,) * 3


def cases():
    """{row name: Spec} of every system network outside the zoo."""
    seg_loss = "the zoo's Dice on the logits"
    return {
        "jointregseg": Spec(
            "Dice on both segmentations + MSE(warped moving, fixed)",
            _cube,
            _pair_inputs(4),
            _estienne_medjax("JointRegSeg", {"f": 8, "n_modalities": 4, "n_classes": 4}),
            _estienne_torch("JointRegSeg"),
            reference="functional torch on the medjax weights",
        ),
        "segmentationnet": Spec(
            seg_loss,
            _cube,
            _pair_inputs(4),
            _estienne_medjax("SegmentationNet", {"f": 8, "n_modalities": 4, "n_classes": 4}),
            _estienne_torch("SegmentationNet"),
            reference="functional torch on the medjax weights",
        ),
        "voxelmorph": Spec(
            "MSE(warped, fixed) + 0.01 squared gradient",
            _cube,
            _pair_inputs(1),
            _voxelmorph_medjax,
            _voxelmorph_torch,
            reference="functional torch on the medjax weights",
        ),
        "smallunet": Spec(
            seg_loss + " (co-training's paper-size network: 32 features, 5 levels, instance norm)",
            _cube,
            _small_inputs,
            _small_medjax,
            _small_torch,
            reference="functional torch on the medjax weights",
        ),
        "snet": _focus_spec("snet", "Dice on the S-Net logits"),
        "snet_sol": _focus_spec("snet_sol", "Dice on the S-Net logits + mean squared heatmap"),
        "focusnetv2": _focus_spec(
            "focusnet",
            "Dice on the S-Net logits + mean squared heatmap + mean squared crop logits",
        ),
        "convae": _focus_spec("convae", "MSE reconstruction of an 8x64x64 mask"),
        "universeg": Spec(
            f"MSE of the sigmoid prediction (support {UNIVERSEG_SUPPORT})",
            lambda size: (128, 128),
            _universeg_inputs,
            _universeg_medjax,
            _universeg_torch,
            reference="tests/models/test_universeg.py re-creation",
        ),
        "pnpadanet": Spec(
            seg_loss + " (2.5D: 3 slices)",
            lambda size: (256, 256),
            _pnp_inputs,
            _pnp_medjax,
            None,
            reference="none: the original is TensorFlow 1",
        ),
        "pnpadanet_critic": Spec(
            "the mean WGAN score (one side of the critic's loss)",
            lambda size: (256, 256),
            _pnp_critic_inputs(32),
            _pnp_critic_medjax("PnPAdaNetCritic"),
            None,
            reference="none: the original is TensorFlow 1",
        ),
        "pnpadanet_mask_critic": Spec(
            "the mean WGAN score (one side of the critic's loss)",
            lambda size: (256, 256),
            _pnp_critic_inputs(5),
            _pnp_critic_medjax("PnPAdaNetMaskCritic"),
            None,
            reference="none: the original is TensorFlow 1",
        ),
    }
