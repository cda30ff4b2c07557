"""The compiled train step in float32 and in bfloat16 (`model.dtype`), timed in turns in
one process: what `--config.model.dtype=bfloat16` buys on an accelerator.

    python scripts/dtype_bench.py --workdir=W --preset=full --stages=ldm,pixel

The LDM's rows need a trained first stage in W/vae (any step count: only the latents'
shape matters for timing). Prints one JSON line per stage: median seconds per step.
"""

from __future__ import annotations

import json
import sys

import jax

from ldm_jax import benchmark, cli, configs


def main() -> None:
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    preset = args.get("preset", "full")
    cli.setup_jax()
    for stage in args.get("stages", "ldm,pixel").split(","):
        timers = {}
        for dtype in ("float32", "bfloat16"):
            c = configs.get_config(stage, preset)
            c.model.dtype = dtype
            timers[dtype] = benchmark.StepTimer(c, args["workdir"])
        med = dict(zip(timers, benchmark.median_step_s_in_turns(list(timers.values()),
                                                                per_round=10)))
        print(json.dumps(dict(stage=stage, preset=preset, s_per_step=med,
                              bf16_speedup=med["float32"] / med["bfloat16"],
                              device=jax.devices()[0].device_kind)), flush=True)


if __name__ == "__main__":
    main()
