"""The training loop's speed against its own compiled step (issue 11's first bar): for each
diffusion stage, train STEPS steps of its preset with the real loop, then time the same
config's compiled step alone (benchmark.StepTimer), in one process, and print both.

    python scripts/loop_rate.py --root=runs/looprate --vae=runs/recipe/base/vae --steps=60

The loop's rate is over the logged intervals after the first (which holds compilation);
a checkpoint is written only at the end. ROOT must not hold earlier runs of this script.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

from ldm_jax import benchmark, cli, configs, train


def main() -> None:
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    root, steps = args.get("root", "runs/looprate"), int(args.get("steps", 60))
    preset, log_every = args.get("preset", "cpu-quick"), int(args.get("log_every", 10))
    stages = args.get("stages", "ldm,pixel").split(",")
    cli.setup_jax()
    if os.path.exists(root):
        sys.exit(f"{root} exists; pass a new --root")
    out = {}
    for stage in stages:
        w = os.path.join(root, stage)
        if stage == "ldm":
            shutil.copytree(args.get("vae", "runs/recipe/base/vae"), os.path.join(w, "vae"))
        c = configs.get_config(stage, preset)
        configs.apply_overrides(c, {"train.steps": steps, "train.log_every": log_every,
                                    "train.ckpt_every": 10 * steps})
        train.train_and_evaluate(c, w)
        rows = [json.loads(line) for line in open(os.path.join(w, stage, "metrics.jsonl"))]
        loop_s = (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])
        step_s = float(np.median(benchmark.StepTimer(c, w).time(max(10, steps // 3))))
        out[stage] = dict(loop_steps_per_s=1 / loop_s, compiled_steps_per_s=1 / step_s,
                          ratio=step_s / loop_s)
        print(stage, json.dumps(out[stage]), file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
