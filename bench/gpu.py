"""Every accelerator figure of the performance issue in one run (one prepared script per lent GPU).

  python -m bench.gpu --out $OUT/gpu.md              # on the device, about 6-8 minutes on an H100
  python -m bench.gpu --config configs/digits.py --batch 16 --dtypes float32 \
      --sample_batch 16 --memory_batches 8,16 --sizes 4,8 --out /tmp/gpu.md   # CPU smoke run

Sections, each printed (and appended to --out) as soon as it is measured, so a run cut short by
the device's time limit still leaves what it finished:
  1. peak: a jitted [8192, 8192] bfloat16 (and float32) matmul, median of 10; the denominator of
     MFU ("the card's measured bf16 matmul rate", not the datasheet's).
  2. train: the config's compiled train step (train_lib.compile_train_step, the one main.py runs)
     at --batch for each of --dtypes: img/s, XLA's FLOPs per example, achieved TFLOP/s and MFU.
  3. dispatch: the digits U-Net at widths --sizes with 1 and 8 steps per dispatch: if step time
     falls with model size down to the tiniest width and fusing steps changes little, the loop is
     bound by compute, not by Python.
  4. sampling: DDIM --sample_steps steps at --sample_batch as one compiled loop: compile s, img/s.
  5. memory: XLA's memory analysis of the train step at two batches, with and without remat,
     extrapolated linearly to the device's memory: the largest batch that fits, then checked by
     running one step at that batch.
Backbones: --config configs/dit_b2.py (or dit_xl2.py) measures DiT's train step on its 32x32x4
latents (the VAE encoder is not timed; no VAE folder is needed for sections 2-5).
The peer (diffusers in bf16 with autocast, channels_last and torch.compile) needs torch with CUDA
on the device: bench/peer_compare.py runs it where it is installed (--peer-python).
"""

import argparse
import datetime
import statistics
import sys
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import config_lib  # noqa: E402
import experiment  # noqa: E402
import sharding  # noqa: E402
import models  # noqa: E402
import train_lib  # noqa: E402
from bench import sampling as sampling_bench  # noqa: E402
from bench import train_step as train_bench  # noqa: E402


class Report:
  """Prints markdown and appends it to a file as it goes."""

  def __init__(self, path):
    self.path = path

  def __call__(self, text=''):
    print(text, flush=True)
    if self.path:
      with open(self.path, 'a') as f:
        f.write(text + '\n')


def matmul_tflops(dtype, n=8192, repeats=10):
  """Median TFLOP/s of a jitted [n, n] @ [n, n] in `dtype` (float32 accumulation for bf16)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def load(path, dtype=None, **fields):
  config = config_lib.load_config_file(path)
  if dtype:
    config.model.dtype = dtype
  for key, value in fields.items():
    config_lib.set_field(config, key, value)
  return config


def train_memory_bytes(config, batch):
  """XLA's estimate of the compiled train step's device memory at a global batch (bytes)."""
  config.training.batch_size = batch
  config.training.steps_per_dispatch = 1
  mesh = sharding.make_mesh()
  model, tx = models.create_model(config), train_lib.make_optimizer(config)
  state = jax.eval_shape(lambda: train_lib.create_state(config, model, tx, mesh))
  step_fn, _ = train_lib.compile_train_step(config, model, experiment.schedule(config), tx,
                                            mesh)
  b = {'image': jax.ShapeDtypeStruct((batch,) + tuple(models.input_shape(config)), jnp.float32),
       'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}
  mem = step_fn.lower(state, b).compile().memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
          mem.alias_size_in_bytes)


def device_memory_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('bytes_limit')


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/cifar10_ddpm.py')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--dtypes', default='bfloat16,float32')
  p.add_argument('--repeats', type=int, default=10)
  p.add_argument('--sizes', default='4,16,64,128', help='digits U-Net widths for section 3')
  p.add_argument('--sample_batch', type=int, default=256)
  p.add_argument('--sample_steps', type=int, default=50)
  p.add_argument('--memory_batches', default='64,128', help='two batches to extrapolate from')
  p.add_argument('--sections', default='peak,train,dispatch,sampling,memory')
  p.add_argument('--out', default='')
  args = p.parse_args()
  report = Report(args.out)
  sections = set(args.sections.split(','))
  dev = jax.devices()[0]
  report(f'## {dev.device_kind} ({jax.device_count()} x {dev.platform}), '
         f'{datetime.date.today()}, jax {jax.__version__}')
  report(f'`python -m bench.gpu {" ".join(sys.argv[1:])}`')
  report()

  peak = None
  if 'peak' in sections:
    n = 8192 if dev.platform != 'cpu' else 1024
    peak = matmul_tflops(jnp.bfloat16, n)
    report(f'Peak: [{n}, {n}] matmul bfloat16 {peak:.3g} TFLOP/s, '
           f'float32 {matmul_tflops(jnp.float32, n):.3g} TFLOP/s (median of 10)')
    report()

  if 'train' in sections:
    report(f'Train step, {args.config}, batch {args.batch}:')
    report()
    report('| dtype | params | compile s | step ms | img/s | GFLOP/example | TFLOP/s | MFU |')
    report('|---|---:|---:|---:|---:|---:|---:|---:|')
    for dtype in args.dtypes.split(','):
      r = train_bench.bench_train_step(load(args.config, dtype), args.batch, args.repeats)
      tflops = r['gflop_per_s'] / 1e3
      mfu = f'{tflops / peak:.1%}' if peak else '-'
      report(f"| {dtype} | {r['params']:,} | {r['compile_s']:.1f} | {r['step_s'] * 1e3:.1f} | "
             f"{r['img_per_s']:.0f} | {r['gflop_per_example']:.3g} | {tflops:.3g} | {mfu} |")
    report()

  if 'dispatch' in sections:
    report('Dispatch: configs/digits.py (16x16, batch 64) at widths model.ch, 1 vs 8 steps per '
           'call:')
    report()
    report('| model.ch | params | GFLOP/example | step ms (1/call) | step ms (8/call) |')
    report('|---:|---:|---:|---:|---:|')
    for ch in map(int, args.sizes.split(',')):
      rows = [train_bench.bench_train_step(load('configs/digits.py', **{'model.ch': ch}), 64,
                                           args.repeats, steps_per_call=k) for k in (1, 8)]
      report(f"| {ch} | {rows[0]['params']:,} | {rows[0]['gflop_per_example']:.3f} | "
             f"{rows[0]['step_s'] * 1e3:.2f} | {rows[1]['step_s'] * 1e3:.2f} |")
    report()

  if 'sampling' in sections:
    dtype = args.dtypes.split(',')[0]
    r = sampling_bench.bench_sampling(load(args.config, dtype), args.sample_batch,
                                      args.sample_steps)
    report(f"Sampling: DDIM {args.sample_steps} steps, batch {args.sample_batch}, {dtype}, one "
           f"compiled loop: compile {r['compile_s']:.1f} s, {r['call_s']:.2f} s per call, "
           f"{r['img_per_s']:.0f} img/s")
    report()

  if 'memory' in sections:
    limit = device_memory_bytes()
    b1, b2 = map(int, args.memory_batches.split(','))
    dtype = args.dtypes.split(',')[0]
    report(f'Memory ({dtype}, device limit '
           f'{"unknown" if limit is None else f"{limit / 2**30:.1f} GiB"}):')
    report()
    report(f'| remat | GiB at {b1} | GiB at {b2} | largest batch (linear fit) | one step there |')
    report('|---|---:|---:|---:|---|')
    for remat in (False, True):
      m1, m2 = (train_memory_bytes(load(args.config, dtype, **{'model.remat': remat}), b)
                for b in (b1, b2))
      per = (m2 - m1) / (b2 - b1)
      if limit is None or per <= 0:
        report(f'| {remat} | {m1 / 2**30:.2f} | {m2 / 2**30:.2f} | - | - |')
        continue
      # Round down to a multiple of 8 (and of the device count) with 5% headroom.
      unit = 8 * jax.device_count()
      largest = int((0.95 * limit - (m1 - per * b1)) / per) // unit * unit
      try:
        train_bench.bench_train_step(load(args.config, dtype, **{'model.remat': remat}),
                                     largest, repeats=1, warmup=1)
        ran = 'ran'
      except Exception as e:  # pylint: disable=broad-except
        ran = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}'
      report(f'| {remat} | {m1 / 2**30:.2f} | {m2 / 2**30:.2f} | {largest} | {ran} |')
    report()


if __name__ == '__main__':
  main()
