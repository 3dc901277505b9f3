"""Long work: progress lines with a rate and an ETA, and cooperative stops.

Sampling, evaluation, reference statistics and caching run for minutes to hours. They report
`done / total`, the rate and the ETA at least every `every_s` seconds (process 0 only), and
between chunks of work they ask `stop()`; a requested stop (SIGTERM, SIGINT, a preemption
notice) raises `Interrupted`, so that the trainer can save its state at once instead of
finishing a grid or an FID first.
"""

import signal
import time
from typing import Callable, Optional

from absl import logging
import jax


class Interrupted(Exception):
  """Long work stopped between two chunks because a stop was requested."""


def fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def never() -> bool:
  return False


class Progress:
  """Counts finished units of work and logs `what: done/total (rate unit/s, ETA h:mm:ss)`.

  The first line comes after the first update (which usually includes compilation), later ones
  at most every `every_s` seconds, and a last one when done == total.
  """

  def __init__(self, what: str, total: int, unit: str = 'images', every_s: float = 30.0,
               stop: Optional[Callable[[], bool]] = None):
    self.what, self.total, self.unit, self.every_s = what, int(total), unit, every_s
    self.stop = stop or never
    self.done = 0
    self._start = time.time()
    self._last_log = None

  def check_stop(self):
    """Raises Interrupted when a stop was requested (call it between chunks)."""
    if self.stop():
      raise Interrupted(f'{self.what}: stopped at {self.done}/{self.total} {self.unit}')

  def update(self, n: int):
    self.done += int(n)
    now = time.time()
    finished = self.done >= self.total
    if self._last_log is None or now - self._last_log >= self.every_s or finished:
      self._last_log = now
      elapsed = now - self._start
      rate = self.done / max(elapsed, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      if jax.process_index() == 0:
        logging.info('%s: %d/%d %s (%.3g %s/s, %s elapsed, ETA %s)', self.what, self.done,
                     self.total, self.unit, rate, self.unit, fmt_time(elapsed), fmt_time(eta))
    self.check_stop()


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop (and its hooks, between chunks) read.

  Single-process runs only. A second SIGINT (Ctrl-C twice) interrupts at once. In a
  multi-process run no Python handler is installed: jax.distributed's preemption service catches
  SIGTERM on any process and the loop asks `multihost_utils.reached_preemption_sync_point` every
  step, so that every process stops and saves at the same step (a flag set on one process alone
  would leave the others waiting in a collective); hooks then run to their end.
  """

  def __init__(self, install=True):
    self.signal = None
    self._old = {}
    if not install:
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. under some test runners)
        pass

  def _handle(self, signum, frame):
    del frame
    if self.signal == 'SIGINT' and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    logging.warning('received %s: finishing the current step (or chunk of sampling), then '
                    'saving a checkpoint', self.signal)

  def __call__(self) -> bool:
    return self.signal is not None

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
