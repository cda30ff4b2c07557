"""Score distilled students at 1, 2, 4 and 8 steps beside their teacher's default sampler, on
the validation split and the test set: docs/results.md, "Few-step sampling".

    python scripts/score_students.py --workdirs=A,B --student=distill --out=F.jsonl

Each workdir holds a teacher and a student of it (e.g. one per distillation setting). Every row
draws --num samples (--seed, 7) and scores them by score.SplitScorer: Inception FID and
precision/recall (k = 3) against the validation images (the last --holdout training images,
which cpu-quick never trains on) and the 10,000 test images, the committed classifier's FID
against each of them, its recognisable share, and pixel statistics; it also records images/s
after compilation and U-Net calls per image. Choose the setting on `fid_val`; report `fid_test`.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
from absl import app, flags, logging

from ldm_jax import checkpoints, cli, configs, fewstep, score

FLAGS = flags.FLAGS
LCM = checkpoints.LEGACY_VALUES["sample.time_power"]  # the times of a student stored before it
flags.DEFINE_list("workdirs", [], "Workdirs, each with a teacher and a student of it.")
flags.DEFINE_string("student", "distill", "The student stage: distill | distill_pixel.")
flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Student step counts to score.")
flags.DEFINE_list("student_steps", [], "Student checkpoints to score (default: the newest).")
flags.DEFINE_list("time_powers", [], "Score the students at each of these sample.time_power "
                  "values (default: each student's own).")
flags.DEFINE_list("gammas", [], "Score the students at each of these sample.gamma values "
                  "(default: each student's own).")
flags.DEFINE_list("weights", [], "Score a student that takes its autoguidance weight at each "
                  "of these weights (default: its sample.weight).")
flags.DEFINE_bool("teacher", True, "Score the teacher's default sampler too (once per workdir).")
flags.DEFINE_integer("num", 2000, "Samples per row.")
flags.DEFINE_integer("seed", 7, "Sampling seed (choose on another seed than the reported 7).")
flags.DEFINE_bool("inception", True, "Inception FID and precision/recall (slow on a CPU: about "
                  "6 images/s); --noinception keeps the classifier's metrics only.")
flags.DEFINE_integer("holdout", 2000, "The validation images: the last HOLDOUT training images.")
flags.DEFINE_integer("max_ref", 0, "Only this many reference images per split (0: all; tests).")
flags.DEFINE_string("save", "", "Save every sample drawn here (compressed .npz, a key per row).")
flags.DEFINE_string("out", "", "Append the JSON lines here too.")


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cli.setup_jax()
    for workdir in FLAGS.workdirs:
        score.require_val_unseen(workdir, [FLAGS.student, configs.STUDENTS[FLAGS.student]],
                                 FLAGS.holdout, "score_students")
    scorer = score.SplitScorer(score.SPLITS, FLAGS.holdout, FLAGS.max_ref, FLAGS.inception)
    saved = {}
    steps = {int(s) for s in FLAGS.steps}
    powers = [float(p) for p in FLAGS.time_powers] or [None]
    gammas = [float(g) for g in FLAGS.gammas] or [None]
    weights = [float(w) for w in FLAGS.weights] or [None]
    for workdir in FLAGS.workdirs:
        name = os.path.basename(os.path.normpath(workdir))
        teacher = fewstep.load_teacher_of(workdir, FLAGS.student)
        rows = [r for step in [int(s) for s in FLAGS.student_steps] or [None]
                for r in fewstep.settings(workdir, FLAGS.student, teacher, step)]
        for i, (row, gen, sampler, k, eta, w) in enumerate(rows):
            student = row != fewstep.TEACHER
            if (not student and (not FLAGS.teacher or i)) or (student and k not in steps):
                continue
            for power, gamma, weight in itertools.product(
                    *([powers, gammas, weights] if student else [[None], [None], [None]])):
                for key, value in (("time_power", power), ("gamma", gamma)):
                    if value is not None:  # the student's sampler reads it from its config
                        gen.config["sample"][key] = value
                aw = w if weight is None else weight
                images, seconds = fewstep.timed_generate(gen, FLAGS.num, FLAGS.seed, sampler,
                                                         k, eta, aw)
                tag = (f"_p{power}" if power is not None else "") + (
                    f"_g{gamma}" if gamma is not None else "") + (
                    f"_w{weight}" if weight is not None else "")
                saved[f"{name}_{gen.step}_{row.replace(' ', '')}{tag}"] = images
                emit(dict(workdir=name, what=row, student_step=gen.step if student else None,
                          time_power=gen.config["sample"].get("time_power", LCM) if student else None,
                          gamma=gen.config["sample"].get("gamma", 1.0) if student else None,
                          autoguidance=aw, n=FLAGS.num, seed=FLAGS.seed, images_per_s=FLAGS.num / seconds,
                          unet_calls=fewstep.unet_calls(gen, sampler, k, aw), **scorer(images)))
    if FLAGS.save:
        np.savez_compressed(FLAGS.save, **saved)


if __name__ == "__main__":
    app.run(main)
