"""Evaluation shared by every experiment: statistics over cases, segmentation evaluation and
prediction and markdown reports. Names resolve lazily. (Figures: :mod:`medjax.figures`.)

- :mod:`~medjax.evaluation.stats`: ``summary`` (mean ± std over cases), ``summarize`` (a dict of
  per-case lists), ``paired_bootstrap`` (the paired difference's mean, bootstrap CI and cases improved).
- :mod:`~medjax.evaluation.segmentation`: ``case_metrics`` (per-class Dice, HD95, ASSD of one
  case), ``evaluate_segmentation`` (a predictor over cases: per-case values, means and stds),
  ``make_predictor`` (sliding-window or one-pass logits), ``predict_files`` (NIfTI label maps with
  the input's geometry).
- :mod:`~medjax.evaluation.report`: markdown tables and cells.
"""

from medjax._lazy import attach

_LAZY = {
    "summary": "medjax.evaluation.stats",
    "summarize": "medjax.evaluation.stats",
    "paired_bootstrap": "medjax.evaluation.stats",
    "case_metrics": "medjax.evaluation.segmentation",
    "evaluate_segmentation": "medjax.evaluation.segmentation",
    "make_predictor": "medjax.evaluation.segmentation",
    "predict_files": "medjax.evaluation.segmentation",
    "markdown_table": "medjax.evaluation.report",
    "mean_std": "medjax.evaluation.report",
}

__getattr__, __dir__ = attach(__name__, _LAZY)
