"""l_inf attacks built from small parts (see `core`)."""
from jeat_jax.attacks.core import (cw_margin, energy_attack, fgsm, pgd, project_linf,
                                   sign_ascent_step, trades_kl, uniform_start)
