#!/usr/bin/env python
"""Consolidate a lance_ds training checkpoint into an inference directory (see lance_ds/export.py).

  python tools/export_checkpoint.py --checkpoint runs/debug --out exports/debug [--ema] [--dtype bf16] [--overwrite]
  python tools/export_checkpoint.py runs/debug/checkpoints/step_00000040 --out exports/step40

The checkpoint is a run dir or its checkpoints dir (both mean `latest`) or a step dir. Runs on CPU, no launcher.
Exit status: 0 written, 2 refused (the message says why).
"""

import sys

from lance_ds.export import main

if __name__ == "__main__":
    sys.exit(main())
