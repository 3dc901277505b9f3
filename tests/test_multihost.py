"""Two local CPU processes (2 devices each) train as one 4-device job through `python main.py`.

The 2-process run is compared with a 1-process run on 4 devices that is fed the same global
batches. Why not plain `main.py` on one process: each process reads and shuffles its own
shard of the data (examples p, p + P, ...), and the global batch is [process 0's rows;
process 1's rows], so a 1-process run, shuffling the whole set, trains on other examples; and
the per-example noise and timestep draws belong to batch rows, so no reordering argument makes
the two comparable. The reference run therefore reads shard 0 and shard 1 (with the same
pipeline and seeds the two processes use) and concatenates them in that order: it sees the
same examples in the same rows, and what remains to differ is exactly what multi-host
changes: jax.distributed, cross-process arrays and collectives, checkpointing by two processes.

This file is also the reference run's entry point: `python tests/test_multihost.py reference
CONFIG_FILE WORKDIR` (4 CPU devices, one process).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == '__main__':  # the reference run: 4 devices in this one process
  os.environ['JAX_NUM_CPU_DEVICES'] = '4'
  os.environ.pop('XLA_FLAGS', None)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import test_reliability as rel  # noqa: E402
from tests.test_reliability import jax_cache  # noqa: E402,F401  (fixture)

MULTIHOST = {**rel.MICRO, 'training.num_steps': 6, 'training.checkpoint_every': 1,
             'training.keep_checkpoints': 2, 'training.log_every': 1,
             'training.sample_every': 6, 'training.num_grid_samples': 8}


class TwoShards:
  """The global batches of a 2-process run, read in one process: shard 0's rows, then shard 1's."""

  def __init__(self, get_dataset, config, **kwargs):
    self._shards = [get_dataset(config, process_index=p, process_count=2, **kwargs)
                    for p in (0, 1)]

  def __iter__(self):
    return self

  def __next__(self):
    a, b = (next(s) for s in self._shards)
    return {k: np.concatenate([a[k], b[k]]) for k in a}

  def get_state(self):
    # The shards are at the same position and the state holds no process index: one copy
    # describes both, as in the 2-process run's checkpoints.
    return self._shards[0].get_state()

  def set_state(self, state):
    for s in self._shards:
      s.set_state(state)


def _reference_main(config_file, workdir):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  import config_lib  # pylint: disable=g-import-not-at-top
  import data as data_lib  # pylint: disable=g-import-not-at-top
  import train_lib  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 1 and jax.device_count() == 4
  real = data_lib.get_dataset
  data_lib.get_dataset = lambda config, **kw: TwoShards(real, config, **kw)
  train_lib.train(config_lib.load_config_file(config_file), workdir)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn_pair(config_file, workdir, jax_cache):
  port = _free_port()
  procs = []
  for i in range(2):
    env = rel.main_env(jax_cache)
    del env['XLA_FLAGS']
    env.update({'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2',
                'JAX_PROCESS_ID': str(i), 'JAX_NUM_CPU_DEVICES': '2',
                'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'})
    procs.append(rel.spawn_main(config_file, workdir, env))
  return procs


def _wait(procs, timeout=600):
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err
  return [err for _, err in outs]


@pytest.mark.slow
def test_two_processes_preempted_and_resumed_equal_one_process(tmp_path, jax_cache):
  config_file = rel.write_config_file(tmp_path / 'cfg.py', MULTIHOST)
  workdir = tmp_path / 'two'
  ref_dir = tmp_path / 'one'
  env = rel.main_env(jax_cache)
  del env['XLA_FLAGS']
  reference = subprocess.Popen([sys.executable, '-m', 'tests.test_multihost', 'reference',
                                config_file, str(ref_dir)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  # The 2-process run gets SIGTERM on process 1 only, after its second step: the preemption
  # service must stop both processes at the same step, with one checkpoint, exit status 0.
  procs = _spawn_pair(config_file, workdir, jax_cache)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 600
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert all(p.poll() is None for p in procs) and time.time() < deadline, [
        p.communicate() for p in procs]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  errs = _wait(procs)
  stopped = rel.committed_steps(str(workdir))[-1]
  assert 2 <= stopped < 6, errs[0]
  assert f'saved a checkpoint at step {stopped}' in errs[0]
  assert f'saved a checkpoint at step {stopped}' in errs[1]
  # Process 1 logs warnings only; its INFO lines (step, loss) stay off.
  assert 'loss' in errs[0] and 'loss' not in errs[1]

  errs = _wait(_spawn_pair(config_file, workdir, jax_cache))
  assert f'resumed from {workdir}/checkpoints at step {stopped}' in errs[0]
  out, err = reference.communicate(timeout=600)
  assert reference.returncode == 0, out + err

  config = rel.micro_config(**MULTIHOST)
  step2, two = rel.restore(str(workdir), config)
  step1, one = rel.restore(str(ref_dir), config)
  assert step1 == step2 == 6
  # Same global batches, same per-row noise: the same parameters. The all-reduce of the
  # gradients runs over gloo between processes instead of within one: the order of the float
  # sums may differ (measured: at most 4.5e-7 in any parameter after 6 steps), so equality is
  # checked to float32 round-off amplified by Adam, as in test_train_lib's 1-vs-8-device test,
  # not bit for bit. One step moves a parameter by about lr = 1e-3: other batches would show.
  for a, b in zip(rel.leaves(two), rel.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(two.params), jax.tree.leaves(
                  rel.restore_step(str(workdir), config, 5).params)))
  assert moved > 1e-4  # the last step trained (else the comparison would prove little)

  # Process 0 alone wrote the logs and the image: one record per step, one grid, one event file.
  records = [json.loads(l) for l in metrics.read_text().splitlines()]
  grids = [r for r in records if 'samples' in r]
  assert [(r['step'], r['samples']) for r in grids] == [(6, 'samples/train_step_0000006.png')]
  records = [r for r in records if 'loss' in r]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  losses_one = [json.loads(l)['loss'] for l in (ref_dir / 'metrics.jsonl').read_text().splitlines()]
  np.testing.assert_allclose([r['loss'] for r in records], losses_one, rtol=1e-5)
  assert os.listdir(workdir / 'samples') == ['train_step_0000006.png']
  assert len([f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]) == 2
  assert json.loads((workdir / 'config.json').read_text())['training']['num_steps'] == 6


if __name__ == '__main__':
  assert sys.argv[1] == 'reference', sys.argv
  _reference_main(sys.argv[2], sys.argv[3])
