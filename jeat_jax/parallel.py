"""One device mesh for data parallelism on every device of every host.

We use `jax.jit` with explicit `NamedSharding`s over a 1-D mesh ('data'):
the batch is sharded along its first axis, parameters and optimizer state are
replicated, and the compiler inserts the gradient all-reduce (the loss is a
mean over the global batch) and the cross-device BatchNorm statistics. This is
the SPMD style JAX recommends for new code (since JAX 0.8 `jax.pmap` is itself
built on jit and shard_map); the replay buffer is sharded along its shard axis
so each device keeps its own part. See docs/parallelism.md.
"""
import functools

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


@functools.lru_cache(maxsize=None)
def make_mesh() -> Mesh:
  """All devices of all processes on one 'data' axis, in the order `jax.make_mesh` chooses
  for the topology (on a TPU pod slice it need not be process by process: `process_rows`
  says which rows of a batch each process feeds)."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def process_rows(mesh: Mesh, n: int) -> np.ndarray:
  """The rows of a global batch of n rows, sharded on its first axis over `mesh`, that this
  process's devices hold, in the order of those devices on the mesh: the process-local data
  `global_batch` takes."""
  per_device = n // mesh.size
  position = {d: i for i, d in enumerate(mesh.devices.flat)}
  mine = sorted(position[d] for d in mesh.local_devices)
  return np.concatenate([np.arange(i * per_device, (i + 1) * per_device) for i in mine])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded_on_first_axis(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: Mesh, *local_arrays: np.ndarray):
  """Glues every process's rows (`process_rows`, as `data.process_slice` picks them) into
  global arrays sharded over the mesh."""
  sharding = sharded_on_first_axis(mesh)

  def glue(local):
    n = local.shape[0] * jax.process_count()
    offset = {int(r): i for i, r in enumerate(process_rows(mesh, n))}
    return jax.make_array_from_callback(
        (n, *local.shape[1:]), sharding,
        lambda index: local[offset[index[0].start or 0]:][:n // mesh.size])

  arrays = tuple(glue(np.asarray(a)) for a in local_arrays)
  return arrays if len(arrays) > 1 else arrays[0]


def first_local_shard(array: jax.Array) -> np.ndarray:
  """This process's lowest-indexed block of an array sharded on its first axis, on the host.

  On process 0 this is global shard 0. Indexing the global array instead
  (`array[0]`) is a computation every process must join: run by process 0 alone
  (e.g. to log images) it blocks forever in a multi-process run.
  """
  shard = min(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.asarray(shard.data)


def initialize_distributed(config) -> None:
  """Starts jax.distributed when `config.distributed.enabled` (TPU pods, multi-node GPU, or
  several CPU processes). Call it before anything touches JAX's devices (jax.devices(),
  jax.device_count(), a computation): JAX refuses to initialise afterwards.

  With `distributed.coordinator_address` empty, JAX finds the coordinator itself
  (TPU pods, SLURM, Open MPI); otherwise every process passes the same address
  (host:port of process 0), the number of processes and its own id. CPU processes
  exchange their collectives through gloo.
  """
  if not config.distributed.enabled:
    return
  kwargs = {}
  if config.distributed.coordinator_address:
    kwargs = dict(coordinator_address=config.distributed.coordinator_address,
                  num_processes=config.distributed.num_processes,
                  process_id=config.distributed.process_id)
  if jax.config.jax_cpu_collectives_implementation in (None, '', 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # JAX 0.10's default
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
