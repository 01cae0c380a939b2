"""Co-training weight-averaged models on partially labelled datasets (Huang et al. 2020): configs.

Run (quick: the synthetic abdomen split into four single-organ datasets of 8 training subjects each,
2.5D slices of 64 x 64, small U-Nets; stage 1 trains the single-organ models whose pseudo-labels
fill in the missing organs, stage 2 co-trains the two networks):

    medjax train cotraining2020 --variant quick --workdir runs/cotraining_quick
    medjax eval cotraining2020 --workdir runs/cotraining_quick

The baseline table (separate single-organ models, the naive way, self-training, co-training
without and with EMA teachers, all organs labelled), on 10 fully labelled test subjects:

    medjax compare cotraining2020 --variant quick --workdir runs/cotraining_compare

Measured times and the table are in README.md. Real data: several Decathlon-style folders (and/or
KiTS19 folders), labels unified by name, ``--config.data=msd --config.data_dirs=DIR1,DIR2,...``.

``method`` picks the row: ``separate`` (stage 1 only), ``naive`` and ``full_labels`` (one
network, stage 2 only), ``self_training`` and ``cotraining`` (both stages; ``ema.decay=0`` gives
co-training without EMA). ``num_steps`` must be the sum of the stages the method runs
(``compare_rows`` sets it per row; see :func:`steps_for`).

"paper" is the published setting as far as it is known *(unverified, from third-party notes)*:
2D slices (352 x 352), batch 24, EMA decay 0.999, soft weight 0.1 ramped as 2/(1+e^(-10p)) - 1,
SGD 1e-3 with cosine decay (one reimplementation); it needs real data and a GPU.
"""

import ml_collections

VARIANTS = ("quick", "paper")
METHODS = ("separate", "naive", "self_training", "cotraining", "full_labels")
#: methods with the single-organ stage (their pseudo-labels fill in the missing organs)
WITH_SINGLE_ORGAN = ("separate", "self_training", "cotraining")

#: the comparison rows of ``medjax compare cotraining2020``: name -> (label, config overrides)
ROWS = {
    "separate": ("separate single-organ models, merged", ["method=separate"]),
    "naive": ("one network, missing organs = background (naive)", ["method=naive"]),
    "self_training": ("self-training (own EMA teacher, pseudo-labels)", ["method=self_training"]),
    "cotraining_no_ema": (
        "co-training without EMA (live teachers)",
        ["method=cotraining", "ema.decay=0.0"],
    ),
    "cotraining": ("co-training with EMA teachers (the method)", ["method=cotraining"]),
    "full_labels": ("one network, every organ labelled (upper bound)", ["method=full_labels"]),
}


def steps_for(config, method=None):
    """``num_steps`` of ``method`` (default ``config.method``): the sum of the stages it runs."""
    method = method or config.method
    n = 0
    if method in WITH_SINGLE_ORGAN:
        n += int(config.stages.single_organ.num_steps)
    if method != "separate":
        n += int(config.stages.main.num_steps)
    return n


def compare_rows(variant=None):
    """The comparison rows, each with the ``num_steps`` of its method."""
    config = get_config(variant)
    rows = {}
    for name, (label, overrides) in ROWS.items():
        method = overrides[0].split("=", 1)[1]
        rows[name] = (label, [*overrides, f"num_steps={steps_for(config, method)}"])
    return rows


def get_config(variant=None):
    """Config for ``variant`` in VARIANTS (default "quick")."""
    variant = variant or "quick"
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    quick = variant == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "cotraining"  # separate | naive | self_training | cotraining | full_labels
    c.stages = ml_collections.ConfigDict()
    c.stages.single_organ = ml_collections.ConfigDict({"num_steps": 600 if quick else 20_000})
    c.stages.main = ml_collections.ConfigDict({"num_steps": 1000 if quick else 40_000})
    c.num_steps = steps_for(c)
    c.batch_size = 8 if quick else 24
    c.checkpoint_every = 400 if quick else 2000
    c.log_every = 20 if quick else 100
    c.eval_every = 0 if quick else 2000  # validation Dice of the inference candidates

    # ---------------------------------------------------------------- data
    c.data = "synthetic"  # synthetic | msd
    c.context = 1 if quick else 0  # 2.5D: 2 * context + 1 adjacent slices as channels (paper: 2D)
    c.foreground_fraction = 0.5  # share of slices drawn through the dataset's annotated organs
    c.dataset_weights = "equal"  # equal | size: how the partially labelled datasets are mixed
    c.prefetch_threads = 1
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.seed = 2020
    c.synthetic.shape = (32, 64, 64)  # (slices, H, W); 6 x 5 x 5 mm voxels
    # one partially labelled dataset per entry (an organ name, or "a+b" for a two-organ dataset)
    c.synthetic.datasets = ("liver", "kidney", "spleen", "pancreas")
    c.synthetic.num_train = 8 if quick else 40  # subjects per dataset (disjoint across datasets)
    c.synthetic.num_val = 2 if quick else 5  # per dataset, partially labelled like its training
    c.synthetic.num_test = 10 if quick else 40  # fully labelled test subjects
    # folder data: Decathlon-style folders (dataset.json) or KiTS19 folders, unified by label name
    c.data_dirs = ()
    c.msd = ml_collections.ConfigDict()
    c.msd.size = 64 if quick else 352  # in-plane size the slices are resampled to
    c.msd.rename = (
        ""  # JSON {folder or "*": {label name: new name or null}} (see partial_label_records)
    )
    c.msd.split = (0.7, 0.1, 0.2)  # train / val / test cases per dataset (>= 1 each)
    c.msd.cache_dir = ""  # "" keeps the preprocessed volumes in memory; a folder memory-maps them
    c.msd.hu_range = (-1000.0, 2000.0)  # CT clipping before (HU + 100) / 1000 (the phantom's scale)

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.features = 16 if quick else 32
    c.model.levels = 4 if quick else 5
    # instance (nnU-Net's choice) | batch | group | none. Instance norm keeps no statistics, so an
    # EMA of the parameters is a whole model; with batch norm see ema.teacher_norm.
    c.model.norm = "instance"

    # ---------------------------------------------------------------- losses
    c.loss = ml_collections.ConfigDict()
    c.loss.focal_gamma = 2.0
    c.loss.focal_weight = 1.0
    c.loss.dice_weight = 1.0
    c.loss.dice_smooth = 0.0  # soft Dice over the organs, pooled over the batch
    # the soft (cross-supervision) loss: -sum softmax(teacher) log softmax(net) on the region mask
    c.soft = ml_collections.ConfigDict()
    c.soft.weight = 0.1  # maximum weight (reimplementation: 0.1)
    c.soft.ramp = "sigmoid"  # 2 / (1 + exp(-10 p)) - 1, p = main-stage step / ramp_steps
    c.soft.ramp_fraction = 1.0  # ramp_steps = ramp_fraction * stages.main.num_steps
    c.soft.region = "uncertain"  # uncertain (background of the partial label) | dilated_pseudo
    c.soft.dilation = 3  # voxels, for region=dilated_pseudo

    # ---------------------------------------------------------------- EMA teachers
    c.ema = ml_collections.ConfigDict()
    # 0.999 in the paper (thousands of steps); the quick stage 2 has 1000 steps, where an average
    # over ~1000 steps would still weigh the untrained start: 0.99 (~100 steps) there.
    c.ema.decay = 0.99 if quick else 0.999
    c.ema.warmup = "mean_teacher"  # "mean_teacher" (min(decay, 1 - 1/(t+2))) or an int ramp
    # what a teacher does with BatchNorm: "running" = evaluation mode with the running statistics
    # of the network it averages (the inference model is the same function); "batch" = the
    # current batch's statistics through the teacher's own weights (nothing stored)
    c.ema.teacher_norm = "running"

    # ---------------------------------------------------------------- optimiser
    c.optimizer = ml_collections.ConfigDict()
    if quick:
        c.optimizer.name = "adam"
        c.optimizer.learning_rate = 1e-3
    else:
        c.optimizer.name = "sgd"
        c.optimizer.learning_rate = 1e-3
        c.optimizer.momentum = 0.9
        c.optimizer.schedule = {"name": "warmup_cosine", "total_steps": 40_000}

    # ---------------------------------------------------------------- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.slice_batch = 32  # slices per forward pass at inference
    c.eval.surface = False  # HD95 / ASSD too (slower on real volumes)
    c.eval.bootstrap = 10_000
    return c
