"""Training output: ``metrics.jsonl``, progress (tqdm on a terminal, plain lines otherwise), TensorBoard."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

__all__ = [
    "MetricsWriter",
    "Progress",
    "TensorBoardWriter",
    "format_metrics",
    "jsonable",
    "read_metrics",
    "write_text_atomic",
]


def write_text_atomic(path, text: str) -> pathlib.Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves old or new."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _to_float(v):
    v = np.asarray(v)
    if v.size != 1:
        raise ValueError(f"metrics: expected scalar values, got shape {v.shape}")
    return v.item()


def jsonable(x):
    """``x`` as plain JSON values: dicts (str keys), lists (from tuples), numbers, strings, None.

    NumPy/JAX scalars become Python numbers, non-finite floats the strings ``"nan"``/``"inf"``
    (``float()`` reads them back; every line stays valid JSON), anything else its ``str``.
    The one JSON sanitiser of medjax (configs, checkpoints' JSON items, metrics, results).
    """
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic) or (hasattr(x, "item") and getattr(x, "shape", None) == ()):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


class MetricsWriter:
    """Append one JSON object per logged step to ``path`` (``metrics.jsonl``).

    Each line is ``{"step": int, "loss": float, <name>: float, ...}``: the train metrics of that step
    and, at a validation step, the validation metrics named ``val_*`` in the same object.
    """

    def __init__(self, path, *, enabled: bool = True):
        self.path = pathlib.Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def truncate_after(self, step: int):
        """Drop lines logged after ``step`` (a resumed run re-logs them); a no-op without a file."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if int(record.get("step", 0)) <= step:
                kept.append(json.dumps(record))
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, step: int, metrics: dict) -> dict:
        """Append ``metrics`` (host scalars or 0-d arrays) for ``step``; returns the record."""
        record = {"step": int(step)}
        record.update({k: jsonable(_to_float(v)) for k, v in metrics.items()})
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, one dict per logged step."""
    return [
        json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()
    ]


def format_metrics(metrics: dict, *, digits: int = 4) -> str:
    """``"loss 0.1234 dice 0.8"``: a short one-line rendering of scalar metrics."""
    parts = []
    for k, v in metrics.items():
        if k == "step":
            continue
        parts.append(f"{k} {v:.{digits}g}" if isinstance(v, float) else f"{k} {v}")
    return " ".join(parts)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Progress output: a tqdm bar (ETA, live loss) on a terminal, else plain periodic lines.

    ``interactive=None`` asks ``stream.isatty()``. Plain lines look like
    ``step 20/100 (20%) loss 0.1234 | 5.1 steps/s | ETA 0:00:16``. Only the first process prints
    (``enabled``).
    """

    def __init__(self, total, *, initial=0, interactive=None, stream=None, enabled=True):
        self.total, self.initial, self.enabled = int(total), int(initial), enabled
        self.stream = sys.stderr if stream is None else stream
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive and enabled
        self._bar = None
        self._t0 = None  # time of the first completed step (excludes compilation)
        self._s0 = self.initial
        self._last = self.initial
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.initial,
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
            )

    def rate(self) -> float:
        """Steps per second since the first completed step (NaN before two steps)."""
        if self._t0 is None or self._last <= self._s0:
            return math.nan
        return (self._last - self._s0) / max(time.perf_counter() - self._t0, 1e-9)

    def update(self, step: int, metrics: dict | None = None):
        """Record that ``step`` steps are done; ``metrics`` (host floats) are shown when given."""
        if self._t0 is None:
            self._t0, self._s0 = time.perf_counter(), step
        if self._bar is not None:
            self._bar.update(step - self._last)
            if metrics:
                self._bar.set_postfix_str(format_metrics(metrics), refresh=False)
        self._last = step
        if metrics is not None and self.enabled and not self.interactive:
            self.line(self._line(step, metrics))

    def _line(self, step, metrics):
        pct = 100.0 * step / max(self.total, 1)
        rate = self.rate()
        eta = (self.total - step) / rate if rate and math.isfinite(rate) and rate > 0 else math.nan
        speed = f"{rate:.3g} steps/s" if math.isfinite(rate) else "- steps/s"
        return (
            f"step {step}/{self.total} ({pct:.0f}%) {format_metrics(metrics)} | {speed} | "
            f"ETA {_fmt_time(eta)}"
        )

    def line(self, text: str):
        """Print one message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self):
        """Close the bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TensorBoardWriter:
    """Scalars to TensorBoard event files when tensorboardX or torch's writer is importable, else nothing.

    ``purge_step`` (a resumed run's first new step) hides the events an earlier run wrote at that
    step and after, so a resume never shows two curves over the same steps.
    """

    def __init__(self, logdir, *, enabled=True, purge_step=None):
        self._writer = None
        if not enabled:
            return
        writer_cls = None
        try:
            from tensorboardX import SummaryWriter as writer_cls
        except ImportError:
            # torch's writer needs the tensorboard package; do not import torch without it.
            if importlib.util.find_spec("tensorboard") is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter as writer_cls
                except ImportError:
                    writer_cls = None
        if writer_cls is not None:
            if purge_step is None:
                self._writer = writer_cls(str(logdir))
            else:
                self._writer = writer_cls(str(logdir), purge_step=int(purge_step))

    @property
    def active(self) -> bool:
        """Whether event files are being written."""
        return self._writer is not None

    def write(self, step: int, metrics: dict, *, split: str = "train"):
        """Add each scalar as ``<split>/<name>``."""
        if self._writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self._writer.add_scalar(f"{split}/{k}", v, int(step))

    def close(self):
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
