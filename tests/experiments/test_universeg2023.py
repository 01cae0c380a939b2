"""experiments/universeg2023: tiny end-to-end train + eval through the ``medjax`` command."""

import json
import math

import jax
import numpy as np

from medjax.cli import main
from medjax.train.checkpoint import abstract_state, restore_state
from medjax.train.config import config_from_json, load_config
from medjax.train.experiment import load_experiment
from medjax.train.mesh import make_mesh, replicated

# 16x16 tasks, a 2-level 4-channel UniverSeg and no augmentation keep compilation to seconds.
TINY = [
    "--config.num_steps=3",
    "--config.batch_size=4",
    "--config.log_every=1",
    "--config.checkpoint_every=3",
    "--config.data.size=16",
    "--config.data.support_size=2",
    "--config.data.num_train_generators=6",
    "--config.data.num_heldout_generators=1",
    "--config.data.in_task_augment=False",
    "--config.data.task_augment.flip=0.0",
    "--config.data.task_augment.rot90=0.0",
    "--config.data.task_augment.boundary=0.0",
    "--config.data.task_augment.invert=0.0",
    "--config.model.features=(4,4)",
    "--config.eval.support_sizes=(1,2)",
    "--config.eval.queries_per_task=2",
    "--config.eval.ensemble=2",
    "--config.eval.unet_support_sizes=(2,)",
    "--config.eval.unet_steps=2",
    "--config.eval.unet_features=4",
    "--config.eval.unet_augment=False",
    "--config.eval.floor_support_sizes=(1,)",
]


def _np_dice(prob, label):
    """Hand-written binary Dice of prob > 0.5 vs label (1 when both are empty)."""
    p, t = prob > 0.5, label > 0.5
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else 2.0 * np.sum(p & t) / denom


def test_train_eval_cli(tmp_path):
    work = tmp_path / "run"
    assert (
        main(["train", "universeg2023", "--variant", "quick", "--workdir", str(work), *TINY]) == 0
    )
    assert main(["eval", "universeg2023", "--workdir", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["experiment"] == "universeg2023" and res["checkpoint_step"] == 3
    table = res["dice_vs_support"]
    assert set(table["universeg"]) == set(table["universeg_ensemble"]) == {"1", "2"}
    assert set(table["unet_per_task"]) == {"2"} and set(table["untrained"]) == {"1"}
    for row in table.values():
        for v in row.values():
            assert math.isfinite(v) and 0.0 <= v <= 1.0
    assert res["num_heldout_tasks"] >= 1 and res["dice_per_family_at_max_support"]
    assert (work / "dice_vs_support.png").stat().st_size > 1000
    md = (work / "results.md").read_text()
    assert "| method | S=1 | S=2 |" in md and "UniverSeg" in md

    # Independent recomputation of the single-support-set and ensemble rows from the checkpoint.
    spec = load_experiment("universeg2023")
    config = config_from_json(json.loads((work / "config.json").read_text()))
    ex = spec.build(config)
    abstract = abstract_state(ex.init_state, replicated(make_mesh()), jax.random.PRNGKey(0))
    state, step = restore_state(work, abstract)
    assert step == 3
    apply = jax.jit(ex.model.apply)
    for s, k, key in ((1, 1, "universeg"), (2, 2, "universeg_ensemble")):
        scores = []
        for ep in ex.eval_set():
            for qi in range(len(ep["query"])):
                prob = 0.0
                for pi, pl in ep["pools"][:k]:
                    logits = apply(
                        {"params": state.params},
                        ep["query"][qi : qi + 1],
                        pi[None, :s],
                        pl[None, :s],
                    )
                    prob = prob + 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
                scores.append(_np_dice(prob / k, ep["query_label"][qi]))
        np.testing.assert_allclose(table[key][str(s)], np.mean(scores), atol=1e-6)


def test_train_batches_mix_tasks():
    overrides = [
        "data.size=16",
        "data.support_size=3",
        "data.num_train_generators=6",
        "data.in_task_augment=False",
        "data.task_augment.flip=0.0",
        "data.task_augment.rot90=0.0",
        "data.task_augment.boundary=0.0",
        "data.task_augment.invert=1.0",
    ]
    config = load_config("universeg2023", "quick", overrides)
    ex = load_experiment("universeg2023").build(config)
    it = ex.train_iterator()
    try:
        batch = next(it)
    finally:
        it.close()
    b = int(config.batch_size)
    assert batch["query"].shape == (b, 16, 16, 1)
    assert batch["support_images"].shape == batch["support_labels"].shape == (b, 3, 16, 16, 1)
    assert len(np.unique(batch["task"])) > 1  # the task is drawn per batch item
    for name in ("query_label", "support_labels"):
        assert set(np.unique(batch[name])) <= {0.0, 1.0}
    # every support label holds its task's foreground
    assert (batch["support_labels"].reshape(b * 3, -1).max(axis=1) == 1).all()
    # task augmentation reaches the step: with invert=1 every image is 1 - image, labels unchanged
    images, labels = ex.augment(jax.random.key(0), batch)
    stacked = np.concatenate([batch["query"][:, None], batch["support_images"]], axis=1)
    np.testing.assert_allclose(np.asarray(images), 1.0 - stacked, atol=1e-6)
    stacked = np.concatenate([batch["query_label"][:, None], batch["support_labels"]], axis=1)
    np.testing.assert_array_equal(np.asarray(labels), stacked)
