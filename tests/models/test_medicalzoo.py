"""medjax.models.medicalzoo: every original registry key imports a state_dict of the original's
structure (the PyTorch re-creations of the per-network tests), from a mapping or a .pt file, into
the same variables as the network's own loader; unknown keys and foreign checkpoints are refused."""

import jax
import numpy as np
import pytest

from medjax.models import medicalzoo
from tests.conftest import require_reference


def _sd(tmod):
    return {k: v.detach().numpy() for k, v in tmod.state_dict().items()}


def _torch_state_dict(key):
    """A state_dict of the original network for MedicalZoo key ``key`` (factory-like settings)."""
    if key == "UNET3D":
        from tests.models.test_unet3d import _torch_unet3d

        return _torch_unet3d(2, 4)
    if key in ("VNET", "VNET2"):
        from tests.models.test_vnet import _torch_vnet

        return _torch_vnet(2, 4, light=key == "VNET2")
    if key.startswith("DENSENET"):
        from tests.models.test_densenet3d import _torch_classes

        single, dual, dual_single = _torch_classes()
        return {
            "DENSENET1": lambda: single(2, 4, 0.1),
            "DENSENET2": lambda: dual(3, 4),
            "DENSENET3": lambda: dual_single(2, 4, 0.1),
        }[key]()
    if key.startswith("HYPERDENSENET"):
        from tests.models.test_hyperdensenet import _torch_hyperdense

        paths = ("Top", "Bottom") if key.endswith("2") else ("Top", "Middle", "Bottom")
        return _torch_hyperdense(paths)
    if key == "SKIPDENSENET3D":
        from tests.models.test_skipdensenet3d import _torch_skipdense

        return _torch_skipdense()
    if key == "DENSEVOXELNET":
        from tests.models.test_densevoxelnet import _torch_densevoxel

        return _torch_densevoxel()
    if key == "RESNET3DVAE":
        from tests.models.test_resnet3d_vae import _torch_vae

        return _torch_vae(2, 4, (16, 16, 16))
    if key == "RESNETMED3D":
        from tests.models.test_resnet_med3d import _torch_resnet_med3d

        return _torch_resnet_med3d(2, 4)
    if key == "HIGHRESNET":
        from tests.models.test_highresnet import _torch_highresnet

        return _torch_highresnet(2, 4)
    from tests.models.test_unet2d import _torch_unet2d

    return _torch_unet2d(2, 4)


CASES = [k for k in medicalzoo.KEYS if k != "HYPERDENSENET"] + ["HYPERDENSENET2", "HYPERDENSENET3"]


@pytest.mark.reference
@pytest.mark.parametrize("case", CASES)
def test_every_registry_key_imports_like_the_networks_own_loader(case):
    require_reference("torch")
    key = "HYPERDENSENET" if case.startswith("HYPERDENSENET") else case
    sd = _sd(_torch_state_dict(case))
    got = medicalzoo.load_pytorch_weights(key, sd)
    module, _, kwargs = medicalzoo.KEYS[key]
    import importlib

    want = importlib.import_module(f"medjax.models.{module}").load_torch_state_dict(sd, **kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    n_in = 3 if case in ("DENSENET2", "HYPERDENSENET3") else 2
    cls = medicalzoo.network_class(key, in_channels=n_in)
    assert cls.__name__ in {
        "UNet3D",
        "VNet",
        "VNetLight",
        "SinglePathDenseNet",
        "DualPathDenseNet",
        "DualSingleDenseNet",
        "HyperDenseNet_2Mod",
        "HyperDenseNet",
        "SkipDenseNet3D",
        "DenseVoxelNet",
        "ResNet3dVAE",
        "ResNetMed3D",
        "HighResNet3D",
        "Unet",
    }


@pytest.mark.reference
def test_a_pt_file_a_foreign_checkpoint_and_an_unknown_key(tmp_path):
    torch = require_reference("torch")
    tmod = _torch_state_dict("HIGHRESNET")
    path = tmp_path / "highresnet.pt"
    torch.save({"model_state_dict": tmod.state_dict()}, path)
    v = medicalzoo.load_pytorch_weights("highresnet", path)
    assert set(v) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="checkpoint: "):
        medicalzoo.load_pytorch_weights("UNET3D", _sd(tmod))
    with pytest.raises(ValueError, match="unknown MedicalZoo model 'COVIDNET1'"):
        medicalzoo.load_pytorch_weights("COVIDNET1", {})
