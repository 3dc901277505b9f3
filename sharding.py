"""The device mesh and the two ways a batch reaches it.

Every program runs over one `jax.sharding.Mesh` of all devices of all processes, with one axis,
'data': batches are split along their first axis, everything else (params, optimizer state) is
replicated. A batch arrives either as each process's own rows (training: every process reads
its own shard of the data) or as the whole global batch, identical on every process (sampling:
labels, prompts and input images are known everywhere).
"""

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Split on 'data' along axis `leading_axes` (0: [B, ...]; 1: [K, B, ...] fused steps)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def from_process_rows(local_batch: dict, sharding: NamedSharding) -> dict:
  """Each process's own rows (numpy, per key) -> one global jax.Array per key.

  The global batch is the concatenation of the processes' rows, process 0's first.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def from_global_rows(mesh: Mesh, value: np.ndarray) -> jax.Array:
  """A host array holding the whole global batch (the same on every process) -> a jax.Array
  sharded on 'data'; each process keeps only the rows of its own devices."""
  sharding = batch_sharding(mesh)
  if jax.process_count() > 1:
    return jax.make_array_from_process_local_data(sharding, value, value.shape)
  return jax.device_put(value, sharding)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) sharded array -> the whole array as numpy, on every process."""
  if jax.process_count() > 1:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))
