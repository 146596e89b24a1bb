"""--mode=export: the trained network as a standalone PyTorch model (RobustBench, fra31/auto-attack).

Writes WORKDIR/export/
  model.py     the network's PyTorch definition (a copy of jeat_jax/torch_models.py: only torch)
  model.pt     its state_dict: the trained weights and the BatchNorm running statistics
  export.json  `build_model`'s arguments ("model"), the input the network takes ([0, 1] float32
               NCHW), the run (recipe, checkpoint step, data), the torch version and the check
The check loads model.py and model.pt back as a user would, and compares their float32 eval-mode
logits on the first NUM_COMPARED test images with the JAX model's (float32, running statistics):
`max_abs_logit_diff`. A run that computes in bfloat16 also records the difference to the logits
of its own compute dtype. Every process computes the JAX logits (a collective); process 0 does
the torch work and writes the files.
"""
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jeat_jax import data as data_lib
from jeat_jax import models, parallel, torch_port
from jeat_jax import state as state_lib
from jeat_jax.files import atomic_write, write_json_atomic, write_text_atomic

EXPORT_SUBDIR = 'export'
NUM_COMPARED = 256
EXPECTED_MAX_DIFF = 1e-4   # float32 twins agree to about 1e-5; more means the export is wrong
TORCH_BATCH = 64


def host_copy(tree):
  """A pytree of replicated device arrays as numpy arrays (this process's copy)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def jax_logits(logits_fn, mesh, x_uint8: np.ndarray, batch_size: int) -> np.ndarray:
  """Float32 logits of all of `x_uint8` (NHWC), in full float32 matmul precision, on every
  process (global batches over the mesh, gathered)."""
  fn = jax.jit(lambda xb: logits_fn(data_lib.to_float(xb)))
  labels = np.zeros(x_uint8.shape[0], np.int32)
  out = []
  with jax.default_matmul_precision('float32'):
    for xb, _, mb in data_lib.eval_batches(x_uint8, labels, batch_size):
      logits, mask = multihost_utils.process_allgather(
          (fn(parallel.global_batch(mesh, xb)), parallel.global_batch(mesh, mb)), tiled=True)
      out.append(logits[mask])  # each batch is padded for the devices at its end
  return np.concatenate(out).astype(np.float32)


def torch_logits(net, x_uint8: np.ndarray) -> np.ndarray:
  """Logits of the torch network (eval mode) on `x_uint8` (NHWC), fed as [0, 1] NCHW float32."""
  torch = torch_port.require_torch()
  x = np.ascontiguousarray(x_uint8.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
  with torch.no_grad():
    return np.concatenate([net(torch.from_numpy(x[i:i + TORCH_BATCH])).numpy()
                           for i in range(0, x.shape[0], TORCH_BATCH)])


def write_model_files(out: str, net) -> None:
  """OUT/model.py (the definition) and OUT/model.pt (the state_dict)."""
  torch = torch_port.require_torch()
  write_text_atomic(os.path.join(out, 'model.py'), torch_port.model_source())
  atomic_write(os.path.join(out, 'model.pt'), lambda tmp: torch.save(net.state_dict(), tmp))


def export_run(config, workdir: str) -> Dict[str, Any]:
  """Exports the latest checkpoint of `workdir` to WORKDIR/export/; returns export.json's record
  (on process 0; None on the others)."""
  torch = torch_port.require_torch()  # before the minutes of loading a run
  model, state, ds, mesh = state_lib.load_trained(config, workdir)
  x = ds.x_test[:NUM_COMPARED]
  model32 = models.create_model(config.model, ds.num_classes, jnp.float32)
  reference = jax_logits(
      state_lib.make_logits_fn(model32, state.params, state.batch_stats, 'running'), mesh, x,
      config.eval.batch_size)
  own_dtype = None
  if jnp.dtype(config.model.dtype) != jnp.float32:
    own_dtype = jax_logits(state_lib.make_logits_fn(model, state.params, state.batch_stats,
                                                    'running'), mesh, x, config.eval.batch_size)
  record = None
  if jax.process_index() == 0:
    out = os.path.join(workdir, EXPORT_SUBDIR)
    variables = host_copy(state_lib.model_variables(state.params, state.batch_stats))
    write_model_files(out, torch_port.port(variables, config.model))
    settings = torch_port.model_settings(config.model, ds.num_classes)
    exported = torch_logits(torch_port.load_export(out, settings), x)
    record = {
        'model': settings,
        'model_name': models.model_name(config.model),
        'input': {'range': [0.0, 1.0], 'layout': 'NCHW', 'dtype': 'float32',
                  'shape': [ds.x_test.shape[3], *ds.x_test.shape[1:3]],
                  'normalization': config.model.input_normalization},
        'num_classes': int(ds.num_classes),
        'recipe': config.recipe, 'checkpoint_step': int(state.step), 'dataset': config.dataset,
        'data': ds.provenance, 'compute_dtype': config.model.dtype,
        'torch_version': torch.__version__,
        'num_compared': int(x.shape[0]),
        'max_abs_logit_diff': float(np.max(np.abs(exported - reference))),
        'argmax_agreement': float(np.mean(exported.argmax(1) == reference.argmax(1))),
    }
    if own_dtype is not None:
      record[f'max_abs_logit_diff_vs_{config.model.dtype}'] = float(
          np.max(np.abs(exported - own_dtype)))
    write_json_atomic(os.path.join(out, 'export.json'), record)
    logging.info('exported %s (step %d) to %s: max |logit difference| %.2e on %d test images',
                 record['model_name'], record['checkpoint_step'], out,
                 record['max_abs_logit_diff'], record['num_compared'])
    if record['max_abs_logit_diff'] > EXPECTED_MAX_DIFF:
      logging.warning('the PyTorch export differs from the JAX model by %.2e (expected < %.0e)',
                      record['max_abs_logit_diff'], EXPECTED_MAX_DIFF)
  multihost_utils.sync_global_devices('export: files written')
  return record
