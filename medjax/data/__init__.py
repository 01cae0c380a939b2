"""Data: image I/O, dataset layouts, transforms, synthetic data and input pipelines. Names resolve lazily to keep ``import medjax.data`` cheap."""

from medjax._lazy import attach

# public name -> module that defines it; add a line when you add a new public function.
_LAZY = {
    "Image": "medjax.data.io",
    "load_image": "medjax.data.io",
    "save_image": "medjax.data.io",
    "DataFileError": "medjax.data.io",
    "load_label": "medjax.data.io",
    "check_pair": "medjax.data.io",
    "load_record": "medjax.data.datasets",
    "split": "medjax.data.datasets",
    "kfold": "medjax.data.datasets",
    "make_iterator": "medjax.data.pipeline",
    "FunctionSource": "medjax.data.pipeline",
    "RecordSource": "medjax.data.pipeline",
    "synthetic_tasks": "medjax.data.tasks",
    "folder_tasks": "medjax.data.tasks",
    "brain_phantom": "medjax.data.synthetic",
    "phantom_pair": "medjax.data.synthetic",
    "ANATOMY_LABELS": "medjax.data.synthetic",
    "TUMOUR_LABELS": "medjax.data.synthetic",
    "random_affine": "medjax.data.transforms",
    "random_elastic": "medjax.data.transforms",
    "random_flip": "medjax.data.transforms",
    "gaussian_noise": "medjax.data.transforms",
    "brightness_contrast": "medjax.data.transforms",
    "gamma": "medjax.data.transforms",
    "gaussian_blur": "medjax.data.transforms",
    "gaussian_filter": "medjax.data.transforms",
    "augment": "medjax.data.transforms",
    "percentile_clip": "medjax.data.transforms",
    "zscore": "medjax.data.transforms",
    "minmax": "medjax.data.transforms",
    "ct_window": "medjax.data.transforms",
    "brats_normalize": "medjax.data.transforms",
    "crop_or_pad": "medjax.data.transforms",
    "crop_to_foreground": "medjax.data.transforms",
    "remap_labels": "medjax.data.transforms",
    "random_crop": "medjax.data.transforms",
    "foreground_crop": "medjax.data.transforms",
    "threshold_crop": "medjax.data.transforms",
}

__getattr__, __dir__ = attach(__name__, _LAZY)
