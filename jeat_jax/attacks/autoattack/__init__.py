"""AutoAttack in JAX (Croce & Hein 2020): APGD-CE/-DLR/-T, FAB-T, Square and the runner.

Every attack takes `logits_fn` (pure, jax-traceable: NHWC [0, 1] float32 images
-> float32 logits), `x`, `y` and its own settings: `apgd_run` (one loss, one
target rank: an `ApgdResult`), `fab_targeted_run` (one target rank: images and
their l_inf norms) and `square` (images). `run_autoattack` composes them over
the target classes and the points still robust.
"""
from jeat_jax.attacks.autoattack.apgd import (ApgdResult, apgd_run, dlr_loss, dlr_loss_targeted,
                                              step_size_checkpoints)
from jeat_jax.attacks.autoattack.fab import fab_targeted_run, linf_hyperplane_projection
from jeat_jax.attacks.autoattack.runner import VERSIONS, run_autoattack
from jeat_jax.attacks.autoattack.square import margin_loss, square
