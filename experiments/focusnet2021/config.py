"""FocusNetV2 (Gao et al., MedIA 2021): small-organ-aware head & neck organ segmentation, configs.

Run (quick: synthetic head & neck CT phantoms at 40 x 64 x 64, 3.2 x 2.5 x 2.5 mm, the three stages
in one run; measured results in README.md):

    medjax train focusnet2021 --variant quick --workdir runs/focusnet_quick
    medjax eval focusnet2021 --workdir runs/focusnet_quick
    medjax predict --workdir runs/focusnet_quick ct.nii.gz --out runs/focusnet_pred

The comparison (S-Net alone, FocusNetV2, without the shape constraint, SOS at the ground-truth
centres instead of SOL's):

    medjax compare focusnet2021 --variant quick --workdir runs/focusnet_compare

Stages (one ``medjax train``, resumable inside any stage): (1) S-Net + SOL heatmaps, focal +
adaptive Tversky loss weighted by organ presence + 2 x heatmap MSE, SGD for S-Net and Adam for SOL
in one optimiser (``optax.multi_transform`` over the parameter tree); (2) shape-autoencoder
pre-training on ground-truth small-organ crops (MSE + soft Dice: the original never released this
step); (3) quick only: SOS warm-up, its segmentation loss alone (``stages.sos_warmup``); (4)
adversarial SOS training with S-Net frozen, the autoencoder as the adversary (the terms and weights
of the original's ``adv_train.py``).

Five quick settings are ours, not the paper's (README, "What changed"): the heatmap MSE weighs each
heatmap's foreground and background equally (``loss.heatmap_balanced``) and its error at the other
small organs as much again (``loss.heatmap_others``), and SOL's and SOS's Adam rates are 10x the
original's (``optim.sol_lr``, ``optim.sos_lr``), because 400 steps stand for the original's 22,800
and 11,400; and SOS trains 200 steps on its segmentation loss alone before the shape terms join
in (``stages.sos_warmup``). "paper" keeps the original's plain MSE, 4e-4, 2e-4 and no warm-up.

"paper" is the published setting for PDDCA on a GPU (``--config.data=pddca
--config.data_dir=...``): 1 x 1 x 2.5 mm, 40 x 192 x 192 crops, the original's widths, 8 x 64 x 64
SOS crops, sliding window of 40 slices with stride 20.
"""

import ml_collections

VARIANTS = ("quick", "paper")
KINDS = ("focusnet", "snet")
CENTRES = ("predicted", "truth")
DATASETS = ("synthetic", "pddca")

#: The original's focal-loss class weights (``train_backbone_heatmap.py --weight``): background,
#: brainstem, chiasm, mandible, optic nerve L/R, parotid L/R, submandibular L/R.
FOCAL_ALPHA = (0.5, 1.0, 8.0, 1.0, 8.0, 8.0, 1.0, 1.0, 2.0, 2.0)
#: The original's test cases (``adv_train.py``); used as the PDDCA test split when present.
PDDCA_TEST_IDS = (
    "0522c0555",
    "0522c0576",
    "0522c0598",
    "0522c0659",
    "0522c0661",
    "0522c0667",
    "0522c0669",
    "0522c0708",
    "0522c0727",
    "0522c0746",
)


def _steps(variant):
    """(S-Net + SOL, shape AE, SOS warm-up, SOS adversarial) steps of a variant."""
    return (400, 300, 200, 200) if variant == "quick" else (600 * 38, 20_000, 0, 300 * 38)


def compare_rows(variant=None):
    """The comparison rows: name -> (label, config overrides)."""
    s1, _, sw, s3 = _steps(variant or "quick")
    return {
        "snet": (
            "S-Net alone",
            [
                "model.kind=snet",
                "stages.ae.num_steps=0",
                "stages.sos_warmup.num_steps=0",
                "stages.sos.num_steps=0",
                f"num_steps={s1}",
            ],
        ),
        "focusnet": ("FocusNetV2 (S-Net + SOL + SOS + shape constraint)", []),
        # the same SOS steps, all with the segmentation loss alone
        "no_shape": (
            "FocusNetV2 without the shape constraint",
            ["shape.enabled=False", "stages.ae.num_steps=0", f"num_steps={s1 + sw + s3}"],
        ),
        "truth_centre": (
            "FocusNetV2, SOS at the ground-truth centres (no SOL localisation)",
            ["sos.centre=truth"],
        ),
    }


def get_config(variant=None):
    """Config for ``variant`` in VARIANTS (default "quick")."""
    variant = variant or "quick"
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    quick = variant == "quick"
    s1, s2, sw, s3 = _steps(variant)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 1  # the original's
    c.stages = ml_collections.ConfigDict()
    c.stages.snet = ml_collections.ConfigDict({"num_steps": s1})
    c.stages.ae = ml_collections.ConfigDict({"num_steps": s2})
    # ours (quick), not the original's: SOS first trains with its segmentation loss alone, then
    # adversarially; from scratch, the shape terms hold it at a Tversky loss of 0.99 (README)
    c.stages.sos_warmup = ml_collections.ConfigDict({"num_steps": sw})
    c.stages.sos = ml_collections.ConfigDict({"num_steps": s3})
    c.num_steps = s1 + s2 + sw + s3  # must be the stages' sum (set it with any stage override)
    c.checkpoint_every = 100 if quick else 2000
    c.log_every = 20 if quick else 100
    c.eval_every = 0

    # ---------------------------------------------------------------- data
    c.data = "synthetic"  # synthetic | pddca
    c.data_dir = ""
    c.synthetic = ml_collections.ConfigDict()
    # (D, H, W) and voxel size (mm). quick: 128 x 160 x 160 mm, the phantom's fixed 128 x 240 x 240
    # mm field of view cropped in-plane to the head; paper: all of it at 2.5 x 1.25 x 1.25 mm.
    c.synthetic.shape = (40, 64, 64) if quick else (52, 192, 192)
    c.synthetic.spacing = (3.2, 2.5, 2.5) if quick else (2.5, 1.25, 1.25)
    c.synthetic.num_train = 24 if quick else 38
    c.synthetic.num_test = 8 if quick else 10
    c.synthetic.seed = 2021
    # each organ of a training case is left unannotated with this probability (about 1 case in 4
    # then lacks an organ, as in PDDCA); test cases are fully annotated
    c.synthetic.unannotated_prob = 0.03
    c.pddca = ml_collections.ConfigDict()
    c.pddca.spacing = (2.5, 1.0, 1.0)  # (z, y, x) mm, the original's 1 x 1 x 2.5 mm
    c.pddca.inplane = (240, 240)  # centre crop/pad (rows, columns), the original's 240dataset
    c.pddca.test_ids = PDDCA_TEST_IDS
    c.pddca.test_fraction = 0.2  # when none of test_ids is in the folder
    # Stage-1 crops (D, H, W), the original's random 40 x 192 x 192; with probability
    # ``focus_prob`` a crop is placed so that it holds the small organs (stages 2-3 always).
    c.train_crop = (16, 64, 64) if quick else (40, 192, 192)
    c.focus_prob = 0.5 if quick else 0.0
    c.sos_focus_prob = 1.0 if quick else 0.9  # the original's focus_on_small: 90 %
    # host-side augmentation (the original's random zoom 0.9-1.1 and rotation +-5/10/10 degrees)
    c.augment = ml_collections.ConfigDict()
    c.augment.zoom = 0.0 if quick else 0.1
    c.augment.rotation = (0.0, 0.0, 0.0) if quick else (5.0, 10.0, 10.0)

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.kind = "focusnet"  # focusnet | snet (S-Net alone: stage 1 without SOL)
    c.model.norm = "batch"
    # Widths: the original's in "paper"; quick is about 1/4 of them (same layout).
    c.model.features = (8, 12, 16) if quick else (32, 48, 64)
    c.model.aspp_features = (16, 8) if quick else (64, 32)
    c.model.sos_features = (8, 8, 12, 16) if quick else (24, 32, 48, 64)
    c.model.sos_aspp_features = (16, 8) if quick else (64, 32)
    c.crop_size = (8, 32, 32) if quick else (8, 64, 64)  # SOS crop (and the autoencoder's input)
    c.heatmap = ml_collections.ConfigDict()
    c.heatmap.sigma = (2.0, 2.0, 2.0) if quick else (5.0, 5.0, 5.0)  # voxels (z, y, x)
    # The original zeroes its target beyond +-1 slice of the centre and below 0.01 (-1: no cut).
    c.heatmap.z_halfwidth = 1
    c.heatmap.floor = 0.01
    c.ae = ml_collections.ConfigDict()
    c.ae.latent = 128 if quick else 512
    c.ae.features = (8, 16, 16, 32) if quick else (64, 128, 128, 256)
    c.ae.decoder_features = (16, 16, 8) if quick else (128, 128, 64)
    c.ae.jitter = 4  # voxels: pre-training crops are centred at the truth +- this (in-plane; z / 4)
    # The pre-training loss was never released: MSE of the reconstruction, plus this weight x the
    # soft Dice of it (ours: an organ fills ~1 % of a crop, and MSE alone is met by zeros)
    c.ae.dice_weight = 1.0

    # ---------------------------------------------------------------- losses
    c.loss = ml_collections.ConfigDict()
    c.loss.focal_gamma = 2.0
    c.loss.focal_alpha = FOCAL_ALPHA
    c.loss.dice_weight = 0.2  # the original's --rlt
    c.loss.heatmap_weight = 2.0
    # ours, not the paper's (quick): foreground and background of each heatmap weighted equally
    # (medjax.losses.heatmap_mse(balanced=True)); with the original's plain mean (False) the
    # quick run's heatmaps collapse to zero (README)
    c.loss.heatmap_balanced = quick
    # ours (quick): each heatmap's error at the *other* small organs weighs as much as at its own
    # organ and as the rest (heatmap_mse(others=True)); without it every heatmap lights all three
    c.loss.heatmap_others = quick
    c.loss.sos_dice_weight = 0.5  # adv_train.py: focal(alpha 0.5) + 0.5 * binary Tversky
    c.shape = ml_collections.ConfigDict()
    c.shape.enabled = True
    # generator (SOS): 5 * MSE(codes) + MSE(x1) + MSE(x2) + MSE(sigmoid(pred), truth)
    c.shape.code_weight = 5.0
    c.shape.feature_weight = 1.0
    c.shape.mask_weight = 1.0
    # critic (AE): 0.999 * (MSE(recon(pred), pred) + MSE(recon(truth), truth))
    #              - 0.001 * (MSE(codes) + 0.2 * MSE(x1) + 0.2 * MSE(x2))
    c.shape.critic_recon_weight = 0.999
    c.shape.critic_distance_weight = 0.001
    c.shape.critic_feature_weight = 0.2
    c.sos = ml_collections.ConfigDict()
    c.sos.centre = "predicted"  # predicted (SOL heatmap peaks) | truth (ground-truth centroids)

    # ---------------------------------------------------------------- optimisers
    c.optim = ml_collections.ConfigDict()
    c.optim.snet_lr = 0.1
    c.optim.snet_momentum = 0.9
    c.optim.snet_weight_decay = 5e-4
    # The original's warm-up (lr * e^(10 (t/T - 1)) over 5 of 600 epochs) and x0.1 at 1/3 and 2/3.
    c.optim.snet_warmup_steps = 20 if quick else 5 * 38
    # fractions of stage 1 (quick: none, its 400 steps are far from the original's convergence)
    c.optim.decay_at = () if quick else (1.0 / 3.0, 2.0 / 3.0)
    c.optim.snet_decay = 0.1
    # the original's 4e-4 in "paper"; quick's 400 steps stand for its 22,800, so 10x (README)
    c.optim.sol_lr = 4e-3 if quick else 4e-4
    c.optim.sol_decay = 0.25
    # the original's 2e-4 in "paper"; quick: 10x, as for SOL (README: at 2e-4 the SOS Tversky loss is
    # still 0.85 after 200 steps at the true centres, at 2e-3 it is 0.4)
    c.optim.sos_lr = 2e-3 if quick else 2e-4
    c.optim.sos_weight_decay = 1e-4
    c.optim.ae_lr = 2e-4
    c.optim.ae_weight_decay = 1e-4
    # The pre-training was never released: Adam at this rate during stage 2, then ae_lr.
    c.optim.ae_pretrain_lr = 1e-3

    # ---------------------------------------------------------------- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.window = 16 if quick else 40  # sliding window along z (slices)
    c.eval.stride = 8 if quick else 20
    c.eval.heatmap_threshold = 0.6
    c.eval.surface = True  # HD95 (and ASSD)
    c.eval.figures = True
    return c
