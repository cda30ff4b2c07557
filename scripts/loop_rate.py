"""The training loop's speed against its own compiled step: docs/results.md, "Cost" (the
loop runs at 110 % and 98.2 % of its compiled step). For each diffusion stage, train --steps
steps of its preset with the real loop, then time the same config's compiled step alone.

    python scripts/loop_rate.py --root=runs/looprate --vae=runs/recipe/base/vae --steps=60

Both run in one process; the compiled step is benchmark.StepTimer. The loop's rate is over
the logged intervals after the first (which holds compilation); a checkpoint is written only
at the end. --root must not hold earlier runs of this script.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
from absl import app, flags

from ldm_jax import benchmark, cli, configs, train

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "runs/looprate", "A new directory: one workdir per stage below it.")
flags.DEFINE_integer("steps", 60, "Training steps of each stage.")
flags.DEFINE_enum("preset", "cpu-quick", list(configs.PRESETS), "The preset trained and timed.")
flags.DEFINE_integer("log_every", 10, "train.log_every: the loop's rate is over these intervals.")
flags.DEFINE_list("stages", ["ldm", "pixel"], "Stages to train and time: ldm, pixel.")
flags.DEFINE_string("vae", "runs/recipe/base/vae", "A trained VAE, copied under the LDM's workdir.")
flags.register_validator("stages", lambda v: bool(v) and set(v) <= set(configs.DIFFUSION_STAGES),
                         message="--stages takes ldm and/or pixel")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_jax()
    if os.path.exists(FLAGS.root):
        sys.exit(f"{FLAGS.root} exists; pass a new --root")
    out = {}
    for stage in FLAGS.stages:
        w = os.path.join(FLAGS.root, stage)
        if stage == "ldm":
            shutil.copytree(FLAGS.vae, os.path.join(w, "vae"))
        c = configs.get_config(stage, FLAGS.preset)
        configs.apply_overrides(c, {"train.steps": FLAGS.steps, "train.log_every": FLAGS.log_every,
                                    "train.ckpt_every": 10 * FLAGS.steps})
        train.train_and_evaluate(c, w)
        rows = [json.loads(line) for line in open(os.path.join(w, stage, "metrics.jsonl"))]
        loop_s = (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])
        step_s = float(np.median(benchmark.StepTimer(c, w).time(max(10, FLAGS.steps // 3))))
        out[stage] = dict(loop_steps_per_s=1 / loop_s, compiled_steps_per_s=1 / step_s,
                          ratio=step_s / loop_s)
        print(stage, json.dumps(out[stage]), file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
