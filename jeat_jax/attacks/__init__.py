"""l_inf attacks built from small parts and one loop (see `core`)."""
from jeat_jax.attacks.core import (as_argument, cw_margin, energy_attack, example_keys, fgsm,
                                   logit_direction, logit_direction_attack, pgd, project_linf,
                                   projected_ascent, sign_ascent_step, trades_attack, trades_kl,
                                   uniform_start)
