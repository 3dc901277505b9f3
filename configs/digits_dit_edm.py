"""EDM's formulation on the small digits DiT: configs/digits_dit.py with what configs/digits_edm.py
changes for the U-Net (diffusion.formulation = 'edm', the linear schedule for the VP bridge, EDM's
sampler at N = 18, 35 evaluations). Everything else (backbone, optimizer, EMA, steps, label
dropout) is digits_dit's.

  python main.py --config configs/digits_dit_edm.py --workdir runs/digits_dit_edm

Measured against the other three digits models in bench/RESULTS.md ("FID against model
evaluations, both formulations and both backbones"; bench/formulation_table.py).
"""

from configs import digits_dit
from configs import digits_edm


def get_config():
  return digits_edm.to_edm(digits_dit.get_config())
