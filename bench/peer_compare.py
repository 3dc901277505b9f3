"""Our DDPM CIFAR-10 U-Net (JAX) against diffusers' UNet2DModel (PyTorch) on the same machine.

The peer is diffusers' `UNet2DModel` configured as the public google/ddpm-cifar10-32 model (one
attention head, dropout 0.1 as in the paper; 35,746,307 parameters, checked at start-up), randomly
initialised, trained with the same step as ours: eps-MSE at uniform t on the linear schedule,
global-norm clipping to 1, Adam (lr 2e-4, eps 1e-8) and an EMA update of every parameter.

Each side runs in its own long-lived worker process (ours in this interpreter's venv, the peer in
the venv named by --peer-python, see bench/requirements-peer.txt). This script orchestrates: for
every (mode, batch) it has both workers build, compile and warm up, then runs rounds in which each
worker times a few steps on the same random batch, alternating which goes first. The machine may
be shared, so the load drifts; interleaving makes both sides see similar load and the median of the
per-round ratios is the figure to quote.

  python -m bench.peer_compare --peer-python /work/torchvenv/bin/python
  python -m bench.peer_compare --peer-python /work/torchvenv/bin/python --modes train \
      --batch 8 32 --rounds 5 --steps 2

  python -m bench.peer_compare --gpu --modes train --batch 128   # on a GPU: both in bfloat16

Prints one markdown table: img/s of each (medians over rounds) and the ratio ours / peer. With
--gpu (not yet run: no GPU has been lent) the peer is torch.compile'd, channels_last, under bf16
autocast, and ours uses model.dtype=bfloat16; both keep float32 master weights.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, CHANNELS, NUM_TIMESTEPS = 32, 3, 1000
LR, EPS, CLIP, EMA_RATE = 2e-4, 1e-8, 1.0, 0.9999
PAPER_PARAMS = 35_746_307


def _batch(batch, seed):
  """The shared random batch: float32 [B, 32, 32, 3] in [-1, 1] (NHWC)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(seed).uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, CHANNELS)
                                              ).astype(np.float32)


# ----------------------------------------------------------------------------- JAX worker


class JaxSide:
  """Our model, train step and forward pass, as the project runs them (train_lib, models)."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax

  def setup(self, mode, batch, seed, warmup, extra_flags=None):
    import numpy as np  # pylint: disable=g-import-not-at-top
    import config_lib  # pylint: disable=g-import-not-at-top
    import experiment  # pylint: disable=g-import-not-at-top
    import sharding  # pylint: disable=g-import-not-at-top
    import models  # pylint: disable=g-import-not-at-top
    import train_lib  # pylint: disable=g-import-not-at-top
    jax = self.jax
    config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'cifar10_ddpm.py'))
    config.training.batch_size = batch
    config.training.steps_per_dispatch = 1
    for key, value in (extra_flags or {}).items():
      config_lib.set_field(config, key, value)
    model = models.create_model(config)
    mesh = sharding.make_mesh()
    x = _batch(batch, seed)
    t0 = time.perf_counter()
    if mode == 'train':
      schedule = experiment.schedule(config)
      tx = train_lib.make_optimizer(config)
      state = train_lib.create_state(config, model, tx, mesh)
      step_fn, rows = train_lib.compile_train_step(config, model, schedule, tx, mesh)
      data = sharding.from_process_rows(
          {'image': x, 'label': np.zeros((batch,), np.int32)}, rows)
      compiled = step_fn.lower(state, data).compile()
      self.params_count = models.count_params(state.params)
      self.state = state

      def run():
        self.state, metrics = compiled(self.state, data)
        return metrics['loss']
    else:
      params = models.init_params(model, config, jax.random.PRNGKey(0))
      self.params_count = models.count_params(params)
      t = jax.numpy.asarray(np.random.default_rng(seed + 1).integers(0, NUM_TIMESTEPS, batch),
                            jax.numpy.int32)
      xj = jax.numpy.asarray(x)
      compiled = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False)).lower(
          params, xj, t).compile()

      def run():
        return compiled(params, xj, t)
    compile_s = time.perf_counter() - t0
    self.run_once = run
    for _ in range(warmup):
      jax.block_until_ready(run())
    return {'params': self.params_count, 'compile_s': compile_s,
            'version': f'jax {jax.__version__}'}

  def run(self, steps):
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self.jax.block_until_ready(self.run_once())
      times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- torch worker


class TorchSide:
  """diffusers' UNet2DModel as google/ddpm-cifar10-32, with the same train step as ours."""

  def __init__(self, threads):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(threads)

  def setup(self, mode, batch, seed, warmup, extra_flags=None):
    import diffusers  # pylint: disable=g-import-not-at-top
    torch = self.torch
    torch.manual_seed(seed)
    # --gpu: CUDA, bf16 autocast (float32 master weights), channels_last and torch.compile, the
    # fastest standard PyTorch setup for this model.
    self.gpu = gpu = bool((extra_flags or {}).get('gpu'))
    device = torch.device('cuda' if gpu else 'cpu')
    model = diffusers.UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS,
        block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
        norm_num_groups=32, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False,
        downsample_padding=0, attention_head_dim=None, dropout=0.1)
    params = [p for p in model.parameters()]
    self.params_count = sum(p.numel() for p in params)
    # NCHW, as the peer takes it; the same numbers as the JAX side's NHWC batch.
    x0 = torch.from_numpy(_batch(batch, seed).transpose(0, 3, 1, 2).copy()).to(device)
    net = model
    if gpu:
      model.to(device, memory_format=torch.channels_last)
      params = [p for p in model.parameters()]
      x0 = x0.contiguous(memory_format=torch.channels_last)
      net = torch.compile(model)

    def apply(x, t):
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
        return net(x, t).sample.float()
    t0 = time.perf_counter()
    if mode == 'train':
      model.train()
      betas = torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64)
      abar = torch.cumprod(1 - betas, 0).float().to(device)
      opt = torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), eps=EPS, foreach=True)
      ema = [p.detach().clone() for p in params]

      def run():
        t = torch.randint(0, NUM_TIMESTEPS, (batch,), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(apply(x_t, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        with torch.no_grad():
          torch._foreach_lerp_(ema, params, 1.0 - EMA_RATE)  # pylint: disable=protected-access
        return loss.item()
    else:
      model.eval()
      t = torch.from_numpy(_batch_t(batch, seed + 1)).to(device)

      def run():
        with torch.inference_mode():
          out = apply(x0, t)
        if gpu:
          torch.cuda.synchronize()
        return out
    self.run_once = run
    for _ in range(warmup):
      run()
    return {'params': self.params_count, 'compile_s': time.perf_counter() - t0,
            'version': f'torch {torch.__version__}, diffusers {diffusers.__version__}'}

  def run(self, steps):
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self.run_once()
      times.append(time.perf_counter() - t0)
    return times


def _batch_t(batch, seed):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(seed).integers(0, NUM_TIMESTEPS, batch).astype(np.int64)


def worker_main(kind, threads):
  """Serves JSON-line commands on stdin; answers on the original stdout (libraries' prints go to
  stderr so they cannot corrupt the protocol)."""
  out = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)
  side = JaxSide() if kind == 'jax' else TorchSide(threads)
  out.write(json.dumps({'ready': True}) + '\n')
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd['cmd'] == 'setup':
      reply = side.setup(cmd['mode'], cmd['batch'], cmd['seed'], cmd['warmup'], cmd.get('flags'))
    elif cmd['cmd'] == 'run':
      reply = {'times': side.run(cmd['steps'])}
    else:
      break
    out.write(json.dumps(reply) + '\n')


# ----------------------------------------------------------------------------- orchestrator


class Worker:
  """One worker subprocess and its line protocol."""

  def __init__(self, python, kind, threads, env=None):
    self.proc = subprocess.Popen(
        [python, '-m', 'bench.peer_compare', '--worker', kind, '--threads', str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    self.ask_raw()  # waits for 'ready'

  def ask_raw(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'worker {self.proc.args} died (see its stderr above)')
    return json.loads(line)

  def ask(self, **cmd):
    self.proc.stdin.write(json.dumps(cmd) + '\n')
    self.proc.stdin.flush()
    return self.ask_raw()

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
      self.proc.stdin.close()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=60)


def compare(ours, peer, mode, batch, rounds, steps, warmup, seed=0, gpu=False):
  """Alternating timed rounds; returns the row of figures for one (mode, batch)."""
  info_o = ours.ask(cmd='setup', mode=mode, batch=batch, seed=seed, warmup=warmup,
                    flags={'model.dtype': 'bfloat16'} if gpu else None)
  info_p = peer.ask(cmd='setup', mode=mode, batch=batch, seed=seed, warmup=warmup,
                    flags={'gpu': gpu})
  for name, info in (('ours', info_o), ('peer', info_p)):
    if info['params'] != PAPER_PARAMS:
      raise RuntimeError(f'{name} has {info["params"]:,} parameters, not {PAPER_PARAMS:,}')
  ours_ips, peer_ips, ratios = [], [], []
  for r in range(rounds):
    order = (ours, peer) if r % 2 == 0 else (peer, ours)
    got = {}
    for w in order:
      times = w.ask(cmd='run', steps=steps)['times']
      got[w] = batch * len(times) / sum(times)
    ours_ips.append(got[ours])
    peer_ips.append(got[peer])
    ratios.append(got[ours] / got[peer])
    print(f'  {mode} b{batch} round {r}: ours {got[ours]:.2f} img/s, peer {got[peer]:.2f} img/s, '
          f'ratio {ratios[-1]:.3f}', file=sys.stderr, flush=True)
  return {'mode': mode, 'batch': batch, 'ours': statistics.median(ours_ips),
          'peer': statistics.median(peer_ips), 'ratio': statistics.median(ratios),
          'ratio_min': min(ratios), 'ratio_max': max(ratios),
          'compile_ours': info_o['compile_s'], 'versions': (info_o['version'], info_p['version'])}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='torch intra-op threads (default: all cores)')
  parser.add_argument('--peer-python', default='/work/torchvenv/bin/python',
                      help='python of the venv holding torch and diffusers')
  parser.add_argument('--modes', nargs='+', default=['train', 'forward'],
                      choices=('train', 'forward'))
  parser.add_argument('--batch', type=int, nargs='+', default=[8, 32])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=2, help='timed steps per worker per round')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--gpu', action='store_true',
                      help='both on the GPU in bfloat16: ours with model.dtype=bfloat16, the peer '
                      'with CUDA, autocast, channels_last and torch.compile')
  args = parser.parse_args()
  if args.worker:
    worker_main(args.worker, args.threads)
    return

  ours = Worker(sys.executable, 'jax', args.threads)
  peer = Worker(args.peer_python, 'torch', args.threads)
  rows = []
  try:
    for mode in args.modes:
      for batch in args.batch:
        rows.append(compare(ours, peer, mode, batch, args.rounds, args.steps, args.warmup,
                            gpu=args.gpu))
  finally:
    ours.close()
    peer.close()
  versions = rows[0]['versions'] if rows else ('', '')
  print(f'# {datetime.date.today()} | {platform.node()} | {os.cpu_count()} CPU cores | '
        f'{versions[0]} vs {versions[1]} | XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'# python {" ".join(sys.argv)}')
  print('| mode | batch | ours img/s | peer img/s | ratio ours/peer (median of rounds) | '
        'ratio min..max | our compile s |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f"| {r['mode']} | {r['batch']} | {r['ours']:.2f} | {r['peer']:.2f} | "
          f"{r['ratio']:.3f} | {r['ratio_min']:.2f}..{r['ratio_max']:.2f} | "
          f"{r['compile_ours']:.1f} |", flush=True)


if __name__ == '__main__':
  main()
