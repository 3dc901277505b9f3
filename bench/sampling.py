"""Times DDIM sampling as one compiled loop: compile seconds and images/s after compilation.

  python -m bench.sampling --config configs/digits.py --batch 256 --steps 50
  python -m bench.sampling --config configs/cifar10_ddpm.py --batch 16 --steps 50

The whole sampler (noise draw, every network call and update) is one jitted function from
sample_lib.compile_sampler; random-init parameters (the speed does not depend on their values).
"""

import argparse
import os
import statistics
import time


import jax  # noqa: E402
import numpy as np  # noqa: E402

import config_lib  # noqa: E402
import experiment  # noqa: E402
import sharding  # noqa: E402
import models  # noqa: E402
import sample_lib  # noqa: E402


def bench_sampling(config, batch, steps, sampler='ddim', repeats=2):
  """Returns a dict: compile_s, seconds per call (median of repeats) and images/s."""
  model = models.create_model(config)
  params = models.init_params(model, config, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh()
  generate = sample_lib.compile_sampler(
      config, model, experiment.schedule(config), experiment.conditioner(config), mesh,
      sampler=sampler, num_steps=steps,
      spacing=config.sampling.spacing, eta=0.0, clip_x0=True, guidance_scale=1.0)
  kwargs = {}
  if config.model.num_classes > 0:
    kwargs['y'] = jax.numpy.asarray(np.arange(batch) % config.model.num_classes, np.int32)
  if config.model.cond_channels > 0:
    raise ValueError('image-conditional configs need a condition image; not benchmarked here')
  rng = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  ae = generate.ae_params
  compiled = generate.jitted.lower(params, ae, rng, kwargs, batch).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats + 1):  # the first call also pays one-time allocation; not counted
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, ae, jax.random.fold_in(rng, i), kwargs))
    if i:
      times.append(time.perf_counter() - t0)
  assert out.shape[0] == batch and bool(np.isfinite(np.asarray(out)).all())
  sec = statistics.median(times)
  return {'params': models.count_params(params), 'compile_s': compile_s, 'call_s': sec,
          'img_per_s': batch / sec}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--sampler', default='ddim')
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  config = config_lib.load_config_file(args.config)
  r = bench_sampling(config, args.batch, args.steps, args.sampler, args.repeats)
  print(f'# {args.config} | {args.sampler} {args.steps} steps | jax {jax.__version__} | '
        f'{jax.device_count()} x {jax.devices()[0].device_kind} | {os.cpu_count()} CPU cores')
  print('| params | batch | steps | compile s | s per call | images/s |')
  print('|---:|---:|---:|---:|---:|---:|')
  print(f"| {r['params']:,} | {args.batch} | {args.steps} | {r['compile_s']:.1f} | "
        f"{r['call_s']:.2f} | {r['img_per_s']:.1f} |", flush=True)


if __name__ == '__main__':
  main()
