"""Test setup: 8 emulated CPU devices (set before jax is imported), one persistent compilation
cache for the whole run, and parsed absl flags."""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests train the same tiny config more than once (resume, refused workdirs, dispatch
# sizes): each train() builds a new jitted step whose program is the same, and the persistent
# cache (keyed by the program, jax version and flags, so never stale) compiles it once for all
# of them and for both xdist workers. Subprocesses (main.py) inherit it through the environment.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'diffusion-tests-jax-cache-{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

from absl import flags  # noqa: E402

# grain reads absl flags; under pytest nothing parses them.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
