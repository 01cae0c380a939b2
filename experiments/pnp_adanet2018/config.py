"""PnP-AdaNet (Dou et al., IJCAI 2018): unsupervised MR -> CT adaptation of a cardiac segmenter.

Run (quick: synthetic cardiac MR/CT phantoms at 64 x 64, f = 4; see README.md for the measured
time and table):

    medjax train pnp_adanet2018 --variant quick --workdir runs/pnp_quick
    medjax eval pnp_adanet2018 --workdir runs/pnp_quick
    medjax predict --workdir runs/pnp_quick ct.nii.gz --out runs/pnp_quick/pred

The comparison (adaptation depth d in {2, 4, 6}, without the mask critic; the no-adaptation and
supervised-on-target lines come from the d = 6 row):

    medjax compare pnp_adanet2018 --variant quick --workdir runs/pnp_compare

One ``medjax train`` runs four stages, each resumable: ``source`` (the segmenter on labelled MR),
``warmup`` (the critics with the DAM frozen), ``adapt`` (WGAN: the DAM against the critics) and
``supervised`` (the upper bound: the same segmenter trained on labelled target images; set
``stages.supervised.num_steps=0`` to skip it, and then no target label is read in training).
``num_steps`` must equal the sum of the stages' steps.

"paper" is the published setting (f = 16 at 256 x 256, batch 10 for the segmenter and 6 for the
GAN, 20 critic updates per DAM update and one more every 300) for MM-WHS on a GPU
(``--config.data=mmwhs --config.data_dir=DIR``).
"""

import ml_collections

VARIANTS = ("quick", "paper")
DATASETS = ("synthetic", "mmwhs")

#: ``medjax compare`` rows: the released depth d = 6 (which also trains the supervised upper
#: bound, and whose segmenter before adaptation is the no-adaptation line), d = 4, d = 2 and
#: d = 6 without the mask critic. Every row trains the same source segmenter (same seed and
#: settings: bit-identical), so the rows differ in the adaptation only.
COMPARE_ROWS = {
    "a_d6": ("(a) PnP-AdaNet, d = 6 (released)", ["model.depth=6"]),
    "b_d4": ("(b) PnP-AdaNet, d = 4", ["model.depth=4"]),
    "c_d2": ("(c) PnP-AdaNet, d = 2", ["model.depth=2"]),
    "d_no_mask": ("(d) d = 6 without the mask critic", ["model.depth=6", "critic.mask_weight=0.0"]),
}


def compare_rows(variant=None):
    """The comparison rows: only row (a) trains the supervised upper bound."""
    rows = {}
    for name, (label, overrides) in COMPARE_ROWS.items():
        extra = [] if name == "a_d6" else _without_supervised(get_config(variant))
        rows[name] = (label, list(overrides) + extra)
    return rows


def _without_supervised(config):
    s = config.stages
    total = s.source.num_steps + s.warmup.num_steps + s.adapt.num_steps
    return ["stages.supervised.num_steps=0", f"num_steps={total}"]


def get_config(variant=None):
    """Config for ``variant`` in VARIANTS (default "quick")."""
    variant = variant or "quick"
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    quick = variant == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 8 if quick else 10  # segmenter batches (source and supervised stages)

    # ---------------------------------------------------------------- stages
    c.stages = ml_collections.ConfigDict()
    c.stages.source = ml_collections.ConfigDict({"num_steps": 500 if quick else 30_000})
    c.stages.warmup = ml_collections.ConfigDict({"num_steps": 10 if quick else 50})
    c.stages.adapt = ml_collections.ConfigDict({"num_steps": 150 if quick else 10_000})
    c.stages.supervised = ml_collections.ConfigDict({"num_steps": 500 if quick else 30_000})
    s = c.stages
    c.num_steps = (
        s.source.num_steps + s.warmup.num_steps + s.adapt.num_steps + s.supervised.num_steps
    )
    c.checkpoint_every = 100 if quick else 1000
    c.log_every = 10 if quick else 50
    c.eval_every = 0

    # ---------------------------------------------------------------- data
    c.data = "synthetic"  # synthetic | mmwhs
    c.data_dir = ""
    c.clip_percent = 2.0  # the top 2 % of each volume's intensities are clipped, then z-score
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.shape = (16, 64, 64) if quick else (64, 256, 256)  # slices, rows, columns
    c.synthetic.num_source_train = 12  # labelled MR subjects
    c.synthetic.num_target_train = 12  # unlabelled CT subjects (other anatomies)
    c.synthetic.num_test = 6  # test subjects per modality
    c.synthetic.seed = 2018
    c.mmwhs = ml_collections.ConfigDict()
    c.mmwhs.spacing = 1.0  # mm, isotropic resampling
    c.mmwhs.roi = (256, 256)  # coronal ROI (rows, columns)
    # Training ROI of the unlabelled target (its labels are never read): "centre" of the volume's
    # coronal slices, or an explicit box (row0, col0) for the ROI's top-left corner.
    c.mmwhs.target_roi = "centre"
    c.mmwhs.test_fraction = 0.2  # of each modality's labelled volumes, held out for testing
    # predict: None (the whole coronal slice, padded to a multiple of 8) or a box (row0, col0)
    # of an ROI of size mmwhs.roi in the resampled volume.
    c.predict_roi = None

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.features = 4 if quick else 16  # f: group widths f, 2f, 4f, 8f, 16f, 16f, 32f x 3
    c.model.num_classes = 5
    c.model.dropout = 0.25  # the original's keep_prob 0.75 (segmenter training)
    c.model.depth = 6  # d: groups 1..d are the DAM (the released code's adapt_1..adapt_6)
    # DAM dropout during adaptation: the original shares keep_prob between the frozen MR path and
    # the DAM; medjax drops in neither, so the critic sees no dropout noise on one side only.
    c.model.dam_dropout = 0.0

    c.critic = ml_collections.ConfigDict()
    c.critic.features = 4 if quick else 16  # b: widths 4b, 8b, 16b, 32b, 32b, 32b
    c.critic.dropout = 0.25  # the original's critics always drop (keep_prob 0.75)
    c.critic.mask_weight = 0.3  # the mask critic's loss weight (0: no mask critic)

    # ---------------------------------------------------------------- losses and optimisers
    c.loss = ml_collections.ConfigDict()
    c.loss.l2 = 1e-4  # 1e-4 * sum(w^2) / 2 over the segmenter's convolution kernels
    c.loss.prob_floor = 0.005  # cross-entropy on log(clip(p, 0.005, 1))
    c.loss.dice_weight = 1.0

    c.optimizer = ml_collections.ConfigDict()  # the segmenter (source and supervised stages)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = {"name": "step_decay", "every": 1500, "factor": 0.95}

    c.adapt = ml_collections.ConfigDict()
    c.adapt.batch_size = 8 if quick else 6  # MR and CT slices per adversarial step, each
    c.adapt.learning_rate = 3e-4  # RMSProp (TF1: decay 0.9, mean square initialised to 1)
    c.adapt.decay_every = 100  # x decay_factor every 100 joint (DAM) updates, DAM and critics
    c.adapt.decay_factor = 0.98
    c.adapt.n_critic = 5 if quick else 20  # critic updates per DAM update ...
    c.adapt.n_critic_every = 300  # ... and one more every 300 DAM updates
    c.adapt.warmup_n_critic = 10 if quick else 20  # critic updates per warm-up step
    c.adapt.clip = 0.03  # critic conv / linear kernels clipped to +-0.03 after every update

    # Take the source segmenter from another pnp_adanet2018 work directory (stage "source" must
    # then have 0 steps) instead of training it.
    c.source_workdir = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.slice_batch = 16  # slices per forward pass in evaluation and predict
    return c
