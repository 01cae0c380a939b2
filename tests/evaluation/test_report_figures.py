"""medjax.evaluation.report (markdown cells and tables) and medjax.figures (files are written, slices
chosen, colours and positions as documented)."""

import numpy as np
import pytest

from medjax import figures as F
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


def test_rows_down_draws_each_element_where_rows_down_point_says():
    """show_image draws element [x, y] of its array at (x, y); rows_down's element of (r, c) is
    drawn at rows_down_point(r, c): row 0 on top (the largest y), column c at x = c."""
    a = np.arange(12).reshape(3, 4)
    t = F.rows_down(a)
    assert t.shape == (4, 3)
    for r in range(3):
        for c in range(4):
            x, y = F.rows_down_point(r, c, 3)
            assert t[x, y] == a[r, c]
    assert F.rows_down_point(0, 0, 3) == (0, 2)


def test_label_colours_agree_between_overlay_and_contours():
    lab = np.zeros((10, 10), np.int32)
    lab[2:5, 2:8] = 1
    lab[5:8, 2:8] = 3  # touches label 1; label 2 absent
    plt = F.plt()
    fig, (a0, a1, a2) = plt.subplots(1, 3)
    F.label_overlay(a0, np.zeros((10, 10)), lab, num_classes=4)
    im = a0.get_images()[-1]
    colours = F.label_colors(3)
    for c in (1, 3):
        np.testing.assert_allclose(im.cmap(im.norm(c)), colours[c])
    # each present label is outlined on its own (two touching labels: two outlines), in its colour
    F.label_contours(a1, lab, num_classes=4)
    drawn = [np.asarray(cs.get_edgecolor())[0] for cs in a1.collections]
    assert len(drawn) == 2
    np.testing.assert_allclose(drawn[0], colours[1])
    np.testing.assert_allclose(drawn[1], colours[3])
    # one colour for all labels, or one per label (indexed by label - 1)
    F.label_contours(a2, lab, colors=["r", "g", "b"])
    got = [tuple(np.round(np.asarray(cs.get_edgecolor())[0][:3], 3)) for cs in a2.collections]
    assert got == [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]
    plt.close(fig)


def test_panel_grid(tmp_path):
    img = np.random.default_rng(0).normal(size=(12, 10))
    lab = np.zeros((12, 10), np.int32)
    lab[3:7, 2:6] = 2
    rows = [
        [
            F.Panel(img, "image", markers=[(3, 4, "x", {"label": "peak"})], legend=True),
            F.Panel(img, "labels", labels=lab, num_classes=3),
        ],
        [
            F.Panel(img, heat=img > 0, heat_kw={"cmap": "hot", "alpha": 0.5}, contours=lab),
            None,  # an empty cell
        ],
        [F.Panel(None, "blank", ylabel="row 3"), F.Panel(img, aspect=2.0, ylabel="row 3")],
    ]
    p = F.panel_grid(tmp_path / "g" / "grid.png", rows, title="t", legend={"two": "red"})
    assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one row"):
        F.panel_grid(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match="legend_style"):
        F.panel_grid(tmp_path / "x.png", rows, legend={"a": "r"}, legend_style="dots")
    assert not (tmp_path / "x.png").exists()


def test_scatter_and_styled_curves(tmp_path):
    pts = np.random.default_rng(1).normal(size=(20, 2))
    assert F.scatter(tmp_path / "s.png", {"a": pts, "b": pts + 1}, xlabel="PC 1").is_file()
    p = F.curves(
        tmp_path / "c.png",
        None,
        {"m": ([1, 2, 4, 8], [10, 20, 30, 40])},
        styles={"m": "o-"},
        xlog_base=2,
        ylim=(0, 100),
        grid=True,
    )
    assert p.is_file()
