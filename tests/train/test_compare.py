"""medjax compare on the toy experiment: rows in W/<variant>/<row>, compare.json/md, a row with the
same config as another reuses its results, one differing only in evaluation settings its training,
a rerun reuses finished rows, --only, bad rows."""

import json
import pathlib

import pytest

from medjax.train.compare import compare, select_rows
from medjax.train.experiment import load_experiment

TOY = pathlib.Path(__file__).parent / "toy_experiments"


def test_compare_rows_results_table_and_reuse(tmp_path):
    spec = load_experiment("toy", directory=TOY)
    lines = []
    res = compare(spec, "quick", tmp_path, overrides=["num_steps=4"], log=lines.append)
    assert list(res) == ["a_slow", "b_fast", "c_same", "d_eval"]
    for row in res:
        saved = json.loads((tmp_path / "quick" / row / "results.json").read_text())
        assert saved["row"] == row and saved["config"]["num_steps"] == 4
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(
        json.dumps(res, default=str)
    )
    md = (tmp_path / "compare.md").read_text()
    assert "| (a) Adam 0.05 |" in md and "| (b) Adam 0.2 |" in md
    # (c) has (a)'s config: its results, not a second training
    assert (
        res["c_same"]["same_as"] == "a_slow"
        and not (tmp_path / "quick" / "c_same" / "checkpoints").exists()
    )
    assert res["c_same"]["val_loss"] == res["a_slow"]["val_loss"]
    assert res["a_slow"]["val_loss"] != res["b_fast"]["val_loss"]
    # (d) differs from (a) in an evaluation setting only: (a)'s training, (d)'s evaluation
    a, d = tmp_path / "quick" / "a_slow", tmp_path / "quick" / "d_eval"
    assert any("same training as 'a_slow'" in s for s in lines)
    assert (d / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()
    files = sorted(p.relative_to(a) for p in (a / "checkpoints").rglob("*") if p.is_file())
    assert files and all((d / f).stat().st_ino == (a / f).stat().st_ino for f in files)  # linked
    assert res["d_eval"]["val_loss"] == res["a_slow"]["val_loss"]
    assert res["d_eval"]["val_loss_scaled"] == 2 * res["a_slow"]["val_loss_scaled"]
    assert res["d_eval"]["config"]["eval"]["scale"] == 2
    # a rerun reuses every finished row
    lines.clear()
    compare(spec, "quick", tmp_path, overrides=["num_steps=4"], log=lines.append)
    assert sum("reusing" in s for s in lines) == 4 and not any("evaluating" in s for s in lines)
    # another base variant works in its own folder: nothing stale is reused
    lines.clear()
    compare(spec, "long", tmp_path, only="a", overrides=["num_steps=3"], log=lines.append)
    assert (tmp_path / "long" / "a_slow" / "results.json").is_file() and any(
        "evaluating" in s for s in lines
    )


def test_select_rows():
    rows = {"a_x": 1, "b_y": 2, "d2_z": 3}
    assert select_rows(rows, "a,d2") == ["a_x", "d2_z"] and select_rows(rows, "") == list(rows)
    with pytest.raises(ValueError, match="'q' is not a row"):
        select_rows(rows, "q")
    # a full row name picks that row alone, even when it is another row's prefix
    rows = {"cotraining_no_ema": 1, "cotraining": 2, "s1_a": 3, "s1_b": 4}
    assert select_rows(rows, "cotraining") == ["cotraining"]
    assert select_rows(rows, "s1") == ["s1_a", "s1_b"] and select_rows(rows, "s1_b") == ["s1_b"]
