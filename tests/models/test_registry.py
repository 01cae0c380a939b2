"""medjax.models.registry: lookup by name (case-insensitive, aliases), unknown names, parameter counts."""

import jax
import numpy as np
import pytest

from medjax import models
from medjax.models import registry


def test_get_is_case_insensitive_and_knows_aliases():
    from medjax.models.universeg import UniverSeg

    assert models.get("UniverSeg") is UniverSeg
    assert models.get("universeg") is UniverSeg
    assert models.get("ESTIENNE2020") is models.get("jointregseg")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'nope'.*universeg"):
        models.get("nope")


def test_every_entry_loads_and_param_count_equals_a_real_init():
    for name in registry.names():
        assert isinstance(models.get(name), type), name
    # One real init against the abstract count (SmallUNet is cheap to initialise).
    e = registry.entry("smallunet")
    net = e.load()(**e.defaults)
    params = net.init(jax.random.key(0), np.zeros(e.inputs[0], np.float32))["params"]
    assert registry.param_count("smallunet") == sum(x.size for x in jax.tree.leaves(params))
    assert registry.param_count("universeg") == 1_182_785  # SYSTEMS.md


def test_a_name_cannot_be_registered_twice_for_another_model():
    e = registry.ModelEntry(
        "smallunet_copy", "medjax.models.small_unet", "SmallUNet", aliases=("universeg",)
    )
    with pytest.raises(ValueError, match="already registered"):
        registry.register(e)
