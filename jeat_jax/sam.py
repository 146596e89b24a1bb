"""Sharpness-aware minimisation as an optax wrapper: EB-JDAT's optimizer.

SAM (Foret et al., ICLR 2021) descends the loss at the worst point of a
rho-ball around the weights, approximated by one ascent step:

  e(w) = rho * T_w^2 g / ||T_w g||_2,   g = grad L(w),
  w <- optimizer step with the gradient grad L(w + e(w)) taken at w.

T_w = I is SAM; T_w = diag(|w|) is adaptive SAM (ASAM, Kwon et al., ICML
2021), the form EB-JDAT trains with (rho = 2; ALGORITHMS.md, "Successors").

`sam(inner, rho, adaptive)` is an `optax.GradientTransformationExtraArgs`: its
update takes the first-pass gradient and a keyword `grad_fn(params) -> grads`
that recomputes the loss gradient at other weights (the caller fixes the batch,
the negatives and the BatchNorm running statistics inside it), and hands the
second-pass gradient to `inner` together with the unperturbed weights (weight
decay and momentum act at w, as in the reference SAM code).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax

GradFn = Callable[[optax.Params], optax.Updates]


def sam_perturbation(params: optax.Params, grads: optax.Updates, rho: float,
                     adaptive: bool, eps: float = 1e-12) -> optax.Updates:
  """e(w) = rho * T_w^2 g / (||T_w g||_2 + eps), over all leaves at once."""
  scale = jax.tree.map(jnp.abs if adaptive else jnp.ones_like, params)
  norm = optax.global_norm(jax.tree.map(lambda t, g: t * g, scale, grads))
  return jax.tree.map(lambda t, g: rho * t * t * g / (norm + eps), scale, grads)


def sam(inner: optax.GradientTransformation, rho: float,
        adaptive: bool = True) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that it steps with the gradient at w + e(w) (SAM/ASAM)."""
  inner = optax.with_extra_args_support(inner)

  def update(grads, state, params=None, *, grad_fn: GradFn = None, **extra_args):
    if params is None or grad_fn is None:
      raise ValueError('sam: update needs params and grad_fn=<gradient at given weights>')
    perturbed = optax.apply_updates(params, sam_perturbation(params, grads, rho, adaptive))
    return inner.update(grad_fn(perturbed), state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update)
