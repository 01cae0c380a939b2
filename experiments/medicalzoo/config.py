"""MedicalZoo 3D model zoo (MedicalZooPytorch): any zoo network on brain-tissue segmentation.

Run (quick: the synthetic iSeg-like task, T1 + T2 phantoms at 48^3, four classes background / CSF /
grey matter / white matter; random 32^3 sub-volumes; held-out full volumes by sliding-window
inference):

    medjax train medicalzoo --variant quick --config.model.name=unet3d --workdir runs/mz_unet3d
    medjax eval medicalzoo --workdir runs/mz_unet3d
    medjax predict --workdir runs/mz_unet3d scan.nii.gz --out runs/mz_unet3d/pred

``--config.model.name`` is any MedicalZoo network of the registry (``medjax list --models``; the
original's keys such as ``VNET2`` or ``DENSENET1`` work too) or ``smallunet``. Every network at once,
on the same data (``compare_rows`` below gives each its step budget):

    medjax compare medicalzoo --variant quick --workdir runs/mz_compare

Measured (README.md): the comparison, every network with 200 s of training steps (UNet3D: 162
steps, mean Dice 0.890 over CSF / GM / WM on the 4 held-out phantoms in a 48^3 window). The
600-step default of a single run has not been measured.

"paper" is the original's setting: 64^3 sub-volumes kept when the label covers >= 10 % of the
volume's foreground, batch 4, SGD (momentum 0.5, lr 1e-2; ``--config.optimizer.name=adam
--config.optimizer.learning_rate=1e-3`` for its Adam), 200 epochs of 1024 sub-volumes, full-volume
z-score after a 0.1-99.8 percentile clip, its Dice loss, on a folder:
``--config.data=iseg2017|mrbrains18|brats|decathlon --config.data_dir=...`` (MRBrainS18 volumes are
48 slices deep: add ``--config.crop=(64,64,48)``). It needs real data and a GPU.
"""

import ml_collections

VARIANTS = ("quick", "paper")
DATASETS = ("synthetic", "iseg2017", "mrbrains18", "brats", "decathlon")
NORMALIZATIONS = ("full_volume_mean", "mean", "max_min", "brats", "none")
LOSSES = ("dice", "generalized_dice", "bce_dice", "weighted_ce", "dice_ce")

#: the comparison: row -> (label, registry name, training steps). Every row trains on the same
#: synthetic subjects, 32^3 crops, batch 2, Adam 1e-3 and loss, and is evaluated on the same 4
#: held-out volumes. The budget is the same *time*: 200 s of training on an idle 2-core CPU, the
#: steps being 200 s / the row's step time as ``benchmarks/zoo_budgets.py --seconds 200`` measured
#: it (benchmarks/results/zoo_budgets.md, 2026-12-07: 1.2 s for UNet3D to 43.6 s for
#: DualPathDenseNet). Steps, not seconds, so that a row gives the same numbers on any machine.
ZOO_ROWS = {
    "unet3d": ("UNet3D (UNET3D)", "unet3d", 162),
    "vnet": ("VNet (VNET)", "vnet", 18),
    "vnetlight": ("VNetLight (VNET2)", "vnetlight", 32),
    "densenet1": ("SinglePathDenseNet (DENSENET1)", "singlepathdensenet", 8),
    "densenet2": ("DualPathDenseNet (DENSENET2)", "dualpathdensenet", 4),
    "densenet3": ("DualSingleDenseNet (DENSENET3)", "dualsingledensenet", 7),
    "hyperdensenet": ("HyperDenseNet_2Mod (HYPERDENSENET)", "hyperdensenet_2mod", 8),
    "skipdensenet3d": ("SkipDenseNet3D (SKIPDENSENET3D)", "skipdensenet3d", 80),
    "densevoxelnet": ("DenseVoxelNet (DENSEVOXELNET)", "densevoxelnet", 64),
    "resnet3dvae": ("ResNet3dVAE (RESNET3DVAE)", "resnet3dvae", 27),
    "resnetmed3d": ("ResNetMed3D (RESNETMED3D)", "resnetmed3d", 34),
    "highresnet": ("HighResNet3D (HIGHRESNET)", "highresnet3d", 18),
    "unet2d": ("Unet, 2D, slice by slice (UNET2D)", "unet", 50),
}
#: the held-out volumes are segmented in one window of their size (48^3) by every network that
#: takes it; ResNet3dVAE, built for its input size, by sliding 32^3 windows.
COMPARE_ROI = "eval.roi=(48,48,48)"
#: rows whose 32^3 step does not fit in this machine's memory: HyperDenseNet keeps every unit's
#: full-resolution input for the backward pass (about 8 GB at batch 2); it trains on 16^3 outputs.
ROW_EXTRA = {"hyperdensenet": ["crop=(16,16,16)"]}


def compare_rows(variant=None):
    """``{row: (label, overrides)}``: every zoo network with its step budget (quick variant)."""
    rows = {}
    for row, (label, model, steps) in ZOO_ROWS.items():
        overrides = [f"model.name={model}"]
        if (variant or "quick") == "quick":
            overrides.append(f"num_steps={steps}")
            if model != "resnet3dvae":
                overrides.append(COMPARE_ROI)
            overrides += ROW_EXTRA.get(row, [])
        rows[row] = (label, overrides)
    return rows


def get_config(variant=None):
    """Config for ``variant`` in VARIANTS (default "quick")."""
    variant = variant or "quick"
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    quick = variant == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    # paper: 200 epochs of samples_train = 1024 sub-volumes at batch 4
    c.num_steps = 600 if quick else 200 * 1024 // 4
    c.batch_size = 2 if quick else 4
    c.checkpoint_every = 200 if quick else 2560
    c.log_every = 25 if quick else 256
    c.eval_every = 0

    # ---------------------------------------------------------------- data
    c.data = "synthetic"  # synthetic | iseg2017 | mrbrains18 | brats | decathlon
    c.data_dir = ""
    c.mrbrains_classes = 4  # 4 (CSF/GM/WM, the original's table) or 9
    c.split = (0.8, 0.2)  # folder data: train / test subjects (the original's --split 0.8)
    c.max_test_cases = 20
    c.cache_volumes = 32  # folder data: preprocessed volumes kept in memory
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.shape = (48, 48, 48) if quick else (96, 96, 96)
    c.synthetic.num_train = 16
    c.synthetic.num_test = 4
    c.synthetic.seed = 1234
    c.synthetic.modalities = ("t1", "t2")  # iSeg's T1 + T2 (the phantom also has t1ce, flair)
    c.synthetic.classes = "tissue"  # tissue (bg, CSF, GM, WM) | anatomy (the phantom's 8 labels)
    # preprocessing (the original's load_medical_image): clip, then normalise per channel
    c.clip_percentiles = (0.1, 99.8)
    c.normalization = (
        "full_volume_mean"  # full_volume_mean | mean (non-zero) | max_min | brats | none
    )
    # sub-volumes, sampled on the fly (the original writes them to disk first)
    c.crop = (32, 32, 32) if quick else (64, 64, 64)
    c.min_fraction = 0.1  # the original's --threshold: crop label / volume label (relative_to)
    c.samples_per_epoch = 1024  # the original's samples_train: an "epoch" of sub-volumes
    # augmentation: "none", or "original": one of noise (std 0.01) / flip / elastic with p 0.5 per
    # sample (the original's RandomChoice; off by default there, --augmentation)
    c.augmentation = "none"

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.name = "unet3d"
    c.model.kwargs = ml_collections.ConfigDict()  # extra fields of the network (e.g. base_n_filter)
    c.model.axis_name = ""  # BatchNorm axis for jax.pmap ("" = none; the engine's mesh needs none)
    c.model.pretrained = ""  # an original MedicalZoo checkpoint (.pt / .npz) to start from

    # ---------------------------------------------------------------- loss
    c.loss = ml_collections.ConfigDict()
    c.loss.name = "dice"  # dice | generalized_dice | bce_dice | weighted_ce | dice_ce
    c.loss.sigmoid = False  # the original's sigmoid inside its Dice (medjax: softmax)
    c.loss.aux_weight = 1.0  # DenseVoxelNet's second head
    c.loss.vae_weight = 0.1  # ResNet3dVAE: Myronenko's 0.1 L2 + 0.1 KL

    # ---------------------------------------------------------------- optimiser
    c.optimizer = ml_collections.ConfigDict()
    if quick:
        c.optimizer.name = "adam"
        c.optimizer.learning_rate = 1e-3
    else:
        c.optimizer.name = "sgd"
        c.optimizer.learning_rate = 1e-2
        c.optimizer.momentum = 0.5
    c.optimizer.weight_decay = 1e-10  # the original's create_model

    # ---------------------------------------------------------------- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.roi = None  # sliding window (None: the crop); larger windows mean fewer of them
    c.eval.overlap = 0.25
    c.eval.sw_batch_size = 1
    c.eval.surface = True  # HD95 / ASSD
    c.eval.profile_step = True  # time the compiled training step and read XLA's memory plan
    return c
