"""Why does a longer distillation score worse? Two probes of an LDM student's checkpoints:
docs/results.md, "Few-step sampling".

    python -m ldm_jax.train --stage=distill --preset=cpu-quick --workdir=W \
        --config.train.steps=1500 --config.train.ckpt_every=500 --config.train.keep_checkpoints=3
    python scripts/distill_drift.py --workdir=W --student_steps=500,1000,1500 --mix=500,1500

1. For each checkpoint (and the teacher as a student of 0 steps): the mean squared distance
   of f(z_t, t) to the end of the very ODE it is distilled on (the teacher's guided DDIM
   steps along the student grid, from the same noise), at several t, and the std of f.
2. --mix=A,B: the --steps-step chain with each step taken by checkpoint A or B (all A, all B,
   B on the first or last step only, B on the first or last half), --num samples, seed 1,
   scored by the committed classifier against the validation images.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ldm_jax import checkpoints, cli, consistency, data, nets, sample, score, stages

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "A workdir with an ldm teacher and its distill student.")
flags.DEFINE_list("student_steps", [], "Student checkpoints of probe 1.")
flags.DEFINE_list("mix", [], "Two student checkpoints A,B for probe 2 (empty: skip it).")
flags.DEFINE_integer("steps", 8, "Sampling steps of probe 2.")
flags.DEFINE_integer("num", 2000, "Samples per chain of probe 2 (probe 1: 512 trajectories).")
flags.DEFINE_integer("holdout", 2000, "The validation images: the last HOLDOUT training images.")
PROBE_T = (20, 100, 200, 400, 600, 800, 999)


def student_x0(teacher: sample.Generator, params) -> consistency.X0Fn:
    tc = checkpoints.config_from_stored(teacher.config)
    return jax.jit(stages.student_x0_fn(teacher.unet, tc, teacher.sched, params))


def ode_trajectory(teacher: sample.Generator, grid: np.ndarray, w: float, min_t: int = 0,
                   n: int = 512) -> dict[int, jax.Array]:
    """{t: z_t} along the grid from noise at T - 1, by the teacher steps distillation takes."""
    tc = checkpoints.config_from_stored(teacher.config)
    weights = {"unet": teacher.params, **({"guide": teacher.guide_params} if w > 0 else {})}
    eps_fn = stages.teacher_eps_fn(teacher.unet, tc, teacher.sched, weights, None, 0.0, w,
                                   min_t)
    step = jax.jit(lambda z, t, s: consistency.teacher_step(eps_fn, teacher.sched, z, t, s))
    z = jax.random.normal(jax.random.key(3), (n, *teacher.shape))
    traj = {int(grid[-1]): z}
    for hi, lo in zip(grid[:0:-1], grid[-2::-1]):
        z = step(z, jnp.full((n,), hi), jnp.full((n,), lo))
        traj[int(lo)] = z
    return traj


def ode_errors(f, traj: dict[int, jax.Array]) -> dict:
    """{t: [MSE of f(z_t, t) to the ODE's end, std of f(z_t, t)]} at the grid points nearest
    PROBE_T."""
    grid, end = np.array(sorted(traj)), traj[0]
    rows = {}
    for p in PROBE_T:
        t = int(grid[np.argmin(abs(grid - p))])
        out = f(traj[t], jnp.full((end.shape[0],), t))
        rows[t] = [round(float(jnp.mean(jnp.square(out - end))), 5), round(float(out.std()), 3)]
    return rows


def mixed_chain(teacher: sample.Generator, x0_fns: list, times: np.ndarray, n: int) -> np.ndarray:
    """uint8 samples of consistency.sample whose step i is taken by x0_fns[i]."""
    calls = iter(x0_fns)  # consistency.sample calls its student once per step, in order
    x = consistency.sample(lambda z, t: next(calls)(z, t), teacher.sched, jax.random.key(1),
                           (n, *teacher.shape), times)
    return data.to_uint8(np.asarray(teacher.vae.apply(
        teacher.vae_vars, x / teacher.scale_factor, method=nets.VAE.decode)))


def mix_plans(steps: int) -> dict[str, list[int]]:
    """Which checkpoint (0: A, 1: B) takes each chain step."""
    half = steps // 2
    return {"all A": [0] * steps, "all B": [1] * steps, "B first": [1] + [0] * (steps - 1),
            "B last": [0] * (steps - 1) + [1], "B first half": [1] * half + [0] * (steps - half),
            "B second half": [0] * half + [1] * (steps - half)}


def main(argv):
    del argv
    cli.setup_jax()
    if FLAGS.mix:  # probe 2 scores against val
        score.require_val_unseen(FLAGS.workdir, ["ldm", "distill"], FLAGS.holdout, "distill_drift")
    teacher = sample.load_generator(FLAGS.workdir, "ldm")
    meta = checkpoints.stored_meta(f"{FLAGS.workdir}/distill")  # the newest student's
    w = meta["autoguidance"]
    grid = consistency.student_grid(teacher.sched.num_timesteps, meta["intervals"])
    traj = ode_trajectory(teacher, grid, w, meta.get("guide_min_t", 0))  # the student's ODE
    students = {s: sample.load_student(FLAGS.workdir, "distill", int(s), teacher)
                for s in {*FLAGS.student_steps, *FLAGS.mix}}
    for s in ["0", *FLAGS.student_steps]:
        params = teacher.params if s == "0" else students[s].params
        f = consistency.consistency_fn(student_x0(teacher, params))
        print(json.dumps(dict(probe="ode", student_step=int(s), autoguidance=w,
                              **{f"t{t}": v for t, v in ode_errors(f, traj).items()})), flush=True)
    if not FLAGS.mix:
        return
    fs = [student_x0(teacher, students[s].params) for s in FLAGS.mix]
    power = students[FLAGS.mix[0]].config["sample"]["time_power"]
    times = consistency.sampling_times(grid, FLAGS.steps, power)
    scorer = score.SplitScorer(["val"], FLAGS.holdout, 0, False)
    for name, plan in mix_plans(FLAGS.steps).items():
        images = mixed_chain(teacher, [fs[i] for i in plan], times, FLAGS.num)
        print(json.dumps(dict(probe="mix", plan=name, a=FLAGS.mix[0], b=FLAGS.mix[1],
                              steps=FLAGS.steps, times=times.tolist(), **scorer(images))),
              flush=True)


if __name__ == "__main__":
    app.run(main)
