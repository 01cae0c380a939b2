"""Staged training in one fit: stage order and lengths, the enter hook (a warm start), a frozen network
reaching the loss, per-stage iterators, resume inside a stage and at a stage boundary; warm start
from another work directory; iterators without get_state are refused; sharded initialisation."""

import io
import json
import pathlib

import jax
import numpy as np
import pytest

from medjax.train import fit, load_config, load_experiment, make_mesh, replicated
from medjax.train.config import ConfigError
from medjax.train.logging import read_metrics
from medjax.train.transfer import copy_subtrees, get_subtree, load_workdir_state, warm_start

TOYS = pathlib.Path(__file__).parent / "staged_experiments"


def _run(workdir, *overrides, name="staged"):
    cfg = load_config(name, None, list(overrides), directory=TOYS)
    exp = load_experiment(name, directory=TOYS).build(cfg)
    out = io.StringIO()
    state, summary = fit(exp, cfg, workdir, stream=out, interactive=False)
    return state, summary, out.getvalue()


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stages_run_in_order_with_their_steps_and_the_warm_start(tmp_path):
    # With b's learning rate 0, b ends exactly where the enter hook put it: a's parameters
    # at the end of the pre-training stage; a itself is frozen during fine-tuning.
    state, summary, out = _run(tmp_path / "r", "lr_b=0.0", "keep_checkpoints=10")
    assert summary["step"] == 9 and int(state["a"].step) == 4 and int(state["b"].step) == 5
    _same(state["b"].params, state["a"].params)
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [(r["step"], r["stage"]) for r in records] == [
        (2, "pretrain"),
        (4, "pretrain"),
        (6, "finetune"),
        (8, "finetune"),
        (9, "finetune"),
    ]
    assert "match" in records[-1] and "match" not in records[0]
    assert "stage 2/2 'finetune': steps 5-9" in out
    # a checkpoint at the end of every stage
    assert {4, 9} <= {
        int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()
    }


@pytest.mark.parametrize("cut", [2, 4, 6])  # inside stage 1, at the boundary, inside stage 2
def test_a_run_cut_in_any_stage_resumes_bit_identical(tmp_path, cut):
    full, _, _ = _run(tmp_path / "full")
    first = min(cut, 4)
    _run(
        tmp_path / "cut",
        f"stages.pretrain.num_steps={first}",
        f"stages.finetune.num_steps={cut - first}",
        f"num_steps={cut}",
    )
    resumed, summary, out = _run(tmp_path / "cut")
    assert summary["start_step"] == cut and f"from step {cut}" in out
    _same(full, resumed)
    assert read_metrics(tmp_path / "full" / "metrics.jsonl") == read_metrics(
        tmp_path / "cut" / "metrics.jsonl"
    )


def test_num_steps_must_be_the_sum_of_the_stages(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain 4 \+ finetune 5 = 9"):
        _run(tmp_path, "num_steps=7")


def test_an_iterator_without_get_state_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match="stage 'finetune' iterator: expected an iterator with get_state"
    ):
        _run(tmp_path, "no_state_iterator=True")


def test_parameters_are_initialised_with_their_sharding(tmp_path):
    state, _, _ = _run(tmp_path, "stages.finetune.num_steps=0", "num_steps=4")
    rep = replicated(make_mesh())
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_equivalent_to(rep, leaf.ndim)


def test_warm_start_from_another_work_directory(tmp_path):
    a, _, _ = _run(tmp_path / "src", "keep_checkpoints=10")
    cfg = load_config("staged", None, [], directory=TOYS)
    exp = load_experiment("staged", directory=TOYS).build(cfg)
    fresh = exp.init_state(jax.random.PRNGKey(5))
    started = warm_start(fresh, tmp_path / "src", {"a/params": "b/params"}, experiment="staged")
    _same(started["a"].params, a["b"].params)
    _same(started["b"].params, fresh["b"].params)  # untouched
    tree = load_workdir_state(tmp_path / "src", step=4)
    assert int(tree["a"]["step"]) == 4
    with pytest.raises(ValueError, match="holds a run of experiment 'staged', expected 'toy'"):
        warm_start(fresh, tmp_path / "src", {"a/params": "b/params"}, experiment="toy")


def test_copy_subtrees_names_both_paths_on_a_shape_mismatch():
    import jax.numpy as jnp

    dst = {"dam": {"group_1": {"kernel": jnp.zeros((3, 3, 4))}}}
    src = {"seg": {"group_1": {"kernel": jnp.ones((3, 3, 8))}}}
    with pytest.raises(
        ValueError,
        match=r"source state:seg/group_1\['kernel'\] has shape \(3, 3, 8\), "
        r"dam/group_1\['kernel'\] has \(3, 3, 4\)",
    ):
        copy_subtrees(dst, src, {"dam/group_1": "seg/group_1"}, src_name="source state")
    with pytest.raises(ValueError, match="no entry 'group_2'"):
        copy_subtrees(dst, src, {"dam/group_1": "seg/group_2"})
    ok = copy_subtrees(
        dst, {"seg": {"group_1": {"kernel": jnp.ones((3, 3, 4))}}}, {"dam/group_1": "seg/group_1"}
    )
    assert float(get_subtree(ok, "dam/group_1/kernel").sum()) == 36.0
    assert json.dumps(sorted(ok)) == '["dam"]'
