"""Tests for the grain input pipeline: determinism, reshuffling, exact resume, process sharding."""

import itertools
import json

import nibabel as nib
import numpy as np
import pytest

from medjax.data import pipeline


def _source(n=12):
    return pipeline.FunctionSource(
        n, lambda i: {"index": np.int64(i), "x": np.full((2, 3), i, np.float32)}
    )


def _noise(record, rng):
    return {**record, "noise": rng.normal(size=()).astype(np.float32)}


def _take(it, k):
    return [next(it) for _ in range(k)]


def _indices(batches):
    return [b["index"].tolist() for b in batches]


def _make(**kw):
    args = dict(batch_size=4, seed=0, process_index=0, process_count=1, prefetch_threads=2)
    args.update(kw)
    source = args.pop("source", None) or _source()
    return pipeline.make_iterator(source, **args)


def test_batches_shapes_and_epoch_coverage():
    it = _make()
    assert it.steps_per_epoch == 3
    batches = _take(it, 9)  # three epochs of 12 records
    assert batches[0]["x"].shape == (4, 2, 3) and batches[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(batches[0]["x"][:, 0, 0], batches[0]["index"])
    epochs = [sum(_indices(batches[3 * e : 3 * e + 3]), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))  # every record exactly once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled per epoch
    assert epochs[0] != list(range(12))
    assert it.epoch == 3 and it.next_batch == 9
    plain = _make(shuffle=False)
    assert sum(_indices(_take(plain, 6)), []) == list(range(12)) * 2


def test_deterministic_from_seed():
    a = _indices(_take(_make(seed=5), 6))
    b = _indices(_take(_make(seed=5, prefetch_threads=0), 6))
    c = _indices(_take(_make(seed=6), 6))
    assert a == b
    assert a != c


def test_transform_rng_depends_only_on_seed_epoch_index():
    def table(it, k):
        out = {}
        for epoch_batches in range(k):
            b = next(it)
            e = epoch_batches // it.steps_per_epoch
            for i, v in zip(b["index"].tolist(), b["noise"].tolist(), strict=True):
                out[(e, i)] = v
        return out

    t4 = table(_make(transform=_noise, batch_size=4), 6)  # 2 epochs
    t6 = table(_make(transform=_noise, batch_size=6, prefetch_threads=0), 4)  # 2 epochs
    assert t4.keys() == t6.keys() == {(e, i) for e in range(2) for i in range(12)}
    assert t4 == t6  # same rng for a record regardless of batch size or threads
    assert t4[(0, 3)] != t4[(1, 3)]  # fresh randomness each epoch
    t_other = table(_make(transform=_noise, seed=1), 3)
    assert t_other[(0, 3)] != t4[(0, 3)]


@pytest.mark.parametrize("threads", [0, 3])
def test_resume_mid_epoch_matches_uninterrupted(threads):
    reference = _take(_make(transform=_noise, prefetch_threads=threads), 10)
    it = _make(transform=_noise, prefetch_threads=threads)
    _take(it, 4)  # mid-epoch 1 (3 batches per epoch); prefetch threads have already run ahead
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_batch"] == 4
    it.close()
    resumed = _make(transform=_noise, prefetch_threads=threads)
    resumed.set_state(state)
    for want, got in zip(reference[4:], _take(resumed, 6), strict=True):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])
    # rewinding the same iterator works too
    resumed.set_state({**state, "next_batch": 0})
    np.testing.assert_array_equal(next(resumed)["index"], reference[0]["index"])


def test_state_mismatch_rejected():
    it = _make()
    state = it.get_state()
    with pytest.raises(ValueError, match="seed"):
        _make(seed=1).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _make(batch_size=6).set_state(state)
    with pytest.raises(ValueError, match="next_batch"):
        _make(num_epochs=1).set_state({**_make(num_epochs=1).get_state(), "next_batch": 99})


def test_process_sharding_reassembles_global_batch():
    global_batches = _indices(_take(_make(batch_size=8, source=_source(24)), 6))
    locals_ = []
    for p in range(4):
        it = _make(batch_size=8, source=_source(24), process_index=p, process_count=4)
        locals_.append(_indices(_take(it, 6)))
    for k in range(6):
        assert all(len(locals_[p][k]) == 2 for p in range(4))
        assert sum((locals_[p][k] for p in range(4)), []) == global_batches[k]
    # different processes never see the same record within a global batch
    assert len(set(itertools.chain(*(locals_[p][0] for p in range(4))))) == 8
    # a state saved with 1 process resumes on 2 processes at the same global batch
    one = _make(batch_size=8, source=_source(24))
    _take(one, 2)
    state = one.get_state()
    halves = []
    for p in range(2):
        it = _make(batch_size=8, source=_source(24), process_index=p, process_count=2)
        it.set_state(state)
        halves.append(next(it)["index"].tolist())
    assert halves[0] + halves[1] == global_batches[2]
    replicated = _make(batch_size=8, source=_source(24), process_index=1, process_count=4,
                       shard_by_process=False)  # fmt: skip
    assert next(replicated)["index"].tolist() == global_batches[0]
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        _make(batch_size=8, process_index=0, process_count=3)


def test_finite_epochs_and_remainder():
    it = _make(source=_source(10), batch_size=4, num_epochs=2)
    batches = list(it)
    assert len(batches) == 4 == it.num_batches  # 2 full batches per epoch, remainder dropped
    keep = list(_make(source=_source(10), batch_size=4, num_epochs=1, drop_remainder=False))
    assert [len(b["index"]) for b in keep] == [4, 4, 2]
    assert sorted(sum(_indices(keep), [])) == list(range(10))
    with pytest.raises(ValueError, match="drop_remainder"):
        _make(drop_remainder=False, process_count=2)
    with pytest.raises(ValueError, match="exceeds the 3 records"):
        _make(source=_source(3), batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        _make(batch_size=0)
    with pytest.raises(IndexError):
        _source(3)[3]
    default = pipeline.make_iterator(_source(), batch_size=4, seed=0)  # jax.process_index/count
    assert len(next(default)["index"]) == 4


def test_inconsistent_records_rejected():
    src = pipeline.FunctionSource(4, lambda i: {"x": np.zeros((i % 2 + 1,))})
    with pytest.raises(ValueError, match=r"record\['x'\]: expected one shape"):
        next(_make(source=src, batch_size=2, shuffle=False, prefetch_threads=0))


def test_record_source_over_nifti_files(tmp_path):
    records = []
    affine = np.diag([1.5, 2.0, 1.0, 1.0])
    for i in range(4):
        img = np.full((4, 4, 4), float(i), np.float32)
        lab = (np.arange(64).reshape(4, 4, 4) % (i + 2)).astype(np.int16)
        nib.save(nib.Nifti1Image(img, affine), str(tmp_path / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / f"lab{i}.nii.gz"))
        records.append(
            {
                "id": f"c{i}",
                "image": [str(tmp_path / f"img{i}.nii.gz")],
                "label": str(tmp_path / f"lab{i}.nii.gz"),
                "meta": {},
            }
        )
    src = pipeline.RecordSource(records)
    it = pipeline.make_iterator(
        src, batch_size=2, seed=0, num_epochs=1, process_index=0, process_count=1
    )
    batches = list(it)
    assert len(batches) == 2
    for b in batches:
        assert b["image"].shape == (2, 4, 4, 4, 1) and b["label"].shape == (2, 4, 4, 4)
        # the geometry travels with the batch
        np.testing.assert_allclose(b["affine"], np.broadcast_to(affine, (2, 4, 4)))
        np.testing.assert_allclose(b["spacing"], [[1.5, 2.0, 1.0]] * 2)
        for img, lab in zip(b["image"], b["label"], strict=True):
            i = int(img[0, 0, 0, 0])
            np.testing.assert_array_equal(lab, np.arange(64).reshape(4, 4, 4) % (i + 2))
    seen = sorted(int(b["image"][j, 0, 0, 0, 0]) for b in batches for j in range(2))
    assert seen == [0, 1, 2, 3]


def _mixed(process_index=0, process_count=1, **kw):
    from medjax.data.pipeline import FunctionSource, make_mixed_iterator

    sources = [
        FunctionSource(7, lambda i: {"x": np.float32(i), "id": np.int32(i)}),
        FunctionSource(3, lambda i: {"x": np.float32(100 + i), "id": np.int32(100 + i)}),
    ]
    args = dict(
        batch_size=8,
        seed=0,
        weights=[3.0, 1.0],
        class_masks=[[1, 1, 0], [1, 0, 1]],
        process_index=process_index,
        process_count=process_count,
        prefetch_threads=1,
    )
    args.update(kw)
    return make_mixed_iterator(sources, **args)


def test_mixed_iterator_weights_masks_and_coverage():
    it = _mixed()
    batches = [next(it) for _ in range(30)]
    src = np.concatenate([b["source"] for b in batches])
    assert abs((src == 0).mean() - 0.75) < 0.01  # proportions follow the weights
    for b in batches:
        expected = np.where(b["source"][:, None] == 0, [1, 1, 0], [1, 0, 1]).astype(bool)
        np.testing.assert_array_equal(b["class_mask"], expected)
        assert np.all((b["id"] >= 100) == (b["source"] == 1))
    ids = np.concatenate([b["id"] for b in batches])
    # every pass over a source visits each of its records once (reshuffled per pass)
    first = ids[src == 0][:7]
    assert sorted(first.tolist()) == list(range(7))
    second = ids[src == 0][7:14]
    assert sorted(second.tolist()) == list(range(7)) and not np.array_equal(first, second)
    it.close()


def test_mixed_iterator_same_global_batches_for_any_process_count_and_resumes():
    def transform(rec, rng):
        return {**rec, "noise": np.float32(rng.normal())}

    whole = _mixed(transform=transform)
    parts = [_mixed(p, 2, transform=transform) for p in range(2)]
    for _ in range(5):
        g = next(whole)
        local = [next(p) for p in parts]
        for key in g:
            np.testing.assert_array_equal(g[key], np.concatenate([b[key] for b in local]))
    state = whole.get_state()
    ahead = [next(whole) for _ in range(3)]
    resumed = _mixed(transform=transform)
    resumed.set_state(state)
    for a in ahead:
        b = next(resumed)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="weights"):
        _mixed(weights=[1.0])
    with pytest.raises(ValueError, match="class_masks"):
        _mixed(class_masks=[[1, 0], [1, 0, 1]])
    for it in (whole, resumed, *parts):
        it.close()
