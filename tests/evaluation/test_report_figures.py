"""medjax.evaluation.report (markdown cells and tables) and figures (files are written, slices chosen)."""

import numpy as np
import pytest

from medjax.evaluation import figures as F
from medjax.evaluation.report import gain_cell, markdown_table, mean_std, results_table


def test_cells_and_tables():
    assert mean_std(0.81234, 0.04) == "0.812 ± 0.040"
    assert mean_std(0.5) == "0.500" and mean_std(float("nan"), 0.1) == "-"
    assert gain_cell({"mean": 0.04, "ci95": [0.018, 0.062], "improved": 13, "n": 16}) == (
        "+0.040 [+0.018, +0.062] (13/16)"
    )
    assert gain_cell(None) == "-"
    t = markdown_table(["a", "b"], [[1, 0.123456], ["x", float("nan")]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x | - |"]
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b"], [[1]])
    rows = {"r1": {"label": "first", "dice": 0.5, "dice_std": 0.1}, "r2": {"dice": 0.7}}
    assert results_table(rows, [("Dice", "dice")]).splitlines()[2:] == [
        "| first | 0.500 ± 0.100 |",
        "| r2 | 0.700 |",
    ]


def test_choose_slice_and_figures_are_written(tmp_path):
    mask = np.zeros((6, 6, 9), np.int32)
    mask[2:4, 2:4, 7] = 1
    mask[1:5, 1:5, 3] = 2
    assert F.choose_slice(mask, axis=2) == 3 and F.choose_slice(np.zeros((4, 4, 4)), axis=0) == 2
    img = np.random.default_rng(0).normal(size=(6, 6, 9))
    p = F.segmentation_panels(
        tmp_path / "seg.png", img, mask, {"model": np.roll(mask, 1, 0)}, axis=2
    )
    assert p.is_file() and p.stat().st_size > 1000
    p = F.bar_chart(
        tmp_path / "bars.png", ["a", "b"], {"x": ([0.5, 0.6], [0.1, 0.1]), "y": ([0.4, 0.7], None)}
    )
    assert p.is_file()
    plt = F.plt()
    fig, axes = plt.subplots(1, 2)
    F.deformation_grid(axes[0], np.zeros((8, 8, 2)))
    F.jacobian_map(axes[1], np.ones((8, 8)), fig=fig)
    assert F.save(fig, tmp_path / "sub" / "grid.png").is_file()
    assert F.curves(tmp_path / "c.png", [1, 2, 3], {"w": [0.1, 0.5, 1.0]}).is_file()
