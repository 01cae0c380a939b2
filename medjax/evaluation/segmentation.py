"""The one segmentation evaluator and predictor of medjax.

- :func:`case_metrics`: per-class Dice, HD95 and ASSD (in mm through the spacing) of one case.
- :func:`make_predictor`: logits of a whole volume from a model, in one forward pass or by
  sliding-window inference (``medjax.inference``, ``sw_batch_size`` windows at a time).
- :func:`evaluate_segmentation`: a predictor over cases (preprocessed exactly as for training by
  the caller's ``preprocess``); per-case values plus means and standard deviations.
- :func:`predict_files`: label maps (and optionally probabilities) for image files, written with
  each input's affine and header, through the same preprocessing as training and its inverse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics
from medjax.evaluation.stats import summarize

__all__ = [
    "Prepared",
    "case_metrics",
    "evaluate_segmentation",
    "make_predictor",
    "predict_files",
]


def _names(num_classes, class_names):
    if class_names is None:
        return [f"class{c}" for c in range(1, num_classes)]
    names = list(class_names)
    if len(names) == num_classes:
        names = names[1:]  # a list that includes the background
    if len(names) != num_classes - 1:
        raise ValueError(
            f"class_names: expected {num_classes - 1} foreground names (or {num_classes} with the "
            f"background), got {len(names)}"
        )
    return names


def case_metrics(
    pred,
    truth,
    *,
    num_classes: int,
    spacing=None,
    class_names: Sequence[str] | None = None,
    surface: bool = True,
    classes: Sequence[int] | None = None,
) -> dict:
    """Per-class metrics of one case: ``{"dice_<name>", "hd95_<name>", "assd_<name>", "mean_dice", ...}``.

    ``pred``, ``truth``: integer label maps ``(*S)``; ``spacing``: voxel size (mm) per axis.
    Foreground classes only; a class absent from ``truth`` is NaN (MONAI's ``ignore_empty``), and
    the means are over the classes present. ``classes`` restricts to some foreground ids (e.g. the
    organs a partially labelled case annotates). ``surface=False`` skips HD95/ASSD (they cost far
    more than Dice on large volumes).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred: expected the label map's shape {truth.shape}, got {pred.shape}")
    names = _names(num_classes, class_names)
    keep = range(1, num_classes) if classes is None else [int(c) for c in classes]
    d = np.asarray(metrics.dice(pred[None], truth[None], num_classes=num_classes))[0]
    out = {}
    if surface:
        sp = None if spacing is None else np.asarray(spacing, np.float64)[None]
        hd = metrics.hausdorff_distance(
            pred[None], truth[None], num_classes=num_classes, spacing=sp
        )
        asd = metrics.surface_distance(pred[None], truth[None], num_classes=num_classes, spacing=sp)
        hd, asd = np.asarray(hd)[0], np.asarray(asd)[0]
    for c in keep:
        out[f"dice_{names[c - 1]}"] = float(d[c - 1])
        if surface:
            out[f"hd95_{names[c - 1]}"] = float(hd[c - 1])
            out[f"assd_{names[c - 1]}"] = float(asd[c - 1])
    for m in ("dice", "hd95", "assd") if surface else ("dice",):
        vals = np.asarray([out[f"{m}_{names[c - 1]}"] for c in keep], np.float64)
        vals = vals[np.isfinite(vals)]
        out[f"mean_{m}"] = float(vals.mean()) if vals.size else float("nan")
    return out


def _logits_of(output):
    """The logits of a model's output: the array, a dict's ``logits``/``main_result``, a tuple's first."""
    if isinstance(output, Mapping):
        for key in ("logits", "main_result", "refined"):
            if key in output:
                return output[key]
        raise ValueError(f"model output: expected a 'logits' entry, got keys {sorted(output)}")
    if isinstance(output, tuple | list):
        return output[0]
    return output


def make_predictor(
    apply_fn: Callable,
    variables,
    *,
    roi_size=None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    output: Callable = _logits_of,
    **apply_kwargs,
) -> Callable:
    """``predict(volume (B, *S, C)) -> logits (B, *S, K)`` for ``apply_fn(variables, x, train=False)``.

    With ``roi_size`` the volume is segmented by sliding-window inference (windows of ``roi_size``
    with ``overlap``, ``sw_batch_size`` windows per call, blended with ``mode`` weights); without
    it, in one forward pass. ``variables`` (params *and* model state such as BatchNorm statistics)
    are passed to the compiled function as arguments, so a predictor compiles once per shape.
    ``output`` picks the logits from the model's output (tuple or dict outputs).
    """
    from medjax.inference import sliding_window_inference

    def forward(x, v):
        return output(apply_fn(v, x, train=False, **apply_kwargs))

    jitted = jax.jit(forward)

    def predict(volume):
        volume = jnp.asarray(volume, jnp.float32)
        if roi_size is None:
            return jitted(volume, variables)
        return sliding_window_inference(
            volume,
            roi_size,
            forward,
            overlap=overlap,
            mode=mode,
            sw_batch_size=sw_batch_size,
            args=(variables,),
        )

    return predict


def evaluate_segmentation(
    cases: Iterable[Mapping],
    predict: Callable,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    surface: bool = True,
    on_case: Callable | None = None,
) -> dict:
    """Evaluate ``predict`` on ``cases``: per-case metrics, their means and standard deviations.

    Each case is a dict with ``image`` ``(*S, C)`` (already preprocessed as for training),
    ``label`` ``(*S)`` int, optional ``id``, ``spacing`` (mm, for HD95/ASSD) and ``classes`` (the
    foreground ids it annotates; default all). ``predict(image[None]) -> (1, *S, K)`` logits or
    probabilities (e.g. from :func:`make_predictor`). ``on_case(index, case, pred_labels, probs)``
    is called after each case (figures). Returns ``{"num_cases", "per_case": [{"id", ...}],
    <metric>: mean, <metric>_std: std, "inference_s_per_case"}``.
    """
    per_case, lists, times = [], {}, []
    for i, case in enumerate(cases):
        image = np.asarray(case["image"], np.float32)
        label = np.asarray(case["label"])
        if image.shape[:-1] != label.shape:
            raise ValueError(
                f"case {case.get('id', i)}: expected a label of the image's spatial shape "
                f"{image.shape[:-1]}, got {label.shape}"
            )
        t0 = time.perf_counter()
        probs = np.asarray(jax.device_get(predict(image[None])))[0]
        times.append(time.perf_counter() - t0)
        if probs.shape[:-1] != label.shape or probs.shape[-1] != num_classes:
            raise ValueError(
                f"predict: expected {(1, *label.shape, num_classes)} for case {case.get('id', i)}, "
                f"got {(1, *probs.shape)}"
            )
        pred = np.argmax(probs, axis=-1).astype(np.int32)
        m = case_metrics(
            pred,
            label,
            num_classes=num_classes,
            spacing=case.get("spacing"),
            class_names=class_names,
            surface=surface,
            classes=case.get("classes"),
        )
        per_case.append({"id": str(case.get("id", i)), **m})
        for k, v in m.items():
            lists.setdefault(k, []).append(v)
        if on_case is not None:
            on_case(i, case, pred, probs)
    results = {"num_cases": len(per_case), **summarize(lists), "per_case": per_case}
    # The first call compiles; the mean of the others is the inference time.
    rest = times[1:] if len(times) > 1 else times
    results["inference_s_per_case"] = float(np.mean(rest)) if rest else math.nan
    return results


@dataclasses.dataclass
class Prepared:
    """A preprocessed input: the network's ``image`` ``(*S', C)`` and ``restore``, which maps an
    array on that grid ``(*S', ...)`` back onto the input's grid ``(*S, ...)`` (labels with
    ``order=0``)."""

    image: np.ndarray
    restore: Callable[..., np.ndarray]


def predict_files(
    paths: Sequence,
    out_dir,
    *,
    predict: Callable,
    preprocess: Callable,
    num_classes: int,
    probabilities: bool = False,
    suffix: str = "_seg",
    metadata: dict | Callable[[], dict] | None = None,
) -> list[pathlib.Path]:
    """Segment image files and write ``<name><suffix>.nii.gz`` (and ``<name>_probs.nii.gz``).

    ``preprocess(image: medjax.data.io.Image) -> Prepared`` applies the training preprocessing;
    ``predict(x (1, *S', C)) -> (1, *S', K)`` logits. The label map (argmax) and, with
    ``probabilities``, the softmax are restored onto each input's grid and written with its
    affine and header (``save_image(like=...)``). Returns the written paths.

    With ``metadata`` (a dict, or a callable giving one once every file is done, for what the
    predictions themselves say), ``out_dir/predict.json`` holds it beside ``"outputs"``: each
    input's path -> the paths written for it.
    """
    from medjax.data.io import load_image, save_image

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, outputs = [], {}
    for path in paths:
        path = pathlib.Path(path)
        first = len(written)
        image = load_image(path)
        prepared = preprocess(image)
        logits = np.asarray(jax.device_get(predict(np.asarray(prepared.image, np.float32)[None])))[
            0
        ]
        if logits.shape[-1] != num_classes:
            raise ValueError(
                f"predict: expected {num_classes} output channels, got {logits.shape[-1]}"
            )
        labels = prepared.restore(np.argmax(logits, -1).astype(np.int32), order=0)
        name = path.name
        for ext in (".nii.gz", ".nii", ".nrrd", ".mgz", ".mgh", ".hdr", ".img"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        ext = ".nrrd" if path.suffix == ".nrrd" else ".nii.gz"
        written.append(
            save_image(out_dir / f"{name}{suffix}{ext}", labels.astype(np.int32), like=image)
        )
        if probabilities:
            probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
            probs = prepared.restore(probs, order=1)
            written.append(
                save_image(out_dir / f"{name}_probs.nii.gz", probs.astype(np.float32), like=image)
            )
        outputs[str(path)] = [str(p) for p in written[first:]]
    if metadata is not None:
        meta = metadata() if callable(metadata) else metadata
        record = {**meta, "outputs": outputs}
        (out_dir / "predict.json").write_text(json.dumps(record, indent=2) + "\n")
    return written
