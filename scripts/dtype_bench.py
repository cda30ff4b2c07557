"""The compiled train step in float32 and in bfloat16 (`model.dtype`), timed in turns in one
process: what `--config.model.dtype=bfloat16` buys on an accelerator. docs/results.md,
"Accelerators", lists this as not yet measured; this is the command that would measure it.

    python scripts/dtype_bench.py --workdir=W --preset=full --stages=ldm,pixel

The LDM's rows need a trained first stage in W/vae (any step count: only the latents'
shape matters for timing). Prints one JSON line per stage: median seconds per step.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

from ldm_jax import benchmark, cli, configs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (W/vae: a trained first stage for the LDM).")
flags.DEFINE_enum("preset", "full", list(configs.PRESETS), "The preset whose step is timed.")
flags.DEFINE_list("stages", ["ldm", "pixel"], "Stages to time: ldm, pixel.")
flags.mark_flag_as_required("workdir")
flags.register_validator("stages", lambda v: bool(v) and set(v) <= set(configs.DIFFUSION_STAGES),
                         message="--stages takes ldm and/or pixel")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_jax()
    for stage in FLAGS.stages:
        timers = {}
        for dtype in ("float32", "bfloat16"):
            c = configs.get_config(stage, FLAGS.preset)
            c.model.dtype = dtype
            timers[dtype] = benchmark.StepTimer(c, FLAGS.workdir)
        med = dict(zip(timers, benchmark.median_step_s_in_turns(list(timers.values()),
                                                                per_round=10)))
        print(json.dumps(dict(stage=stage, preset=FLAGS.preset, s_per_step=med,
                              bf16_speedup=med["float32"] / med["bfloat16"],
                              device=jax.devices()[0].device_kind)), flush=True)


if __name__ == "__main__":
    app.run(main)
