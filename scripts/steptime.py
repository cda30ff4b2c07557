"""Median seconds of the cpu-quick train step of one stage (fresh parameters), printed as
JSON: run under different XLA_FLAGS by farm-bench to compare flags in paired turns.

    python scripts/steptime.py ldm runs/recipe/base 30   # STAGE WORKDIR STEPS (the LDM needs WORKDIR/vae)
"""
import json
import os
import sys

import numpy as np

from ldm_jax import benchmark, cli, configs

stage, workdir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cli.setup_jax()
c = configs.get_config(stage, "cpu-quick")
timer = benchmark.StepTimer(c, workdir)
t = timer.time(n)
print(json.dumps(dict(stage=stage, flags=os.environ.get("XLA_FLAGS", ""), median_s=float(np.median(t)),
                      compile_s=timer.compile_s, devices=timer.devices, n=n)), flush=True)
