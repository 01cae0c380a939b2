"""PyTorch ``state_dict`` -> Flax variables: the one import path for the originals' checkpoints.

A network's ``load_pytorch_weights`` lists how its torch keys map onto its Flax variables as a
*spec*: a sequence of ``(flax_path, torch_prefix, kind)`` with ``flax_path`` a ``/``-separated path
under the variables (without the collection) and ``kind`` one of :data:`KINDS`. :func:`convert`
applies the spec, moves every layout to channels-last (conv ``(O, I, *K)`` -> ``(*K, I, O)``,
transposed conv ``(I, O, *K)`` -> ``(*K, I, O)``, linear ``(O, I)`` -> ``(I, O)``), and checks the
result against the network's own variables (:func:`match_variables`): a missing, unexpected or
mis-shaped key raises ``ValueError`` naming the first one with both shapes. Conversion happens here
and nowhere else.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KINDS", "convert", "match_variables", "read_state_dict"]

#: torch parameter suffixes per kind: (suffix, Flax collection, Flax leaf name, layout).
KINDS = {
    "conv": (("weight", "params", "kernel", "conv"), ("bias", "params", "bias", None)),
    "conv_transpose": (
        ("weight", "params", "kernel", "conv_transpose"),
        ("bias", "params", "bias", None),
    ),
    "linear": (("weight", "params", "kernel", "linear"), ("bias", "params", "bias", None)),
    "batch_norm": (
        ("weight", "params", "scale", None),
        ("bias", "params", "bias", None),
        ("running_mean", "batch_stats", "mean", None),
        ("running_var", "batch_stats", "var", None),
    ),
    "norm_affine": (("weight", "params", "scale", None), ("bias", "params", "bias", None)),
    "prelu": (("weight", "params", "negative_slope", "prelu"),),
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
# kinds whose weight must be present (a norm without affine parameters has only statistics)
_WEIGHT_REQUIRED = ("conv", "conv_transpose", "linear", "prelu")


def read_state_dict(path_or_state_dict, *, strip_prefix: str = "module.") -> dict[str, np.ndarray]:
    """A ``{key: float32 numpy array}`` dict from a ``.pt``/``.pth`` path, an ``.npz`` or a mapping.

    ``.pt`` files are read with ``torch.load(weights_only=True)`` (torch must be installed; an
    ``.npz`` of the same keys needs no torch). A checkpoint dict holding a ``"state_dict"`` or
    ``"model_state_dict"`` entry is unwrapped, and a leading ``strip_prefix`` (``DataParallel``'s
    ``module.``) is removed from every key.
    """
    src = path_or_state_dict
    if isinstance(src, str | pathlib.Path):
        path = pathlib.Path(src)
        if not path.is_file():
            raise ValueError(f"path_or_state_dict: expected an existing file, got {path}")
        if path.suffix == ".npz":
            with np.load(path) as f:
                src = {k: f[k] for k in f.files}
        else:
            try:
                import torch
            except ImportError as e:
                raise ValueError(
                    f"path_or_state_dict: reading {path} needs torch; install it or convert the "
                    "state_dict to an .npz of the same keys"
                ) from e
            try:
                src = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(
                    f"path_or_state_dict: {path} is not a readable torch file ({e})"
                ) from e
    if not isinstance(src, Mapping):
        raise ValueError(
            f"path_or_state_dict: expected a mapping of tensors, got {type(src).__name__}"
        )
    for wrapper in ("state_dict", "model_state_dict"):
        if wrapper in src and isinstance(src[wrapper], Mapping):
            src = src[wrapper]
    out = {}
    for key, value in src.items():
        key = str(key)
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = np.asarray(value)
    return out


def _layout(array, layout, key):
    if layout is None:
        return array
    if layout == "conv":
        if array.ndim < 3:
            raise ValueError(
                f"state_dict[{key!r}]: expected a conv weight (O, I, *K), got {array.shape}"
            )
        return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))
    if layout == "conv_transpose":
        if array.ndim < 3:
            raise ValueError(
                f"state_dict[{key!r}]: expected a transposed-conv weight (I, O, *K), got {array.shape}"
            )
        return np.transpose(array, tuple(range(2, array.ndim)) + (0, 1))
    if layout == "linear":
        if array.ndim == 2:
            return array.T
        if array.ndim > 2 and all(s == 1 for s in array.shape[2:]):  # a 1^d conv used as a linear
            return array.reshape(array.shape[:2]).T
        raise ValueError(f"state_dict[{key!r}]: expected a linear weight (O, I), got {array.shape}")
    if layout == "prelu":
        return array.reshape(()) if array.size == 1 else array
    raise AssertionError(layout)


def _set(tree, path, value):
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def convert(
    state_dict,
    spec: Sequence[tuple[str, str, str]],
    template=None,
    *,
    name="network",
    ignore_prefixes: Sequence[str] = (),
):
    """Flax variables from a torch ``state_dict`` and a spec (see the module docstring).

    Optional torch suffixes (a bias, the BN statistics of an affine-free norm) are taken when
    present. Keys starting with one of ``ignore_prefixes`` (submodules an original defines but
    never calls) are dropped; every other key must be used (``num_batches_tracked`` excepted),
    else ``ValueError`` lists the unused ones. With ``template`` (the network's variables or their
    ``jax.eval_shape``), every converted tensor is checked against it: a mismatch is reported by
    its torch key and shape and the Flax path, then the whole tree by :func:`match_variables`.
    """
    sd = read_state_dict(state_dict) if not isinstance(state_dict, dict) else dict(state_dict)
    sd = {
        k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in sd.items()
        if not (ignore_prefixes and k.startswith(tuple(ignore_prefixes)))
    }
    used = set()
    variables: dict = {}
    sources = {}  # Flax path -> (torch key, converted shape), for error messages
    for flax_path, prefix, kind in spec:
        if kind not in KINDS:
            raise ValueError(
                f"spec: unknown kind {kind!r} for {prefix!r}; expected one of {sorted(KINDS)}"
            )
        first = f"{prefix}.{KINDS[kind][0][0]}" if prefix else KINDS[kind][0][0]
        if kind in _WEIGHT_REQUIRED and first not in sd:
            raise ValueError(f"{name} checkpoint: missing key {first} (for {flax_path})")
        found = False
        for suffix, collection, leaf, layout in KINDS[kind]:
            key = f"{prefix}.{suffix}" if prefix else suffix
            if key not in sd:
                continue
            found = True
            used.add(key)
            value = _layout(sd[key].astype(np.float32), layout, key)
            path = [collection, *(p for p in flax_path.split("/") if p), leaf]
            _set(variables, path, value)
            sources["/".join(path)] = (key, value.shape)
        if not found:
            raise ValueError(f"{name} checkpoint: missing key {first} (for {flax_path})")
    unused = sorted(k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unused:
        raise ValueError(
            f"{name} checkpoint: unexpected keys {unused[:5]}{' ...' if len(unused) > 5 else ''} "
            f"({len(unused)} not used by this network)"
        )
    if template is None:
        return jax.tree.map(jnp.asarray, variables)
    want = _flat(dict(template))
    for path, (key, got) in sources.items():
        if path not in want:
            raise ValueError(
                f"{name} checkpoint: unexpected key {key} (shape {tuple(sd[key].shape)}); this "
                f"network has no {path}"
            )
        if tuple(got) != tuple(np.shape(want[path])):
            raise ValueError(
                f"{name} checkpoint: {key} has shape {tuple(sd[key].shape)}, which gives {path} "
                f"the shape {tuple(got)}; this network expects {tuple(np.shape(want[path]))}"
            )
    return match_variables(template, variables, name=name)


def _flat(tree, prefix=()):
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, prefix + (str(k),)))
        return out
    return {"/".join(prefix): tree}


def match_variables(template, variables, *, name="network"):
    """``variables`` as float32 jax arrays, checked leaf by leaf against ``template``'s shapes.

    Raises ``ValueError`` naming the first missing, unexpected or mis-shaped variable (with both
    shapes), so a checkpoint of another network or configuration never loads silently.
    """
    want, got = _flat(dict(template)), _flat(dict(variables))
    for path in sorted(want):
        if path not in got:
            raise ValueError(
                f"{name} checkpoint: missing {path} (shape {tuple(np.shape(want[path]))}) for this network"
            )
    for path in sorted(got):
        if path not in want:
            raise ValueError(
                f"{name} checkpoint: unexpected {path} (shape {tuple(np.shape(got[path]))}); "
                "this network has no such variable"
            )
        ws, gs = tuple(np.shape(want[path])), tuple(np.shape(got[path]))
        if ws != gs:
            raise ValueError(f"{name} checkpoint: {path} has shape {gs}, this network expects {ws}")
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)
