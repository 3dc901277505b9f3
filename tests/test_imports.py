"""The project's module graph, read from the code's imports (function-level ones included): no
module imports one above it in the layering, and there is no import cycle.

Layers, top to bottom (a module may import its own layer or any lower one):
  0  main
  1  train_lib
  2  eval_lib
  3  sample_lib
  4  the shared modules: experiment, conditioning, checkpoints, sharding, image_io, progress,
     latent_space, captions,
     config_lib, configs/
  5  diffusion/, models/, data/, evaluation/
and within the bottom layer diffusion/ imports none of models/, data/, evaluation/, and models/
never imports diffusion/. bench/ and tests/ use the project and are not part of the graph.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {'tests', 'bench', '.venv', '.git', '.ci', 'runs'}
LAYERS = {'main': 0, 'train_lib': 1, 'eval_lib': 2, 'autoencoder_lib': 2, 'sample_lib': 3}
SHARED = ('experiment', 'conditioning', 'checkpoints', 'sharding', 'image_io', 'progress',
          'latent_space', 'latent_cache', 'captions',
          'config_lib', 'configs')
BOTTOM = ('diffusion', 'models', 'data', 'evaluation')
FORBIDDEN = {'diffusion': ('models', 'data', 'evaluation'), 'models': ('diffusion',)}


def project_modules():
  """{dotted module name: path} of every project .py file outside tests/ and bench/."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(ROOT):
    rel = os.path.relpath(dirpath, ROOT)
    dirnames[:] = [d for d in dirnames if d not in SKIP and not d.startswith('.')]
    for name in filenames:
      if not name.endswith('.py'):
        continue
      parts = [] if rel == '.' else rel.split(os.sep)
      stem = name[:-3]
      if stem != '__init__':
        parts = parts + [stem]
      if parts:
        out['.'.join(parts)] = os.path.join(dirpath, name)
  return out


def imports_of(path, modules):
  """The project modules `path` imports (anywhere in the file)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()

  def add(name):
    while name and name not in modules:  # 'a.b.c' -> the longest project module prefix
      name = name.rpartition('.')[0]
    if name:
      found.add(name)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        add(full if full in modules else node.module)
  return found


def layer(module):
  top = module.split('.')[0]
  if top in LAYERS:
    return LAYERS[top]
  if top in SHARED:
    return 4
  if top in BOTTOM:
    return 5
  raise AssertionError(f'{module} belongs to no layer; add it to tests/test_imports.py')


def graph():
  modules = project_modules()
  return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def find_cycle(edges):
  """One import cycle as a list of modules (first == last), or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(edges.get(m, ())):
      if state.get(n) == 'open':
        return stack[stack.index(n):] + [n]
      if n not in state:
        cycle = visit(n)
        if cycle:
          return cycle
    stack.pop()
    state[m] = 'done'
    return None

  for m in sorted(edges):
    if m not in state:
      cycle = visit(m)
      if cycle:
        return cycle
  return None


def test_no_module_imports_one_above_it():
  edges = graph()
  assert {'main', 'train_lib', 'eval_lib', 'sample_lib', 'conditioning'} <= set(edges)
  bad = []
  for m, targets in edges.items():
    for n in targets:
      top_m, top_n = m.split('.')[0], n.split('.')[0]
      if layer(n) < layer(m) or top_n in FORBIDDEN.get(top_m, ()):
        bad.append(f'{m} -> {n}')
  assert not bad, 'imports that climb the layering: ' + ', '.join(sorted(bad))


def test_no_import_cycle():
  cycle = find_cycle(graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_checks_can_fail():
  # The two checks above on graphs with the faults they look for.
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None
  assert layer('sample_lib') < layer('experiment') < layer('diffusion.samplers')
  modules = project_modules()
  assert imports_of(os.path.join(ROOT, 'eval_lib.py'), modules) >= {'sample_lib', 'experiment'}
