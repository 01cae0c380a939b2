"""medjax.registration: per-pair optimisation, refinement (never worse), pair metrics, pair I/O."""

import jax.numpy as jnp
import numpy as np

from medjax import registration
from medjax.data import synthetic


def test_refinement_is_never_worse_on_its_objective():
    """Test-time refinement returns the best iterate: never worse than the network's field,
    better from a poor start, and the start itself when the optimiser diverges."""
    import jax.numpy as jnp

    pair = synthetic.phantom_pair(0, (16, 16, 16), modalities=("t1",))
    mov = jnp.asarray(pair["moving_image"][None])
    fix = jnp.asarray(pair["fixed_image"][None])
    start = jnp.asarray(np.random.default_rng(0).normal(0, 1.0, (1, 16, 16, 16, 3)), jnp.float32)
    u, before, after = registration.refine(mov, fix, start, steps=30, lr=0.05, lam=0.1)
    assert float(after) < float(before)
    np.testing.assert_allclose(
        float(after), float(registration.objective(mov, fix, u, 0.1)), rtol=1e-5
    )
    u, before, after = registration.refine(mov, fix, start, steps=10, lr=1e3, lam=0.1)
    assert float(after) <= float(before)  # diverging steps are never kept


def test_pair_metrics_closed_forms():
    """A zero field changes nothing; a one-voxel shift of a label cube is measured exactly."""
    img = np.zeros((8, 8, 8, 1), np.float32)
    img[2:6, 2:6, 2:6] = 1.0
    lab = img[..., 0].astype(np.int32)
    zero = np.zeros((1, 8, 8, 8, 3), np.float32)
    m, warped = registration.pair_metrics(img, img, img, zero, labels=(lab, lab), num_labels=2)
    assert m["anatomical_dice_before"] == m["anatomical_dice_after"] == 1.0
    assert m["image_mse_after"] == 0.0 and m["folding_percent"] == 0.0 and m["jacobian_std"] == 0.0
    shift = zero.copy()
    shift[..., 0] = 1.0  # sample one voxel further along axis 0
    m, warped = registration.pair_metrics(
        img,
        img,
        img,
        shift,
        labels=(lab, lab),
        num_labels=2,
        regions={"all": np.ones((8, 8, 8), bool)},
    )
    assert m["anatomical_dice_after"] == 0.75 and m["dice_all_after"] == 0.75  # 48 of 64 overlap
    np.testing.assert_array_equal(warped[1:5, 2:6, 2:6], 1)


def test_optimise_displacement_registers_a_shift():
    pair = synthetic.phantom_pair(1, (16, 16, 16), modalities=("t1",))
    mov = jnp.asarray(pair["moving_image"][None])
    fix = jnp.asarray(pair["fixed_image"][None])
    u = registration.optimise_displacement(mov, fix, steps=40, lr=0.05, lam=0.1)
    zero = jnp.zeros_like(u)
    assert float(registration.objective(mov, fix, u, 0.1)) < 0.8 * float(
        registration.objective(mov, fix, zero, 0.1)
    )
