"""Joint brain registration + tumour segmentation (Estienne et al. 2020): configs.

Run (quick, synthetic phantom pairs at 32^3, 800 steps; 7 min 23 s wall from a fresh clone on an
idle 2-core CPU, set-up, training and evaluation):

    medjax train estienne2020 --variant quick --workdir runs/estienne2020_quick
    medjax eval estienne2020 --workdir runs/estienne2020_quick

The full ablation table (joint+sub+mask, joint+concat, no mask, VoxelMorph at two smoothness weights,
seg-only, identity, per-pair optimisation reference, the joint model with test-time refinement),
then the study rows s0-s8:

    medjax compare estienne2020 --variant quick --workdir runs/estienne2020_compare

Expected (quick, measured): anatomical Dice 0.326 (identity) -> 0.371 after warping on the 16
synthetic test pairs (15 of 16 improve; paired gain +0.045, 95 % CI +0.031 to +0.060), image MSE
0.583 -> 0.295, 0.9 % folding (see README.md for the tables).
"paper" is the published setting (BraTS crop 144x208x144, f=8, Adam 2e-3, batch 2, reduce-on-plateau x0.2 after 30 epochs without
improvement, early stopping after 50) and needs real data (``--config.data=brats
--config.data_dir=...``) and a GPU.

Model kinds: ``joint`` (the paper's network), ``voxelmorph`` (registration baseline), ``segonly``
(V-Net segmentation baseline), ``identity`` (no training; evaluation only) and ``optimise``
(no training: every test pair registered by its own iterative optimisation, a reference).
"""

import ml_collections

VARIANTS = ("quick", "paper")

#: the comparison rows of ``medjax compare estienne2020``: name -> (label, config overrides)
COMPARE_ROWS = {
    "a_joint_sub_masked": (
        "(a) joint, subtraction, masked",
        ["model.kind=joint", "model.merge=subtract", "model.masked=True"],
    ),
    "b_joint_concat": (
        "(b) joint, concatenation, masked",
        ["model.kind=joint", "model.merge=concat", "model.masked=True"],
    ),
    "c_joint_nomask": (
        "(c) joint, subtraction, no mask",
        ["model.kind=joint", "model.merge=subtract", "model.masked=False"],
    ),
    "d_voxelmorph": ("(d) VoxelMorph", ["model.kind=voxelmorph"]),
    # VoxelMorph's MSE weight 0.01 is for intensities in [0, 1]; these images are z-scored (about 16x
    # the variance), so (d') scales it to 0.1, the per-pair reference's weight: regularity matched.
    "d2_voxelmorph_smooth": (
        "(d') VoxelMorph, λ = 0.1",
        ["model.kind=voxelmorph", "loss.vxm_lambda=0.1"],
    ),
    "e_segonly": ("(e) segmentation only (V-Net)", ["model.kind=segonly"]),
    "f_identity": ("(f) identity", ["model.kind=identity"]),
    "g_optimise": ("(g) per-pair optimisation (reference)", ["model.kind=optimise"]),
    # (a)'s trained model (medjax compare reuses its checkpoints: only eval.* differs), its field
    # refined per pair at test time by (g)'s optimisation started from it (medjax predict --refine).
    "h_joint_refined": (
        "(h) (a)'s model",
        [
            "model.kind=joint",
            "model.merge=subtract",
            "model.masked=True",
            "eval.refine_steps=300",
        ],
    ),
}


#: What limits the joint network's registration (README, "What limits the joint network"): each
#: row changes one setting of the paper-faithful quick configuration. Every field a study row or a
#: later default might change is pinned, so the rows mean the same whatever the defaults are.
PAPER_QUICK = [
    "model.kind=joint",
    "model.merge=subtract",
    "model.masked=True",
    "model.f=4",
    "model.reg_init=identity",
    "model.step_scale=1.0",
    "optimizer.learning_rate=0.001",
    "loss.alpha=1e-10",
    "loss.mask_normalize=total",
    "num_steps=800",
]
STUDY_ROWS = {
    "s0_paper_quick": ("(s0) joint, paper settings at quick size", PAPER_QUICK),
    "s1_init_original": (
        "(s1) head initialised as the original (glorot)",
        PAPER_QUICK + ["model.reg_init=original"],
    ),
    "s2_step_half": ("(s2) Phi's step scaled by 0.5", PAPER_QUICK + ["model.step_scale=0.5"]),
    "s3_lr_paper": (
        "(s3) Adam 2e-3 (the paper's)",
        PAPER_QUICK + ["optimizer.learning_rate=0.002"],
    ),
    "s4_alpha_1e-6": ("(s4) alpha 1e-6", PAPER_QUICK + ["loss.alpha=1e-6"]),
    "s5_alpha_1e-5": ("(s5) alpha 1e-5", PAPER_QUICK + ["loss.alpha=1e-5"]),
    "s6_mask_share": (
        "(s6) masked MSE over the mask's voxels",
        PAPER_QUICK + ["loss.mask_normalize=mask"],
    ),
    "s7_f8": ("(s7) f = 8 (twice the decoder width)", PAPER_QUICK + ["model.f=8"]),
    "s8_steps_1600": ("(s8) 1600 steps", PAPER_QUICK + ["num_steps=1600"]),
}


def compare_rows(variant=None):
    """The comparison rows: the paper's ablation and baselines, then the study of what limits the
    joint network (the same rows for every variant)."""
    return {**COMPARE_ROWS, **STUDY_ROWS}


KINDS = ("joint", "voxelmorph", "segonly", "identity", "optimise")
DATASETS = ("synthetic", "brats", "oasis")


def get_config(variant=None):
    """Config for ``variant`` in VARIANTS (default "quick")."""
    variant = variant or "quick"
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    quick = variant == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 800 if quick else 200 * 100
    c.batch_size = 2
    c.checkpoint_every = 200 if quick else 1000
    c.log_every = 25 if quick else 100
    c.eval_every = 0 if quick else 100  # validation every 100 batches in the paper

    # ---------------------------------------------------------------- data
    c.data = "synthetic"  # synthetic | brats | oasis
    c.data_dir = ""
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.shape = (32, 32, 32) if quick else (64, 64, 64)
    c.synthetic.num_train = 64 if quick else 512  # phantom subjects; pairs are drawn from them
    c.synthetic.num_test_pairs = 16 if quick else 32
    c.synthetic.num_modalities = 4
    c.synthetic.seed = 1234
    # Extra smooth random deformation per subject (on top of the phantom's own anatomy variation,
    # which is only about 1 voxel at 32^3): uniform rotation (+-deg), scale (1 +- s), translation
    # (+-voxels) and Gaussian-smoothed noise of std ``elastic`` voxels and width ``elastic_sigma``.
    c.synthetic.rotation = 4.0
    c.synthetic.scale = 0.04
    c.synthetic.translation = 1.0 if quick else 2.0
    c.synthetic.elastic = 1.0 if quick else 2.0
    c.synthetic.elastic_sigma = 5.0 if quick else 10.0
    # Folder data: the paper's crops; None (quick) = the data's own size rounded up to what the
    # network needs (a multiple of 16 for five levels).
    c.brats_crop = None if quick else (144, 208, 144)
    c.oasis_crop = None if quick else (160, 176, 208)
    c.brats_split = (199, 26, 60)  # train / val / test cases
    c.max_test_pairs = 20
    c.near_band = 3  # voxels: the "near tumour" band around the dilated tumour of the fixed image

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.kind = "joint"  # joint | voxelmorph | segonly | identity | optimise
    c.model.merge = "subtract"  # subtract | concat
    c.model.masked = True  # tumour-masked registration loss (the paper's L*_reg)
    c.model.f = 4 if quick else 8
    c.model.multipliers = (1, 2, 4, 8, 16)
    c.model.enc_convs = (1, 2, 3, 3, 3)
    c.model.dec_convs = (3, 3, 2, 1)
    c.model.n_classes = 4
    c.model.original_offset = False
    # Named departures from the paper's network, studied in the comparison (README): the
    # registration head's initialisation ("identity": Phi starts at 0.5 up to ~1e-5; "original":
    # Keras's glorot-uniform) and the scale s of Phi's step around the identity (1 + s (2 Phi - 1);
    # 1.0 is the paper's 2 Phi).
    c.model.reg_init = "identity"
    c.model.step_scale = 1.0
    c.model.dtype = "float32"
    c.model.vxm_enc = (8, 16, 16, 16) if quick else (16, 32, 32, 32)
    c.model.vxm_dec = (16, 16, 16, 16, 16, 8, 8) if quick else (32, 32, 32, 32, 32, 16, 16)
    c.model.vxm_field = "displacement"  # displacement | diffeomorphic
    c.model.vxm_int_steps = 7

    # Per-pair iterative registration (kind "optimise"; no training): the reference a learned
    # model is measured against. Adam on a free displacement, MSE + lam * ||grad u||^2.
    c.optimise = ml_collections.ConfigDict()
    c.optimise.steps = 300
    c.optimise.learning_rate = 0.05
    c.optimise.lam = 0.1

    # Evaluation only (changing it never blocks a resume): test-time refinement of the network's
    # field per pair, by the same Adam optimisation as kind "optimise", started from the network's
    # displacement; 0 turns it off.
    c.eval = ml_collections.ConfigDict()
    c.eval.refine_steps = 0
    c.eval.refine_learning_rate = 0.05
    c.eval.refine_lam = 0.1

    # ---------------------------------------------------------------- losses
    c.loss = ml_collections.ConfigDict()
    # The paper's README value is 1e-10 (its code's default 1e-11), kept in "paper". quick: 1e-5,
    # ours (README, the study's row s5): the anatomical Dice of 1e-10, a fifth of its folding.
    c.loss.alpha = 1e-5 if quick else 1e-10
    c.loss.beta = 1.0
    c.loss.mask_normalize = "total"  # the paper's: the masked MSE over all voxels (or "mask")
    c.loss.vxm_similarity = "mse"  # mse | ncc
    c.loss.vxm_lambda = 0.01

    # ---------------------------------------------------------------- optimiser
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    # The paper's Adam 2e-3. The quick variant (f = 4, batch 2, 800 steps) uses 1e-3: measured at
    # 600 steps, 2e-3 reached an anatomical Dice of 0.357 with 4.8 % folding voxels, 1e-3 0.365 and 2.9 %.
    c.optimizer.learning_rate = 1e-3 if quick else 2e-3
    # Host-side controllers of medjax.train.fit, driven by validate()'s "val_loss" every eval_every
    # steps (the paper validates every 100 batches, about one BraTS epoch: patience in evaluations).
    c.reduce_on_plateau = None if quick else {"factor": 0.2, "patience": 30}
    c.early_stopping = None if quick else {"patience": 50}
    return c
