"""configs/shapes_sd_tiny.py, the SD-shaped U-Net at toy widths, from random init through main.py:
it trains on the embedded captioned shapes, a run interrupted after its first checkpoint and
resumed by main.py ends bit for bit where the uninterrupted one did (params, EMA, optimizer
state, RNG, step), and --mode sample draws from prompts with guidance.

The config is shrunk further (8x8 pixels, batch 8, 4 steps) so that the SD code path compiles
and runs in CI time; its architecture (block types, cross-attention to MiniLM's states, GroupNorm
groups) is the config file's.
"""

import glob
import json
import os

import numpy as np
import pytest

import config_lib
import train_lib
from tests.main_runner import run_main
from tests.test_reliability import assert_bitwise_equal
from tests.test_reliability import restore

PROMPT = 'a red circle'


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('cfg') / 'sd_tiny_small.py'
  path.write_text('''from configs import shapes_sd_tiny


def get_config():
  c = shapes_sd_tiny.get_config()
  c.data.image_size = 8
  c.sd_unet.sample_size = 8
  c.optim.warmup_steps = 1
  c.training.batch_size, c.training.num_steps = 8, 4
  c.training.log_every = c.training.checkpoint_every = 2
  c.training.sample_every, c.training.ema_rate = 0, 0.9
  c.sampling.sampler, c.sampling.num_steps, c.sampling.guidance_scale = 'ddim', 3, 3.0
  c.sampling.num_samples = c.sampling.batch_size = 8
  return c
''')
  return str(path)


@pytest.fixture(scope='module')
def full_run(config_file, tmp_path_factory):
  """The uninterrupted 4-step run, through main.py: its workdir."""
  workdir = str(tmp_path_factory.mktemp('full'))
  run_main(config_file, workdir)
  return workdir


def test_trains_through_main(full_run):
  with open(os.path.join(full_run, 'config.json')) as f:
    saved = json.load(f)
  assert saved['model']['name'] == 'sd_unet'
  assert saved['sd_unet']['down_block_types'] == ['CrossAttnDownBlock2D', 'DownBlock2D']
  with open(os.path.join(full_run, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if '"loss"' in line]
  assert [r['step'] for r in records] == [2, 4]
  assert all(np.isfinite(r['loss']) for r in records)


def test_interrupted_and_resumed_by_main_equals_uninterrupted_bit_for_bit(config_file, full_run,
                                                                         tmp_path):
  config = config_lib.load_config_file(config_file)
  config_lib.validate(config)
  split = str(tmp_path / 'split')
  train_lib.train(config, split, stop_after=2)  # as if preempted after the step-2 checkpoint
  step, _ = restore(split, config)
  assert step == 2
  run_main(config_file, split)  # the same command resumes
  step_full, full = restore(full_run, config)
  step_split, resumed = restore(split, config)
  assert step_full == step_split == 4
  assert_bitwise_equal(resumed, full)


def test_sample_mode_from_prompts_with_guidance(config_file, full_run):
  run_main(config_file, full_run, f'--config.sampling.prompt={PROMPT}',
           '--config.sampling.negative_prompt=a blue square', mode='sample')
  npz = glob.glob(os.path.join(full_run, 'samples', '*_w3_a-red-circle_neg-a-blue-square_*.npz'))
  assert len(npz) == 1, os.listdir(os.path.join(full_run, 'samples'))
  assert os.path.isfile(npz[0].replace('.npz', '.png'))
  with np.load(npz[0]) as out:
    assert out['images'].shape == (8, 8, 8, 3) and out['images'].dtype == np.uint8
    assert len(np.unique(out['images'])) > 8
    assert list(out['prompts']) == [PROMPT] * 8
    assert str(out['negative_prompt']) == 'a blue square'
