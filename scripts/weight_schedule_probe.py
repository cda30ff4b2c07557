"""Guidance weights that depend on the noise level: a probe of whether spending guidance at
some times only lifts the 4-step student's recognisable share at less cost in FID
(docs/notes.md, "Weights that depend on t").

    # a student that takes its weight (distill.weight_max > 0), sampled at w(t)
    python scripts/weight_schedule_probe.py --workdir=W --scheds=2:2:0,2:4:900,6:2:500 --seeds=1,2,3
    # a fixed-weight student distilled against a target autoguided at w(t), into W/distill
    python scripts/weight_schedule_probe.py --workdir=W --distill=2:3:900

A schedule HI:LO:M is w = HI at t >= M and LO below (4 steps sample at t = 999, 859, 659,
440). Both modes swap one library function for its t-dependent version in this process only:
the student's x_0 function (sampling) or autoguidance (the distillation target). Sampling
rows print the committed classifier's FID against the holdout and the test set and the
recognisable share, as score.SplitScorer measures them without Inception.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
from absl import app, flags

from ldm_jax import cli, diffusion, fewstep, models, sample, score, stages, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir with ldm/ and (to sample) distill/.")
flags.DEFINE_list("scheds", ["2:2:0"], "Sample at each schedule HI:LO:M.")
flags.DEFINE_list("seeds", ["1"], "Sampling seeds (choose on others than the reported 7).")
flags.DEFINE_integer("steps", 4, "Student steps.")
flags.DEFINE_integer("num", 2000, "Samples per row.")
flags.DEFINE_string("distill", "", "HI:LO:M: distil a student against a target at w(t) instead.")
flags.DEFINE_string("out", "", "Append the JSON lines here too.")
flags.mark_flag_as_required("workdir")


def parse(sched: str) -> tuple[float, float, int]:
    hi, lo, m = sched.split(":")
    return float(hi), float(lo), int(m)


def weight_at(t, sched: tuple[float, float, int]):
    hi, lo, m = sched
    return jnp.where(t >= m, hi, lo).astype(jnp.float32)


def scheduled_x0_fn(sched):
    """stages.student_x0_fn for a student that takes its weight, at w(t) instead of w."""
    def x0_fn(unet, tc, sched_, params, labels=None, w=None):
        del labels, w
        apply = models.unet_fn(unet, tc.model, params)
        return lambda z, t: diffusion.predict_xstart(
            sched_, apply(z, t, None, weight_at(t, sched)), z, t, tc.diffusion.prediction)
    return x0_fn


def scheduled_autoguidance(sched):
    """diffusion.autoguided_eps_fn at w(t), whatever weight and interval it is given."""
    def autoguided(eps_fn, guide_eps_fn, w, min_t=0):
        del w, min_t
        def guided(x, t, *args):
            wt = weight_at(t, sched).reshape((-1,) + (1,) * (x.ndim - 1))
            return (1 + wt) * eps_fn(x, t, *args) - wt * guide_eps_fn(x, t, *args)
        return guided
    return autoguided


def main(argv):
    del argv
    if FLAGS.distill:  # cpu-quick's distillation, its target's weight swapped for w(t)
        diffusion.autoguided_eps_fn = scheduled_autoguidance(parse(FLAGS.distill))
        train.main(["train", "--stage=distill", "--preset=cpu-quick", f"--workdir={FLAGS.workdir}"])
        return
    cli.setup_jax()
    gen = sample.load_generator(FLAGS.workdir, "distill")
    if sample.student_weight_range(gen) is None:
        raise app.UsageError("the student does not take its weight (distill.weight_max)")
    scorer = score.SplitScorer(score.SPLITS, 2000, 0, with_inception=False)
    keys = ("classifier_fid_val", "classifier_fid_test", "recognisable")
    for sched in FLAGS.scheds:
        stages.student_x0_fn = scheduled_x0_fn(parse(sched))
        for seed in map(int, FLAGS.seeds):
            images, _ = fewstep.timed_generate(gen, FLAGS.num, seed, "ddim", FLAGS.steps,
                                               autoguidance=parse(sched)[0])
            metrics = scorer(images)
            row = dict(sched=sched, steps=FLAGS.steps, seed=seed, **{k: metrics[k] for k in keys})
            print(json.dumps(row), flush=True)
            if FLAGS.out:
                with open(FLAGS.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
