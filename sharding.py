"""The device mesh and the two ways a batch reaches it.

Every program runs over one `jax.sharding.Mesh` of all devices of all processes, with one axis,
'data': batches are split along their first axis, everything else (params, optimizer state) is
replicated, unless config.training.fsdp shards the train state over the same axis
(`fsdp_sharding`, `state_shardings`). A batch arrives either as each process's own rows (training: every process reads
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


# Leaves with fewer elements stay replicated under FSDP. Such leaves (biases, norm scales,
# the first conv of a 3-channel input) hold a few KiB each, so sharding them saves almost no
# memory, while each sharded leaf costs an all-gather and a reduce-scatter per step whose time
# is latency, not bandwidth. 2**10 float32 = 4 KiB: in the DDPM CIFAR-10 U-Net the leaves
# below it (biases, norm scales, the 3-channel conv_in / conv_out) are 203 of its 304 leaves
# but 0.15% of its 35.7M parameters, and all its other leaves divide by 8 devices.
FSDP_MIN_SIZE = 2 ** 10


def fsdp_sharding(shape, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
  """The FSDP layout of one leaf: split on 'data' along its largest axis whose size the
  number of devices divides (the last of equal ones); replicated when no axis divides or the
  leaf has fewer than `min_size` elements (scalars always).

  Args:
    shape: the leaf's shape (a tuple, or anything with `.shape`: an array, a ShapeDtypeStruct).
    mesh: the 1-D 'data' mesh.
    min_size: the smallest leaf that is sharded.
  """
  shape = tuple(getattr(shape, 'shape', shape))
  n = mesh.shape[DATA_AXIS]
  axes = [i for i, d in enumerate(shape) if d % n == 0]
  if n == 1 or not axes or int(np.prod(shape)) < min_size:
    return replicated(mesh)
  axis = max(axes, key=lambda i: (shape[i], i))
  return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def state_shardings(state_shapes, mesh: Mesh, fsdp: bool = False):
  """The shardings of a train state (a pytree with params, ema_params and opt_state fields,
  such as train_lib.TrainState's shapes): those three fields' leaves by `fsdp_sharding` when
  `fsdp`, everything else (step, rng, counters) replicated. Same tree structure as the input."""
  rep = replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, state_shapes)
  if not fsdp:
    return shardings
  shard = lambda tree: jax.tree.map(lambda s: fsdp_sharding(s, mesh), tree)
  return shardings.replace(params=shard(state_shapes.params),
                           ema_params=shard(state_shapes.ema_params),
                           opt_state=shard(state_shapes.opt_state))


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Split on 'data' along axis `leading_axes` (0: [B, ...]; 1: [K, B, ...] fused steps)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
  """`a` [m, ...] (m <= n) padded to n rows with copies of its last row: a last batch made the
  compiled batch size; the caller drops the padding's outputs."""
  a = np.asarray(a)
  return a if len(a) >= n else np.concatenate([a, np.repeat(a[-1:], n - len(a), 0)])


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
