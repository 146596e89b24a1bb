"""AutoAttack in JAX (Croce & Hein 2020): APGD-CE/-DLR/-T, FAB/FAB-T, Square and the runner.

Every attack takes `logits_fn` (pure, jax-traceable: NHWC [0, 1] float32 images
-> float32 logits), `x`, `y` and its own settings: `apgd_run` (one loss, one
target rank: an `ApgdResult`), `fab_run` (one target rank, or untargeted:
images and their l_inf norms) and `square` (images). `run_autoattack` composes
them over restarts, target classes and the points still robust, for the
versions standard, plus (AutoAttack+) and rand.
"""
from jeat_jax.attacks.autoattack.apgd import (ApgdResult, apgd_run, dlr_loss, dlr_loss_targeted,
                                              padded_size, step_size_checkpoints)
from jeat_jax.attacks.autoattack.fab import closest_boundary, fab_run, linf_hyperplane_projection
from jeat_jax.attacks.autoattack.runner import ATTACKS, RESTARTS, VERSIONS, run_autoattack
from jeat_jax.attacks.autoattack.square import margin_loss, square
