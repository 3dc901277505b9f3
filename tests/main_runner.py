"""main.py run in this process, as the command line would run it (the tests' shared compiles
stay warm, unlike a subprocess)."""

import sys

import main


def run_main(config, workdir, *overrides, mode='train'):
  """`python main.py --config=CONFIG --workdir=WORKDIR --mode=MODE OVERRIDES...`, in-process."""
  argv = ['main.py', f'--config={config}', f'--workdir={workdir}', f'--mode={mode}', *overrides]
  saved = sys.argv
  sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
  try:
    main.parse_flags(argv)
    main.main(argv[:1])
  finally:
    sys.argv = saved
    # ml_collections defines one flag per --config.* override; drop them for the next parse.
    for name in [n for n in main.FLAGS if n.startswith('config.')]:
      delattr(main.FLAGS, name)
