"""Markdown reports: mean ± std cells, tables from rows of results, paired-gain cells.

Every experiment's ``results.md`` and every ``compare.md`` is written with these, so tables look
the same across the library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["gain_cell", "markdown_table", "mean_std", "paired_gain", "results_table"]


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def mean_std(mean, std=None, digits: int = 3) -> str:
    """``"0.812 ± 0.041"`` (``"0.812"`` without a finite std, ``"-"`` without a finite mean)."""
    if not _finite(mean):
        return "-"
    if not _finite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def gain_cell(gain: Mapping | None, digits: int = 3) -> str:
    """``"+0.040 [+0.018, +0.062] (13/16)"`` from :func:`medjax.evaluation.stats.paired_bootstrap`."""
    if not gain:
        return "-"
    lo, hi = gain["ci95"]
    return f"{gain['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] ({gain['improved']}/{gain['n']})"


def paired_gain(results: Mapping, before: str, after: str, *, per: str = "per_pair", **kw):
    """:func:`medjax.evaluation.stats.paired_bootstrap` of two per-case lists of ``results[per]``."""
    from medjax.evaluation.stats import paired_bootstrap

    cases = results.get(per, {})
    return paired_bootstrap(cases.get(before, []), cases.get(after, []), **kw)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; cells are ``str``-ed, floats to 4 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return "-" if not math.isfinite(v) else f"{v:.4g}"
        return str(v)

    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"rows: expected {len(header)} cells per row, got {len(r)} in {r!r}")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(
    rows: Mapping[str, Mapping],
    columns: Sequence[tuple],
    *,
    label_key: str = "label",
    first_header: str = "row",
) -> str:
    """Table of several results dicts (row name -> results): one column per ``(header, key[, digits])``.

    A cell is ``results[key] ± results[key + "_std"]`` (see :func:`mean_std`); a missing key is "-".
    The first column is ``results[label_key]`` or the row name.
    """
    header = [first_header] + [c[0] for c in columns]
    body = []
    for name, res in rows.items():
        line = [res.get(label_key, name)]
        for col in columns:
            key, digits = col[1], (col[2] if len(col) > 2 else 3)
            line.append(mean_std(res.get(key), res.get(f"{key}_std"), digits))
        body.append(line)
    return markdown_table(header, body)
