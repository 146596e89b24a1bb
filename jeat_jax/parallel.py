"""One device mesh for data parallelism on every device of every host.

We use `jax.jit` with explicit `NamedSharding`s over a 1-D mesh ('data'):
the batch is sharded along its first axis, parameters and optimizer state are
replicated, and the compiler inserts the gradient all-reduce (the loss is a
mean over the global batch) and the cross-device BatchNorm statistics. This is
the SPMD style JAX recommends for new code (`jax.pmap` is in maintenance
mode); the replay buffer is sharded along its shard axis so each device keeps
its own part.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded_on_first_axis(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: Mesh, *local_arrays: np.ndarray):
  """Glues every process's local slice into global arrays sharded over the mesh."""
  sharding = sharded_on_first_axis(mesh)
  arrays = tuple(jax.make_array_from_process_local_data(sharding, a) for a in local_arrays)
  return arrays if len(arrays) > 1 else arrays[0]


def initialize_distributed(config) -> None:
  """Starts jax.distributed when `config.distributed.enabled` (TPU pods, multi-node GPU)."""
  if not config.distributed.enabled:
    return
  kwargs = {}
  if config.distributed.coordinator_address:
    kwargs = dict(coordinator_address=config.distributed.coordinator_address,
                  num_processes=config.distributed.num_processes,
                  process_id=config.distributed.process_id)
  jax.distributed.initialize(**kwargs)
