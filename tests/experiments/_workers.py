"""What the multi-device worker scripts of tests/experiments share (imported as ``_workers``: a
worker runs as a script, so its own folder is on ``sys.path``)."""

import jax
import numpy as np


def params_by_path(state):
    """``{network: {parameter path: nested list}}``: one entry per array, named by its path (a
    nested list would be flattened by ``jax.tree.leaves`` into one leaf per number)."""
    return {
        k: {
            jax.tree_util.keystr(path): np.asarray(a, np.float64).tolist()
            for path, a in jax.tree_util.tree_leaves_with_path(v.params)
        }
        for k, v in state.items()
    }
