"""Times the compiled train step: img/s after warm-up (median of several), XLA FLOPs per example
and the achieved FLOP/s.

  python -m bench.train_step --config configs/digits.py --batch 64
  python -m bench.train_step --config configs/cifar10_ddpm.py --batch 8 --repeats 5

Runs on whatever devices JAX sees (batch sharded over all of them, as in training).
"""

import argparse
import statistics
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import config_lib  # noqa: E402
import experiment  # noqa: E402
import sharding  # noqa: E402
import models  # noqa: E402
import train_lib  # noqa: E402


def bench_train_step(config, batch, repeats, warmup=2, steps_per_call=1):
  """Returns a dict of figures for one config at one global batch size."""
  config.training.batch_size = batch
  config.training.steps_per_dispatch = steps_per_call
  mesh = sharding.make_mesh()
  model = models.create_model(config)
  schedule = experiment.schedule(config)
  tx = train_lib.make_optimizer(config)
  state = train_lib.create_state(config, model, tx, mesh)
  length, dim = config.model.context_len, config.model.get('context_dim', 0)
  # A text model's step reads cached token states: random ones of the right shape (and a zero
  # null prompt) time the same program; the encoder is not part of the step.
  text_null = (np.zeros((length, dim), np.float32), np.ones((length,), bool)) if dim else None
  conditioner = experiment.conditioner(config, text_null)
  step_fn, rows = train_lib.compile_train_step(config, model, schedule, tx, mesh, conditioner)
  rng = np.random.default_rng(0)
  # What the model denoises: pixels, or a latent config's latents (the encoder is not timed).
  shape = tuple(models.input_shape(config))
  c = config.data.num_channels
  lead = (batch,) if steps_per_call == 1 else (steps_per_call, batch)
  local = {'image': rng.uniform(-1, 1, lead + shape).astype(np.float32),
           'label': rng.integers(0, max(config.data.num_classes, 1), lead).astype(np.int32)}
  if config.model.cond_channels:
    r = config.data.low_res_size
    local['low_res'] = rng.uniform(-1, 1, lead + (r, r, c)).astype(np.float32)
  if dim:
    local['context'] = rng.standard_normal(lead + (length, dim)).astype(np.float32)
    local['context_mask'] = np.arange(length) < rng.integers(2, length + 1, lead + (1,))
  b = sharding.from_process_rows(local, rows)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, b).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan')))
  for _ in range(warmup):
    state, m = compiled(state, b)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = compiled(state, b)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  examples = batch * steps_per_call
  return {'params': models.count_params(state.params), 'batch': batch,
          'steps_per_call': steps_per_call, 'compile_s': compile_s,
          'step_s': med / steps_per_call, 'img_per_s': examples / med,
          'gflop_per_example': flops / examples / 1e9, 'gflop_per_s': flops / med / 1e9,
          'loss_finite': bool(jnp.isfinite(m['loss']))}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--config', required=True)
  parser.add_argument('--batch', type=int, nargs='+', default=[8])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--steps_per_call', type=int, default=1)
  parser.add_argument('--set', nargs='*', default=[], help='overrides: model.ch=16 ...')
  args = parser.parse_args()
  config = config_lib.load_config_file(args.config)
  for item in args.set:
    key, value = item.split('=', 1)
    config_lib.set_field(config, key, value)
  print(f'# {args.config} {" ".join(args.set)} | jax {jax.__version__} | '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  print('| params | batch | steps/call | compile s | step ms | img/s | GFLOP/example | GFLOP/s |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|')
  for batch in args.batch:
    r = bench_train_step(config, batch, args.repeats, steps_per_call=args.steps_per_call)
    print(f"| {r['params']:,} | {r['batch']} | {r['steps_per_call']} | {r['compile_s']:.1f} | "
          f"{r['step_s'] * 1e3:.1f} | {r['img_per_s']:.1f} | {r['gflop_per_example']:.2f} | "
          f"{r['gflop_per_s']:.1f} |", flush=True)


if __name__ == '__main__':
  main()
