"""The few-step student (consistency distillation): its math against float64 numpy, its
training, resuming, binding to its teacher, sampling and bad input."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import (checkpoints, configs, consistency, diffusion, evaluate, features, metrics,
                     models, sample, stages, train)
from tests.conftest import run_main

T = 1000


def _sched():
    return diffusion.make_schedule("cosine", T)


def test_the_student_at_the_smallest_time_returns_its_input_exactly():
    z = jax.random.normal(jax.random.key(0), (3, 7, 7, 4))
    f = consistency.consistency_fn(lambda z, t: 5.0 * z + 1.0)
    np.testing.assert_array_equal(np.asarray(f(z, jnp.zeros((3,), jnp.int32))), np.asarray(z))
    c_skip, c_out = consistency.boundary_coefficients(jnp.array([0, 20, 999]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0 and c_skip[1] < 1e-5 and c_out[2] > 0.9999


def _np_consts():
    return diffusion.schedule_constants(diffusion.beta_schedule("cosine", T))


def test_the_distillation_target_equals_a_float64_numpy_teacher_step():
    sched, grid = _sched(), consistency.student_grid(T, 50)
    x0 = np.asarray(jax.random.normal(jax.random.key(1), (4, 7, 7, 4)))
    eps_fn = lambda z, t: 0.3 * z + 1e-3 * t[:, None, None, None]
    student = lambda z, t: 0.9 * z
    target = lambda z, t: 0.5 * z - 0.1
    key = jax.random.key(2)
    pred, want = consistency.distillation_pair(student, target, eps_fn, sched, jnp.asarray(grid),
                                               jnp.asarray(x0), key)
    # The same random draws, then every formula in float64 numpy.
    n_key, z_key = jax.random.split(key)
    n = np.asarray(jax.random.randint(n_key, (4,), 0, len(grid) - 1))
    noise = np.asarray(jax.random.normal(z_key, x0.shape), np.float64)
    ab = _np_consts()["alphas_cumprod"]
    b = lambda v: v[:, None, None, None]
    t_hi, t_lo = grid[n + 1], grid[n]
    z_hi = b(np.sqrt(ab[t_hi])) * x0 + b(np.sqrt(1 - ab[t_hi])) * noise
    eps = 0.3 * z_hi + 1e-3 * b(t_hi.astype(np.float64))
    x0_pred = (z_hi - b(np.sqrt(1 - ab[t_hi])) * eps) / b(np.sqrt(ab[t_hi]))
    z_lo = b(np.sqrt(ab[t_lo])) * x0_pred + b(np.sqrt(1 - ab[t_lo])) * eps
    skip = lambda t: 0.25 / ((10.0 * t) ** 2 + 0.25)
    out = lambda t: 10.0 * t / np.sqrt((10.0 * t) ** 2 + 0.25)
    np_want = b(skip(t_lo)) * z_lo + b(out(t_lo)) * (0.5 * z_lo - 0.1)
    np_pred = b(skip(t_hi)) * z_hi + b(out(t_hi)) * 0.9 * z_hi
    np.testing.assert_allclose(np.asarray(want), np_want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(pred), np_pred, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_multistep_sampling_re_noises_as_a_float64_numpy_chain(gamma):
    sched, times = _sched(), np.array([999, 759, 500])
    x0_fn = lambda z, t: 0.4 * z - 1e-4 * t[:, None, None, None]
    key, shape = jax.random.key(3), (2, 7, 7, 4)
    got = consistency.sample(x0_fn, sched, key, shape, times, gamma)
    ab, b = _np_consts()["alphas_cumprod"], lambda v: np.full((2, 1, 1, 1), v)
    skip = lambda t: 0.25 / ((10.0 * t) ** 2 + 0.25)
    out = lambda t: 10.0 * t / np.sqrt((10.0 * t) ** 2 + 0.25)
    f = lambda z, t: b(skip(t)) * z + b(out(t)) * (0.4 * z - 1e-4 * t)
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, T), shape), np.float64)
    x = f(z, times[0])
    for i in (1, 2):  # gamma = 1: fresh noise (LCM); 0: the student's own noise estimate
        eps_hat = (z - np.sqrt(ab[times[i - 1]]) * x) / np.sqrt(1 - ab[times[i - 1]])
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape), np.float64)
        mix = gamma * noise + np.sqrt(1 - gamma**2) * eps_hat
        z = np.sqrt(ab[times[i]]) * x + np.sqrt(1 - ab[times[i]]) * mix
        x = f(z, times[i])
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


def test_a_low_noise_bias_draws_the_intervals_it_is_given():
    probs = consistency.interval_probs(50, 2.0)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(probs[0] / probs[-1], np.exp(2.0 * 49 / 50), rtol=1e-12)
    np.testing.assert_allclose(consistency.interval_probs(50, 0.0), np.full(50, 0.02))
    sched, grid = _sched(), consistency.student_grid(T, 50)
    only = jnp.zeros(50).at[7].set(1.0)  # every draw must be interval 7: t_hi = grid[8]
    time_of = lambda z, t: jnp.broadcast_to(t[:, None, None, None], z.shape).astype(z.dtype)
    pred, _ = consistency.distillation_pair(time_of, time_of, lambda z, t: z, sched,
                                            jnp.asarray(grid), jnp.zeros((64, 2, 2, 1)),
                                            jax.random.key(0), probs=only)
    np.testing.assert_allclose(np.asarray(pred), grid[8], rtol=1e-4)


def _teacher_and_guide(tc, t):
    """(unet, sched, teacher, z, e, g): a smoke teacher with a guide, a batch z at t, and
    their eps in float64; offset weights, as a fresh U-Net's zero output layer would make
    model and guide agree."""
    unet, sched = models.build_unet(tc.model), models.build_schedule(tc.diffusion)
    z = jax.random.normal(jax.random.key(0), (t.shape[0], 7, 7, 4))
    init = lambda k: jax.tree.map(lambda p: p + 0.01 * k, unet.init(
        jax.random.key(k), z[:1], t[:1], None)["params"])
    teacher = {"unet": init(1), "guide": init(2)}
    eps = lambda p: np.asarray(stages.teacher_eps_fn(unet, tc, sched, {"unet": p})(z, t),
                               np.float64)
    e, g = eps(teacher["unet"]), eps(teacher["guide"])
    assert np.abs(e - g).max() > 1e-3
    return unet, sched, teacher, z, e, g


def test_the_targets_autoguidance_weight_overrides_the_teachers_own_per_example_too():
    tc = configs.get_config("ldm", "smoke")
    tc.sample.guide_weight = 2.0
    t = jnp.array([3, 40])
    unet, sched, teacher, z, e, g = _teacher_and_guide(tc, t)
    w_rows = jnp.array([0.5, 3.0]).reshape(2, 1, 1, 1)  # a student's per-example weights
    for w, want in ((None, 3 * e - 2 * g), (0.0, e), (3.5, 4.5 * e - 3.5 * g),
                    (w_rows, np.stack([1.5 * e[0] - 0.5 * g[0], 4 * e[1] - 3 * g[1]]))):
        got = stages.teacher_eps_fn(unet, tc, sched, teacher, autoguidance=w)(z, t)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_the_targets_guidance_interval_leaves_low_noise_unguided():
    tc = configs.get_config("ldm", "smoke")
    tc.sample.guide_weight, tc.sample.guide_min_t = 2.0, 20
    t = jnp.array([3, 20, 40])
    unet, sched, teacher, z, e, g = _teacher_and_guide(tc, t)
    for min_t, on in ((None, [0, 1, 1]), (0, [1, 1, 1]), (30, [0, 0, 1]), (45, [0, 0, 0])):
        got = stages.teacher_eps_fn(unet, tc, sched, teacher, min_t=min_t)(z, t)
        want = np.where(np.array(on, bool)[:, None, None, None], 3 * e - 2 * g, e)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    # A student that takes its weight guides each example's target at its own w.
    w_rows = jnp.array([0.5, 3.0, 1.0]).reshape(3, 1, 1, 1)
    got = stages.teacher_eps_fn(unet, tc, sched, teacher, autoguidance=w_rows, min_t=30)(z, t)
    np.testing.assert_allclose(np.asarray(got), np.stack([e[0], e[1], 2 * e[2] - g[2]]),
                               rtol=1e-4, atol=1e-5)


def test_a_student_that_takes_its_weight_starts_as_its_teacher_at_every_weight():
    tc = configs.get_config("ldm", "smoke")
    teacher_net, student_net = models.build_unet(tc.model), models.build_unet(tc.model, True)
    z, t = jax.random.normal(jax.random.key(0), (3, 7, 7, 4)), jnp.array([3, 20, 49])
    params = teacher_net.init(jax.random.key(1), z, t, None)["params"]
    params = jax.tree.map(lambda p: p + 0.02, params)  # a teacher whose output is not zero
    added = stages.weight_embedding_params(student_net, jax.random.key(2), z[:1], None)
    assert sorted(added) == ["weight_emb", "weight_emb_out"]
    student = {**params, **added}
    want = np.asarray(teacher_net.apply({"params": params}, z, t))
    assert np.abs(want).max() > 1e-3
    at = lambda p, w: np.asarray(student_net.apply({"params": p}, z, t, None, jnp.full((3,), w)))
    for w in (0.0, 1.5, 4.0):
        np.testing.assert_array_equal(at(student, w), want)
    # Once its output layer has learnt something, w changes the prediction.
    moved = dict(student, weight_emb_out=jax.tree.map(lambda p: p + 0.05, added["weight_emb_out"]))
    assert np.abs(at(moved, 0.0) - at(moved, 4.0)).max() > 1e-4
    with pytest.raises(ValueError, match="w is missing"):
        student_net.apply({"params": student}, z, t)


def test_sampling_times_descend_from_the_last_timestep_on_the_grid():
    grid = consistency.student_grid(T, 50)
    assert grid[0] == 0 and grid[-1] == T - 1 and len(grid) == 51
    for steps in (1, 2, 4, 8, 50):
        times = consistency.sampling_times(grid, steps)
        assert len(times) == steps and times[0] == T - 1 and set(times) <= set(grid)
        assert np.all(np.diff(times) < 0)
    for bad in (0, 51):
        with pytest.raises(ValueError):
            consistency.sampling_times(grid, bad)


@pytest.mark.parametrize("power", [1.0, 0.7, 0.5, 0.1])
def test_sampling_times_follow_the_power_law_on_the_grid(power):
    grid = consistency.student_grid(T, 50)
    assert consistency.sampling_times(grid, 4).tolist() == [999, 759, 500, 260]  # LCM's
    for steps in (1, 2, 4, 8, 50):
        times = consistency.sampling_times(grid, steps, power)
        assert len(times) == steps and times[0] == T - 1 and np.all(np.diff(times) < 0)
        assert np.all(times >= consistency.sampling_times(grid, steps))  # never below LCM's
        # the first grid point at or above (T - 1)(1 - i / steps)^power, where those differ
        law = grid[np.ceil(50 * (1 - np.arange(steps) / steps) ** power - 1e-9).astype(int)]
        if len(set(law)) == steps:
            np.testing.assert_array_equal(times, law)
    with pytest.raises(ValueError):
        consistency.sampling_times(grid, 4, 0.0)


def test_pseudo_huber_is_zero_at_equality_and_grows_like_the_distance():
    a = jnp.ones((2, 4, 4, 1))
    np.testing.assert_allclose(np.asarray(consistency.pseudo_huber(a, a)), 0.0, atol=1e-7)
    far = np.asarray(consistency.pseudo_huber(a, a + 1.0))
    np.testing.assert_allclose(far, 4.0, rtol=1e-3)  # ||1||_2 over 16 entries


@pytest.fixture(scope="module")
def teacher_workdir(smoke_workdir, tmp_path_factory):
    """A copy of the smoke vae, ldm and pixel, for students of their own."""
    workdir = str(tmp_path_factory.mktemp("teachers"))
    for stage in ("vae", "ldm", "pixel"):
        shutil.copytree(os.path.join(smoke_workdir, stage), os.path.join(workdir, stage))
    return workdir


def _student(workdir, stage="distill", **overrides):
    c = configs.get_config(stage, "smoke")
    for k, v in overrides.items():
        section, field = k.split("__")
        c[section][field] = v
    return c


def _final(stage_dir):
    params, model_state, _, meta = checkpoints.load_checkpoint(stage_dir, with_state=True)
    return params, model_state, meta


@pytest.mark.slow
@pytest.mark.parametrize("adversarial_weight", [0.0, 1.0])
def test_a_resumed_distillation_equals_an_uninterrupted_one(teacher_workdir, tmp_path,
                                                           adversarial_weight):
    for name in ("full", "split"):
        shutil.copytree(teacher_workdir, tmp_path / name)
    c = _student(teacher_workdir, distill__adversarial_weight=adversarial_weight)
    train.train_and_evaluate(c, str(tmp_path / "full"))
    train.train_and_evaluate(c, str(tmp_path / "split"), stop_at_step=3)
    train.train_and_evaluate(c, str(tmp_path / "split"))
    a, a_state, meta_a = _final(str(tmp_path / "full" / "distill"))
    b, b_state, meta_b = _final(str(tmp_path / "split" / "distill"))
    assert meta_a["step"] == meta_b["step"] == 6 and meta_b["finished"]
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(a_state["target"], b_state["target"], atol=1e-6, rtol=1e-6)
    teacher = checkpoints.load_checkpoint(str(tmp_path / "full" / "ldm"))[0]
    chex.assert_trees_all_equal(a_state["teacher"]["unet"], teacher)  # never trained
    assert meta_a["teacher_step"] == 6 and meta_a["teacher_stage"] == "ldm"
    assert (models.DISCRIMINATOR in a) == (adversarial_weight > 0)
    gen = sample.load_generator(str(tmp_path / "full"), "distill")  # samples without it
    chex.assert_trees_all_equal(gen.params, models.split_discriminator(a)[0])
    assert bool(jnp.all(jnp.isfinite(sample.generate(gen, 4, jax.random.key(0), steps=2,
                                                     progress=False))))


def _fid(images, real):
    feat = features.feature_fn(features.DEFAULT_PATH)
    return float(metrics.fid_from_features(real, feat(images)))


@pytest.mark.slow
def test_a_distilled_student_beats_the_untrained_one_at_one_step(teacher_workdir, tmp_path):
    shutil.copytree(teacher_workdir, tmp_path / "w")
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(_student(workdir, train__steps=150, optim__lr=1e-3,
                                      train__ckpt_every=150, distill__target_ema=0.0), workdir)
    gen = sample.load_generator(workdir, "distill")
    untrained = sample.load_student(workdir, "distill").__class__(
        **{**gen.__dict__, "params": sample.load_generator(workdir, "ldm").params})
    key = jax.random.key(0)
    trained_x = sample.generate(gen, 256, key, steps=1, progress=False)
    untrained_x = sample.generate(untrained, 256, key, steps=1, progress=False)
    from ldm_jax import data
    real = features.feature_fn(features.DEFAULT_PATH)(data.load("package", "test")[0][:2000])
    assert _fid(trained_x, real) < _fid(untrained_x, real)


@pytest.mark.slow
def test_students_of_a_pixel_and_a_class_conditional_teacher_sample(teacher_workdir, tmp_path):
    shutil.copytree(teacher_workdir, tmp_path / "w")
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(_student(workdir, "distill_pixel"), workdir)
    r = run_main("sample", f"--workdir={workdir}", "--stage=distill_pixel", "--num=4",
                 "--steps=2", f"--out={tmp_path}/p.png")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "p.npz", allow_pickle=False) as z:
        assert z["images"].shape == (4, 28, 28)
    cond = str(tmp_path / "cond")
    shutil.copytree(os.path.join(workdir, "vae"), os.path.join(cond, "vae"))
    c = configs.get_config("ldm", "smoke")
    c.model.conditioning = "class"
    train.train_and_evaluate(c, cond)
    train.train_and_evaluate(_student(cond, distill__guidance=1.0), cond)
    r = run_main("sample", f"--workdir={cond}", "--stage=distill", "--num=10", "--label=all",
                 "--steps=2", f"--out={tmp_path}/c.png")
    assert r.returncode == 0, r.stderr
    # A student that takes its CFG weight: each --guidance in its range samples differently.
    shutil.rmtree(os.path.join(cond, "distill"))
    train.train_and_evaluate(_student(cond, distill__weight_min=0.5, distill__weight_max=3.0),
                             cond)
    _samples_differ_by_weight(cond, tmp_path, "--guidance", ("--label=all",), (0.5, 3.0))


def _samples_differ_by_weight(workdir, tmp_path, flag, extra, weights):
    """Samples at each weight differ; a weight outside the range is one line, exit 2."""
    images = []
    for w in weights:
        r = run_main("sample", f"--workdir={workdir}", "--stage=distill", "--num=10", *extra,
                     "--steps=2", f"{flag}={w}", f"--out={tmp_path}/w{w}.png")
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / f"w{w}.npz", allow_pickle=False) as z:
            images.append(z["images"].astype(np.int32))
    assert np.abs(images[0] - images[1]).max() > 0
    r = run_main("sample", f"--workdir={workdir}", "--stage=distill", "--num=10", *extra,
                 f"{flag}=9", f"--out={tmp_path}/bad.png")
    assert r.returncode == 2 and "is outside [" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / "bad.png")


@pytest.mark.slow
def test_a_student_takes_its_autoguidance_weight(smoke_workdir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(os.path.join(smoke_workdir, "vae"), os.path.join(workdir, "vae"))
    c = configs.get_config("ldm", "smoke")
    c.sample.guide_step, c.sample.guide_weight = 2, 1.0
    c.sample.guide_min_t = 2  # sampled with an interval: its student's target follows it
    train.train_and_evaluate(c, workdir)
    train.train_and_evaluate(_student(workdir, distill__weight_min=0.0,
                                      distill__weight_max=2.0), workdir)
    assert checkpoints.stored_meta(os.path.join(workdir, "distill"))["guide_min_t"] == 2
    gen = sample.load_generator(workdir, "distill")
    assert gen.config["sample"]["weight"] == 1.0  # the teacher's own, by default
    assert sample.student_weight_range(gen) == (0.0, 2.0)
    _samples_differ_by_weight(workdir, tmp_path, "--autoguidance", (), (0.0, 2.0))
    r = run_main("pipeline", f"--workdir={workdir}", "--preset=smoke", "--stages=distill",
                 "--num=8", "--config.distill.distill.weight_max=2.0")
    assert r.returncode == 0, r.stderr
    with np.load(os.path.join(workdir, "distill_samples.npz"), allow_pickle=False) as z:
        assert json.loads(str(z["provenance"]))["autoguidance"] == 1.0


def _nothing_written(workdir, before):
    return sorted(os.listdir(workdir)) == before


@pytest.mark.parametrize("stage, teacher", [("distill", "ldm"), ("distill_pixel", "pixel")])
def test_no_trained_teacher_is_one_line_exit_2_and_writes_nothing(tmp_path, stage, teacher):
    r = run_main("train", f"--stage={stage}", "--preset=smoke", f"--workdir={tmp_path}")
    assert r.returncode == 2 and f"no trained {teacher} model" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == [] and len(r.stderr.strip().splitlines()) == 1


def test_a_target_the_teacher_cannot_give_is_one_line_exit_2(teacher_workdir, tmp_path):
    workdir = str(shutil.copytree(teacher_workdir, tmp_path / "w"))
    before = sorted(os.listdir(workdir))
    for flag, message in (("--config.distill.autoguidance=3",
                           "needs a teacher with an autoguidance guide"),
                          ("--config.distill.weight_max=2", "keeps no autoguidance guide"),
                          ("--config.distill.weight_min=3", "is below distill.weight_min"),
                          ("--config.distill.guide_min_t=50", "must be below the teacher's 50")):
        r = run_main("train", "--stage=distill", "--preset=smoke", f"--workdir={workdir}", flag)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and _nothing_written(workdir, before)


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_writes_nothing(teacher_workdir, tmp_path):
    shutil.copytree(teacher_workdir, tmp_path / "w")
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(_student(workdir), workdir)
    for steps, message in (("0", "must be positive"), ("11", "samples in 1 to 10 steps")):
        r = run_main("sample", f"--workdir={workdir}", "--stage=distill", f"--steps={steps}",
                     f"--out={tmp_path}/x.png")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / "x.png")
    # The teacher trained further: its old student is refused, for sampling and for training.
    c = configs.get_config("ldm", "smoke")
    c.train.steps = 9
    train.train_and_evaluate(c, workdir)
    before = sorted(os.listdir(os.path.join(workdir, "distill")))
    r = run_main("sample", f"--workdir={workdir}", "--stage=distill", f"--out={tmp_path}/x.png")
    assert r.returncode == 2 and "distilled from its step 6" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "x.png")
    r = run_main("train", "--stage=distill", "--preset=smoke", f"--workdir={workdir}",
                 "--config.train.steps=9")
    assert r.returncode == 2 and "now at step 9" in r.stderr, r.stderr
    assert _nothing_written(os.path.join(workdir, "distill"), before)


@pytest.mark.parametrize("stages, message", [
    ("distill,ldm", "lists distill before ldm"),
    ("distill", "has distill without ldm"),
    ("vae,distill_pixel", "has distill_pixel without pixel"),
])
def test_pipeline_refuses_a_student_without_its_teacher(tmp_path, stages, message):
    r = run_main("pipeline", f"--workdir={tmp_path}/w", "--preset=smoke", f"--stages={stages}")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "w" / "distill")


@pytest.mark.slow
def test_pipeline_distils_and_draws_the_students_grid(teacher_workdir, tmp_path):
    shutil.copytree(teacher_workdir, tmp_path / "w")
    r = run_main("pipeline", f"--workdir={tmp_path}/w", "--preset=smoke", "--stages=distill",
                 "--num=8")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "w" / "distill_samples.npz", allow_pickle=False) as z:
        assert z["images"].shape == (8, 28, 28)
    assert "distill_samples.png" in os.listdir(tmp_path / "w")


@pytest.mark.slow
def test_evaluate_scores_the_student_beside_its_teacher_read_once(teacher_workdir, tmp_path,
                                                                   monkeypatch):
    shutil.copytree(teacher_workdir, tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "pixel")
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(_student(workdir), workdir)
    loaded, real = [], sample.load_generator
    monkeypatch.setattr(sample, "load_generator",
                        lambda w, s, step=None: loaded.append(s) or real(w, s, step))
    result = evaluate.evaluate(workdir, "smoke", num=16, cost=False)
    # The quality row's LDM and the student's teacher: each read once.
    assert loaded.count("ldm") == 2 and loaded.count("distill") == 0, loaded
    rows = result["few_step"]["distill"]["rows"]
    assert list(rows) == ["teacher", "1 step", "2 steps", "4 steps", "8 steps"]
    assert [r["unet_calls"] for r in rows.values()][1:] == [1, 2, 4, 8]
    assert all(0 <= r["zero"] <= 1 and np.isfinite(r["fid"]) for r in rows.values())
    text = open(os.path.join(workdir, "eval", "report.md")).read()
    assert "## Few-step sampling (distill" in text and "| student, 4 steps | 4 |" in text
