"""Input pipeline: image datasets as sharded, resumable iterators of numpy batches.

config.data.dataset names the source ('digits', 'tfds:NAME', 'folder:/path'; see
data/sources.py), config.data.* the preprocessing (data/preprocess.py), and
`get_dataset` (data/pipeline.py) returns one process's iterator:

  ds = data.get_dataset(config)          # per-process batch = training.batch_size / processes
  batch = next(ds)                       # {'image': f32 [b,H,W,C] in [-1,1], 'label': i32 [b]}
  state = ds.get_state()                 # JSON-serializable; ds.set_state(state) resumes exactly

This package imports neither models/ nor diffusion/ nor the libs.
"""

from data.pipeline import DataIterator
from data.pipeline import get_dataset
from data.sources import num_examples
from data.sources import prepare
