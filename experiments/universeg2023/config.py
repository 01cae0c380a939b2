"""UniverSeg in-context segmentation (Butoi et al., ICCV 2023): configs.

Run (quick: synthetic task families at 32x32, an 8-channel UniverSeg, 1000 steps: measured 9 min of
training and 12 min of evaluation on a shared, loaded 2-core CPU):

    medjax train universeg2023 --variant quick --workdir runs/universeg2023_quick
    medjax eval universeg2023 --workdir runs/universeg2023_quick

Evaluation reports Dice on HELD-OUT synthetic task families (shape kinds and intensity styles never
seen in training) against the support size (1 ... 64), with and without ensembling over random
support sets, next to a small U-Net trained per task on its support set only and the untrained
UniverSeg floor. Expected (quick, measured): held-out Dice 26 (S=1) -> 38 (S=64), 29 -> 38 with
ensembling, untrained floor ~9; see README.md for the table.

"paper" is the published network and setting: 128x128, 64 channels per CrossBlock (1,182,785
parameters), support size 64, Adam, soft Dice. The paper trains on MegaMedical (53 datasets, not
available here) plus synthetic tasks; here only the synthetic task generator is available, and the
paper variant needs a GPU. Its learning rate and step count are not given in the text we could
check; the values below are our choice *(unverified)*.
"""

import ml_collections

VARIANTS = ("quick", "paper")


def get_config(variant=None):
    """Config for ``variant`` in VARIANTS (default "quick")."""
    variant = variant or "quick"
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    quick = variant == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000 if quick else 100_000
    c.batch_size = 8 if quick else 8
    c.checkpoint_every = 250 if quick else 5000
    c.log_every = 50 if quick else 200
    c.eval_every = 0
    c.learning_rate = 1e-3 if quick else 1e-4

    # ---------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    c.data.size = 32 if quick else 128  # quick trains at 32x32 (paper: 128x128)
    c.data.support_size = 8 if quick else 64
    c.data.num_train_generators = 200 if quick else 2000
    c.data.num_heldout_generators = 8 if quick else 40
    c.data.seed = 0
    c.data.prefetch_threads = 1
    c.data.task_augment = ml_collections.ConfigDict(
        {"flip": 0.5, "rot90": 0.25, "boundary": 0.2, "invert": 0.25}
    )
    c.data.in_task_augment = True  # transforms.augment defaults of medjax.data.tasks + sharpness

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.features = (8, 8, 8, 8) if quick else (64, 64, 64, 64)  # quick: 8 channels

    # ---------------------------------------------------------------- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.support_sizes = (1, 2, 4, 8, 16, 32, 64)
    c.eval.queries_per_task = 4 if quick else 16
    c.eval.ensemble = 4  # random support sets averaged ("with ensembling")
    c.eval.seed = 123
    c.eval.unet_support_sizes = (1, 4, 16, 64)
    c.eval.unet_steps = 150 if quick else 1000
    c.eval.unet_features = 8 if quick else 16
    c.eval.unet_learning_rate = 3e-3
    c.eval.unet_batch_size = 8  # support pairs per step, drawn with replacement
    c.eval.unet_augment = True  # the in-task augmentation of training
    c.eval.floor_support_sizes = (1, 8, 64)
    return c
