"""Distribution matching (DMD2, Yin et al. 2024) on top of a consistency student: a probe of
whether matching the guided teacher's distribution, not its ODE, lifts the 4-step student's
recognisable share (docs/results.md, "Where the student loses").

    python scripts/dmd_probe.py --workdir=runs/demo --last_only --lr_g=1e-5 --fake_warmup=200 \
        --fake_updates=5 --iters=300 --out=runs/dmd/s   # then inception_probe.py --npz=runs/dmd/s_300_seed7.npz

The generator starts as the workdir's `distill` student and samples in --steps consistency
steps at the student's own times; each iteration draws its input by the student's own chain
(DMD2's backward simulation) and moves its x_0 along x0_real - x0_fake at a random noise
level, x0_real from the teacher autoguided at --w, x0_fake from a fake-score U-Net that
starts as the teacher and is trained (--fake_updates per iteration, DMD2's two-timescale
rule) on the generator's own samples with the teacher's diffusion loss. No data, no GAN.
--last_only feeds both only the last step's input, whose output is the sample: matching every
step's outputs trains the fake on the poor early steps too and degraded the student
(docs/notes.md, "Trimmed from results.md on 2026-12-07").
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from ldm_jax import checkpoints, cli, consistency, diffusion, models, sample, stages

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir with ldm/ (its guide kept) and distill/.")
flags.DEFINE_integer("iters", 400, "Generator updates.")
flags.DEFINE_integer("fake_updates", 4, "Fake-score updates per generator update.")
flags.DEFINE_integer("fake_warmup", 0, "Fake-score updates before the first generator update.")
flags.DEFINE_float("lr_g", 1e-4, "Generator learning rate (Adam).")
flags.DEFINE_float("lr_fake", 4e-4, "Fake-score learning rate (Adam).")
flags.DEFINE_float("w", 1.5, "Autoguidance weight of the real score (the teacher's).")
flags.DEFINE_integer("steps", 4, "The generator's sampling steps.")
flags.DEFINE_integer("batch", 64, "Batch of generator samples.")
flags.DEFINE_float("t_min", 0.02, "Lowest DMD noise level, as a fraction of T.")
flags.DEFINE_float("t_max", 0.98, "Highest DMD noise level, as a fraction of T.")
flags.DEFINE_bool("last_only", False, "Match only the last step's outputs (the samples), "
                  "not every step's (DMD2's backward simulation over all steps).")
flags.DEFINE_integer("save_every", 200, "Sample --num images every this many iterations.")
flags.DEFINE_list("seeds", ["1", "7"], "Sampling seeds of the saved samples.")
flags.DEFINE_integer("num", 2000, "Samples per save.")
flags.DEFINE_integer("seed", 0, "Training seed.")
flags.DEFINE_string("out", None, "Prefix of the saved samples: OUT_<iter>_seed<S>.npz.")


@dataclasses.dataclass(frozen=True)
class Parts:
    """What the two losses need: the U-Net, schedule, teacher config and sampling times."""
    unet: object
    sched: diffusion.Schedule
    tc: object
    times: np.ndarray
    shape: tuple


def student_f(parts: Parts, params):
    """The consistency function f(z, t) of generator parameters."""
    return consistency.consistency_fn(
        stages.student_x0_fn(parts.unet, parts.tc, parts.sched, params))


def simulate(parts: Parts, params, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(z [B, ...], t [B]): each example's input at a random one of the generator's steps,
    reached by its own chain from noise (backward simulation), without gradients."""
    f, times, b = student_f(parts, jax.lax.stop_gradient(params)), parts.times, parts.shape[0]
    z = jax.random.normal(jax.random.fold_in(key, 0), parts.shape)
    zs = [z]
    for i in range(len(times) - 1):
        x = f(z, jnp.full((b,), times[i], jnp.int32))
        noise = jax.random.normal(jax.random.fold_in(key, i + 1), parts.shape)
        z = diffusion.q_sample(parts.sched, x, jnp.full((b,), times[i + 1], jnp.int32), noise)
        zs.append(z)
    k = jax.random.randint(jax.random.fold_in(key, 99), (b,), 0, len(times))
    k = jnp.full((b,), len(times) - 1) if FLAGS.last_only else k
    return jnp.stack(zs)[k, jnp.arange(b)], jnp.asarray(times)[k]


def x0_of(parts: Parts, params, x_t, t):
    out = models.unet_fn(parts.unet, parts.tc.model, params)(x_t, t)
    return diffusion.predict_xstart(parts.sched, out, x_t, t, parts.tc.diffusion.prediction)


def generator_loss(params, fake_params, real_eps, parts: Parts, key):
    """DMD: 0.5 ||x - sg(x - g)||^2 with g = (x0_fake - x0_real) / mean|x - x0_real| at
    x_t ~ q(x_t | x), t ~ U[t_min T, t_max T] (Yin et al. 2024, Eq. 7-8)."""
    z, t_in = simulate(parts, params, jax.random.fold_in(key, 0))
    x = student_f(parts, params)(z, t_in)
    b, T = parts.shape[0], parts.sched.num_timesteps
    t = jax.random.randint(jax.random.fold_in(key, 1), (b,), int(FLAGS.t_min * T),
                           int(FLAGS.t_max * T))
    x_t = diffusion.q_sample(parts.sched, jax.lax.stop_gradient(x), t,
                             jax.random.normal(jax.random.fold_in(key, 2), parts.shape))
    x0_real = diffusion.predict_xstart_from_eps(parts.sched, x_t, t, real_eps(x_t, t))
    x0_fake = x0_of(parts, fake_params, x_t, t)
    axes = tuple(range(1, x.ndim))
    norm = jnp.mean(jnp.abs(jax.lax.stop_gradient(x) - x0_real), axis=axes, keepdims=True)
    g = jax.lax.stop_gradient((x0_fake - x0_real) / (norm + 1e-6))
    return 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - g)))


def fake_loss(fake_params, g_params, parts: Parts, key):
    """The teacher's diffusion loss on the generator's samples (no gradient to them)."""
    z, t_in = simulate(parts, g_params, jax.random.fold_in(key, 0))
    x = jax.lax.stop_gradient(student_f(parts, g_params)(z, t_in))
    d = parts.tc.diffusion
    net = models.unet_fn(parts.unet, parts.tc.model, fake_params)
    return jnp.mean(diffusion.training_losses(
        net, parts.sched, x, jax.random.fold_in(key, 1), prediction=d.prediction,
        weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma))


def updates(parts: Parts, real_eps):
    """(generator update, fake update), each (params, opt_state, other params, key) jitted."""
    opt_g = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(FLAGS.lr_g))
    opt_f = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(FLAGS.lr_fake))

    @jax.jit
    def g_update(params, state, fake_params, key):
        loss, grads = jax.value_and_grad(generator_loss)(
            params, fake_params, real_eps, parts, key)
        upd, state = opt_g.update(grads, state, params)
        return optax.apply_updates(params, upd), state, loss

    @jax.jit
    def f_update(fake_params, state, g_params, key):
        loss, grads = jax.value_and_grad(fake_loss)(fake_params, g_params, parts, key)
        upd, state = opt_f.update(grads, state, fake_params)
        return optax.apply_updates(fake_params, upd), state, loss
    return (g_update, opt_g), (f_update, opt_f)


def save(student, params, it: int) -> None:
    gen = dataclasses.replace(student, params=params)
    for s in FLAGS.seeds:
        images = sample.generate(gen, FLAGS.num, jax.random.key(int(s)), "consistency",
                                 FLAGS.steps, progress=False)
        path = f"{FLAGS.out}_{it}_seed{s}.npz"
        np.savez_compressed(path, images=images)
        print(f"saved {path}", flush=True)


def main(argv):
    del argv
    cli.setup_jax()
    teacher = sample.load_generator(FLAGS.workdir, "ldm")
    student = sample.load_student(FLAGS.workdir, "distill", teacher=teacher)
    tc = checkpoints.config_from_stored(teacher.config)
    grid = consistency.student_grid(teacher.sched.num_timesteps,
                                    student.config["distill"]["intervals"])
    times = consistency.sampling_times(grid, FLAGS.steps, student.config["sample"]["time_power"])
    parts = Parts(teacher.unet, teacher.sched, tc, times, (FLAGS.batch, *teacher.shape))
    real_eps = stages.teacher_eps_fn(teacher.unet, tc, teacher.sched,
                                     {"unet": teacher.params, "guide": teacher.guide_params},
                                     autoguidance=FLAGS.w, min_t=0)
    (g_update, opt_g), (f_update, opt_f) = updates(parts, real_eps)
    g, f = student.params, teacher.params
    g_state, f_state = opt_g.init(g), opt_f.init(f)
    key, t0 = jax.random.key(FLAGS.seed), time.time()
    save(student, g, 0)
    for j in range(FLAGS.fake_warmup):  # the fake score first learns the student's samples
        f, f_state, f_loss = f_update(f, f_state, g, jax.random.fold_in(key, 10**9 + j))
    for it in range(1, FLAGS.iters + 1):
        for j in range(FLAGS.fake_updates):
            f, f_state, f_loss = f_update(f, f_state, g, jax.random.fold_in(key, 2 * it * 64 + j))
        g, g_state, g_loss = g_update(g, g_state, f, jax.random.fold_in(key, 2 * it * 64 + 63))
        if it % 50 == 0:
            print(f"iter {it}: generator {float(g_loss):.4f}, fake {float(f_loss):.4f}, "
                  f"{time.time() - t0:.0f} s", flush=True)
        if it % FLAGS.save_every == 0:
            save(student, g, it)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
