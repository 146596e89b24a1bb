"""FID and Inception Score in JAX/Flax (TTUR/pytorch-fid protocol).

`inception`: the TF 2015 Inception-v3 FID network, its weight loading and
input handling; `fid`: statistics, Frechet distance, Inception Score, cached
reference statistics, `score_npz` and the CLI (`python -m jeat_jax.metrics.fid`).

The `fid` names are imported lazily, so that `python -m jeat_jax.metrics.fid`
does not import its own module twice.
"""
import importlib

from jeat_jax.metrics.inception import (InceptionV3, compute_activations,
                                        ensure_fid_helper_weights,
                                        load_inception_variables, preprocess)

_FID_NAMES = ('activation_statistics', 'frechet_distance', 'inception_score',
              'reference_statistics', 'score_images', 'score_npz')

__all__ = ['InceptionV3', 'compute_activations', 'ensure_fid_helper_weights',
           'load_inception_variables', 'preprocess', *_FID_NAMES]


def __getattr__(name):
  if name in _FID_NAMES:
    return getattr(importlib.import_module('jeat_jax.metrics.fid'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
