"""Classifier FID against training wall clock, one curve per LDM workdir: the figure of
docs/results.md, "The diffusion recipe" (the old recipe against the new one).

    python scripts/fid_vs_time.py --runs=old:runs/curve/old,new:runs/curve/new \\
        --num=600 --out=docs/fid_vs_time.png

Every kept checkpoint of each W/ldm is sampled (DPM-Solver++(2M), 20 steps, EMA parameters)
and scored on the committed classifier's features against the 10,000 test images; its x is
the training seconds metrics.jsonl logged at that step. Writes --out (the plot); each point
is printed on stderr.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import matplotlib
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ldm_jax import checkpoints, cli, features, sample, score  # noqa: E402

FLAGS = flags.FLAGS
# A string, not a list: a label may hold commas (main splits it on the paths).
flags.DEFINE_string("runs", None, "LABEL:PATH,LABEL:PATH,...: one curve per LDM workdir; "
                    "a label may hold commas, a path may not.")
flags.DEFINE_integer("num", 600, "Samples per checkpoint.")
flags.DEFINE_string("out", "fid_vs_time.png", "The plot to write.")
flags.mark_flag_as_required("runs")


def curve(workdir: str, num: int, ref: score.Reference) -> list[dict]:
    stage_dir = os.path.join(workdir, "ldm")
    times = {}
    for line in open(os.path.join(stage_dir, "metrics.jsonl")):
        row = json.loads(line)
        times[row["step"]] = row["time"]
    points = []
    for step in checkpoints.step_dirs(stage_dir):
        gen = sample.load_generator(workdir, "ldm", step)
        images = sample.generate(gen, num, jax.random.key(1), "dpmpp2m", 20, progress=False)
        fid = ref.score(images)["fid"]
        points.append(dict(step=step, train_s=times[step], fid=fid))
        print(f"{workdir} step {step}: {times[step]:.0f} s, FID {fid:.1f}", file=sys.stderr)
    return points


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    runs = re.findall(r"(.+?):([^,:]+)(?:,|$)", FLAGS.runs)
    if not runs:
        raise app.UsageError(f"--runs: no LABEL:PATH in {FLAGS.runs!r}")
    num, out = FLAGS.num, FLAGS.out
    cli.setup_jax()
    ref = score.Reference(features.DEFAULT_PATH, num)
    result = {label: curve(w, num, ref) for label, w in runs}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in result.items():
        ax.plot([p["train_s"] / 60 for p in points], [p["fid"] for p in points], "o-", label=label)
    ax.set_xlabel("LDM training wall clock (minutes, 2-core CPU)")
    ax.set_ylabel(f"classifier FID ({num} samples)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    app.run(main)
