"""Deterministic, resumable, process-sharded host input pipeline built on grain.

``make_iterator`` turns any random-access source (``len(source)``, ``source[i] -> dict of arrays``) into
an iterator of host-local batches (the data iterator protocol of ``docs/design.md``):

* Epoch ``e`` visits the records in the order ``permutation(seed, e)`` (or ``0..N-1`` without shuffle);
  global batch ``k`` of the epoch is items ``[k*B, (k+1)*B)`` of that order, ``B`` the global batch.
* Process ``p`` of ``P`` takes the slice ``[p*B/P, (p+1)*B/P)`` of every global batch, so concatenating
  the processes' batches in process order gives the global batch, for any ``P``.
* ``transform(record, rng)`` runs on the host with ``rng = np.random.default_rng([seed, 1, e, i])`` for
  record ``i`` in epoch ``e``: independent of batch size, process count, threads and restarts.
* The position is one integer (the next global batch), so ``get_state()`` is a small JSON dict, and
  ``set_state`` resumes exactly, even with a different process count (the global batches are the same).

Batches are assembled by grain (``MapDataset.range(...).map(...)``, ``to_iter_dataset`` with a thread
pool that prefetches whole batches). Device-side augmentation is not done here: the train step applies
it to the global batch on device, with its own ``jax.random`` key.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BatchIterator",
    "FunctionSource",
    "RecordSource",
    "make_iterator",
    "make_mixed_iterator",
    "stack_records",
]

_STATE_VERSION = 1


class FunctionSource:
    """A random-access source computed by ``fn(index) -> dict of numpy arrays`` (deterministic in index)."""

    def __init__(self, length: int, fn: Callable[[int], Mapping[str, Any]]):
        if not isinstance(length, int | np.integer) or length < 1:
            raise ValueError(f"length: expected a positive integer, got {length!r}")
        if not callable(fn):
            raise ValueError(f"fn: expected a callable index -> record, got {type(fn).__name__}")
        self._length = int(length)
        self._fn = fn

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index: expected 0 <= index < {self._length}, got {index}")
        return self._fn(index)

    def __repr__(self) -> str:
        return (
            f"FunctionSource(length={self._length}, fn={getattr(self._fn, '__name__', self._fn)})"
        )


def _load_record_arrays(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from medjax.data.datasets import load_record

    loaded = load_record(record)
    out = {
        "image": loaded.image,
        "affine": np.asarray(loaded.affine, np.float64),
        "spacing": np.asarray(loaded.spacing, np.float64),
    }
    if loaded.label is not None:
        out["label"] = loaded.label
    return out


class RecordSource:
    """A random-access source over dataset records (``medjax.data.datasets``).

    ``source[i] = load_fn(records[i])``; the default ``load_fn`` returns ``{"image": (*S, C) float32,
    "label": (*S) int32, "affine": (4, 4), "spacing": (ndim,)}`` via
    :func:`medjax.data.datasets.load_record` (no "label" when absent), so every batch keeps the
    geometry needed to write its predictions back.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        load_fn: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    ):
        records = list(records)
        if not records:
            raise ValueError("records: expected at least one record, got an empty sequence")
        self.records = records
        self._load_fn = load_fn or _load_record_arrays

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self._load_fn(self.records[int(index)])

    def __repr__(self) -> str:
        return f"RecordSource({len(self.records)} records)"


def stack_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stacks a list of (possibly nested) dicts of arrays into one dict with a leading batch axis."""
    first = records[0]
    if not isinstance(first, Mapping):
        raise ValueError(f"record: expected a dict of arrays, got {type(first).__name__}")
    out = {}
    for key in first:
        values = []
        for r in records:
            if not isinstance(r, Mapping) or set(r) != set(first):
                keys = sorted(r) if isinstance(r, Mapping) else type(r).__name__
                raise ValueError(
                    f"record: expected keys {sorted(first)} in every record, got {keys}"
                )
            values.append(r[key])
        if isinstance(first[key], Mapping):
            out[key] = stack_records(values)
        else:
            arrays = [np.asarray(v) for v in values]
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise ValueError(
                    f"record[{key!r}]: expected one shape across the batch, got {sorted(shapes)}"
                )
            out[key] = np.stack(arrays)
    return out


class BatchIterator:
    """Iterator of host-local batches with ``get_state()``/``set_state()``; see :func:`make_iterator`."""

    def __init__(self, grain_dataset, read_options, fingerprint: dict, steps_per_epoch: int, total):
        self._dataset = grain_dataset
        self._read_options = read_options
        self._fingerprint = fingerprint
        self.steps_per_epoch = steps_per_epoch
        self.num_batches = total  # None when infinite
        self._it = grain_dataset.to_iter_dataset(read_options).__iter__()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._it)

    @property
    def next_batch(self) -> int:
        """Index of the next global batch (counted from the start of epoch 0)."""
        return int(self._it.get_state()["next_index"])

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.next_batch // self.steps_per_epoch

    def get_state(self) -> dict:
        """Returns a JSON-serialisable dict from which :meth:`set_state` resumes exactly."""
        return {"version": _STATE_VERSION, "next_batch": self.next_batch, **self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores the position saved by :meth:`get_state` (the pipeline settings must match)."""
        if not isinstance(state, Mapping) or "next_batch" not in state:
            raise ValueError(
                f"state: expected a dict from get_state() with 'next_batch', got {state!r}"
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"state: expected version {_STATE_VERSION}, got {state.get('version')!r}"
            )
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise ValueError(
                    f"state: saved {key}={state.get(key)!r} does not match this pipeline's {value!r}"
                )
        nb = state["next_batch"]
        if isinstance(nb, float | np.floating) and float(nb).is_integer():
            nb = int(nb)  # tolerate JSON round trips that turned the integer into a float
        if (
            not isinstance(nb, int | np.integer)
            or nb < 0
            or (self.num_batches is not None and nb > self.num_batches)
        ):
            raise ValueError(f"state: next_batch must be in [0, {self.num_batches}], got {nb!r}")
        self._it.set_state({"next_index": int(nb)})

    def close(self) -> None:
        """Stops the prefetch threads."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_iterator(
    source,
    *,
    batch_size: int,
    seed: int,
    transform: Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, Any]] | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    shard_by_process: bool = True,
    prefetch_threads: int = 2,
    prefetch_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Returns a resumable iterator of host-local batches (dicts of stacked numpy arrays).

    Args:
      source: random-access sequence, ``source[i] -> dict of numpy arrays`` (e.g. :class:`FunctionSource`,
        :class:`RecordSource`).
      batch_size: the GLOBAL batch size ``B``; each process yields ``B // process_count`` items
        (``B`` when ``shard_by_process`` is False, i.e. every process sees the whole batch).
      seed: non-negative integer; fixes the per-epoch shuffles and the transform rngs.
      transform: host-side ``transform(record, rng) -> record`` with ``rng`` derived from
        ``(seed, epoch, index)``.
      shuffle: reshuffle every epoch (deterministically); otherwise index order.
      num_epochs: stop after this many epochs; None repeats forever.
      drop_remainder: drop each epoch's last incomplete global batch (required with several processes).
      shard_by_process: split every global batch over processes by ``process_index``.
      prefetch_threads: threads building batches ahead (0: build on demand in the caller's thread).
      prefetch_batches: batches kept ready (default ``2 * prefetch_threads``).
      process_index, process_count: override ``jax.process_index()/process_count()`` (testing).
    """
    import grain

    try:
        n = len(source)
    except TypeError as e:
        raise ValueError(
            f"source: expected a sized random-access sequence, got {type(source).__name__}"
        ) from e
    if n < 1:
        raise ValueError(f"source: expected at least one record, got length {n}")
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if num_epochs is not None and (not isinstance(num_epochs, int | np.integer) or num_epochs < 1):
        raise ValueError(f"num_epochs: expected None or a positive integer, got {num_epochs!r}")
    if not isinstance(prefetch_threads, int | np.integer) or prefetch_threads < 0:
        raise ValueError(
            f"prefetch_threads: expected a non-negative integer, got {prefetch_threads!r}"
        )
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index: expected 0 <= process_index < process_count={process_count}, "
            f"got {process_index}"
        )
    batch_size, seed, n = int(batch_size), int(seed), int(n)
    if shard_by_process:
        if batch_size % process_count:
            raise ValueError(
                f"batch_size: expected a multiple of process_count={process_count}, got {batch_size}"
            )
        local = batch_size // process_count
        lo = process_index * local
    else:
        local, lo = batch_size, 0
    if drop_remainder:
        if n < batch_size:
            raise ValueError(
                f"batch_size: {batch_size} exceeds the {n} records of the source with drop_remainder=True"
            )
        steps = n // batch_size
    else:
        if shard_by_process and process_count > 1:
            raise ValueError(
                "drop_remainder: must be True when batches are sharded over "
                f"process_count={process_count} processes (hosts need equal batch sizes)"
            )
        steps = -(-n // batch_size)
    total = None if num_epochs is None else steps * int(num_epochs)

    orders: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def order(epoch: int) -> np.ndarray:
        with lock:
            o = orders.get(epoch)
            if o is None:
                if shuffle:
                    o = np.random.default_rng([seed, 0, epoch]).permutation(n)
                else:
                    o = np.arange(n)
                if len(orders) >= 4:
                    orders.pop(min(orders))
                orders[epoch] = o
            return o

    def build(batch_index: int) -> dict[str, Any]:
        epoch, step = divmod(int(batch_index), steps)
        items = order(epoch)[step * batch_size : (step + 1) * batch_size][lo : lo + local]
        records = []
        for i in items:
            rec = source[int(i)]
            if transform is not None:
                rec = transform(rec, np.random.default_rng([seed, 1, epoch, int(i)]))
            records.append(rec)
        return stack_records(records)

    dataset = grain.MapDataset.range(sys.maxsize if total is None else total).map(build)
    threads = int(prefetch_threads)
    buffer = 0 if threads == 0 else int(prefetch_batches or 2 * threads)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    fingerprint = {
        "seed": seed,
        "num_records": n,
        "global_batch_size": batch_size,
        "shuffle": bool(shuffle),
        "num_epochs": None if num_epochs is None else int(num_epochs),
        "drop_remainder": bool(drop_remainder),
        "shard_by_process": bool(shard_by_process),
    }
    return BatchIterator(dataset, read_options, fingerprint, steps, total)


def make_mixed_iterator(
    sources: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    weights: Sequence[float] | None = None,
    class_masks: Sequence[Sequence[bool]] | None = None,
    transform: Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, Any]] | None = None,
    shard_by_process: bool = True,
    prefetch_threads: int = 2,
    prefetch_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """A resumable iterator of host-local batches drawn from several sources with given weights.

    Each source is shuffled (reshuffled every pass over it) and repeated forever, and the sources
    are interleaved in proportion to ``weights`` (grain's ``MapDataset.shuffle``, ``repeat`` and
    ``mix``); global batch ``k`` is elements ``[k*B, (k+1)*B)`` of that stream and process ``p``
    takes its slice of every global batch, as :func:`make_iterator` does, so the global batches are
    the same for any process count and the position (``get_state``) is one integer.

    Every record gains ``"source"`` (int: which source it came from) and, with ``class_masks``
    (one boolean vector per source: which classes that source's labels annotate), ``"class_mask"``
    ``(num_classes,)`` — the per-sample mask of partially labelled datasets. ``transform(record,
    rng)`` gets ``rng = default_rng([seed, 2, j])`` for stream element ``j`` (independent of batch
    size, process count and restarts).
    """
    import grain

    sources = list(sources)
    if not sources:
        raise ValueError("sources: expected at least one source, got none")
    lengths = []
    for k, s in enumerate(sources):
        try:
            n = len(s)
        except TypeError as e:
            raise ValueError(f"sources[{k}]: expected a sized random-access sequence") from e
        if n < 1:
            raise ValueError(f"sources[{k}]: expected at least one record, got length {n}")
        lengths.append(int(n))
    if weights is None:
        weights = [1.0] * len(sources)
    weights = [float(w) for w in weights]
    if len(weights) != len(sources) or any(not w > 0 for w in weights):
        raise ValueError(
            f"weights: expected {len(sources)} positive values (one per source), got {weights}"
        )
    masks = None
    if class_masks is not None:
        masks = [np.asarray(m, bool) for m in class_masks]
        if len(masks) != len(sources) or len({m.shape for m in masks}) != 1 or masks[0].ndim != 1:
            raise ValueError(
                f"class_masks: expected {len(sources)} boolean vectors of one length (one per "
                f"source), got shapes {[m.shape for m in masks]}"
            )
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    batch_size, seed = int(batch_size), int(seed)
    if shard_by_process:
        if batch_size % process_count:
            raise ValueError(
                f"batch_size: expected a multiple of process_count={process_count}, got {batch_size}"
            )
        local = batch_size // process_count
        lo = process_index * local
    else:
        local, lo = batch_size, 0

    streams = [
        grain.MapDataset.range(n)
        .shuffle(seed=int(np.random.default_rng([seed, 3, k]).integers(2**31)))
        .repeat(None)
        .map(functools.partial(_tag, k))
        for k, n in enumerate(lengths)
    ]
    stream = grain.MapDataset.mix(streams, weights)

    def build(batch_index: int) -> dict[str, Any]:
        records = []
        for j in range(batch_index * batch_size + lo, batch_index * batch_size + lo + local):
            k, i = stream[j]
            rec = dict(sources[k][i])
            if transform is not None:
                rec = dict(transform(rec, np.random.default_rng([seed, 2, j])))
            rec["source"] = np.int32(k)
            if masks is not None:
                rec["class_mask"] = masks[k]
            records.append(rec)
        return stack_records(records)

    dataset = grain.MapDataset.range(sys.maxsize).map(build)
    threads = int(prefetch_threads)
    buffer = 0 if threads == 0 else int(prefetch_batches or 2 * threads)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    fingerprint = {
        "seed": seed,
        "num_records": lengths,
        "weights": weights,
        "global_batch_size": batch_size,
        "shard_by_process": bool(shard_by_process),
    }
    return BatchIterator(dataset, read_options, fingerprint, 1, None)


def _tag(k, i):
    return (k, int(i))
