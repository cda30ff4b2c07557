"""Autoguidance from an earlier checkpoint of the same run (sample.guide_step / guide_weight):
training keeps the guide, sampling with it is the model itself when the guide is the model,
and the CLIs record and check it."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_main
from ldm_jax import checkpoints, configs, diffusion, evaluate, sample, train


@pytest.fixture(scope="module")
def guided_workdir(smoke_workdir, tmp_path_factory):
    """smoke_workdir's VAE with an LDM that keeps step 2 as its guide (and 1 other)."""
    workdir = str(tmp_path_factory.mktemp("guided"))
    shutil.copytree(os.path.join(smoke_workdir, "vae"), os.path.join(workdir, "vae"))
    c = configs.get_config("ldm", "smoke")
    c.sample.guide_step, c.sample.guide_weight, c.train.keep_checkpoints = 2, 1.0, 1
    train.train_and_evaluate(c, workdir)
    return workdir


def test_training_keeps_the_guide_beside_the_newest(guided_workdir):
    # Saves at 2 (the guide, off the ckpt_every=3 grid), 3 and 6; keep_checkpoints=1 drops 3.
    assert checkpoints.step_dirs(os.path.join(guided_workdir, "ldm")) == [2, 6]
    gen = sample.load_generator(guided_workdir, "ldm")
    assert gen.step == 6 and gen.guide_step == 2 and gen.guide_params is not None
    guide = checkpoints.load_checkpoint(os.path.join(guided_workdir, "ldm"), 2)[0]
    assert checkpoints.tree_digest(gen.guide_params) == checkpoints.tree_digest(guide)
    assert checkpoints.tree_digest(guide) != checkpoints.tree_digest(gen.params)


@pytest.mark.parametrize("stage", ["ldm", pytest.param("pixel", marks=pytest.mark.slow)])
def test_autoguidance_by_the_model_itself_is_the_model_alone(stage, smoke_workdir, request):
    """(1 + w) eps - w eps = eps: with the model as its own guide, any w gives the unguided
    samples (float32 rounding only); another guide changes them. ldm: the run's kept guide;
    pixel (no decoder, x_0 clipped): the smoke model, guided by its weights halved."""
    workdir = request.getfixturevalue("guided_workdir") if stage == "ldm" else smoke_workdir
    gen = sample.load_generator(workdir, stage)
    if gen.guide_params is None:
        half = jax.tree_util.tree_map(lambda p: p * 0.5, gen.params)
        gen = dataclasses.replace(gen, guide_params=half, guide_step=1)
    key = jax.random.key(0)
    alone = np.asarray(sample.sample_fn(gen, 8, "ddim", 5, 1.0)(key))
    fn = sample.sample_fn(gen, 8, "ddim", 5, 1.0, autoguidance=2.0)  # one compilation
    params, guide, *rest = fn.run_args(key)
    itself = np.asarray(fn.run(params, params, *rest))
    guided = np.asarray(fn.run(params, guide, *rest))
    np.testing.assert_allclose(itself, alone, atol=2e-4)
    assert np.abs(guided - alone).max() > 1e-2


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_sample_cli_uses_the_config_weight_and_the_flag_overrides_it(guided_workdir, tmp_path):
    out = {}
    for name, args in (("config", []), ("off", ["--autoguidance=0"])):
        r = run_main("sample", f"--workdir={guided_workdir}", f"--out={tmp_path / name}.png",
                     "--num=4", "--seed=3", *args)
        assert r.returncode == 0, r.stderr[-2000:]
        with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as z:
            out[name] = z["images"]
    # The config's guide_weight (1.0) guides by default; --autoguidance=0 turns it off. More
    # than rounding apart (the saturating Bernoulli decoder moves less than the old one).
    assert np.abs(out["config"].astype(int) - out["off"]).max() > 2


def test_a_lost_guide_is_one_line_exit_2(guided_workdir, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(guided_workdir, workdir)
    shutil.rmtree(workdir / "ldm" / "checkpoints" / "2")
    r = run_main("sample", f"--workdir={workdir}", f"--out={tmp_path / 'g.png'}", "--num=4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "step 2 (sample.guide_step) is no longer in its checkpoints" in r.stderr
    assert not (tmp_path / "g.png").exists()


def test_cached_samples_are_keyed_by_autoguidance(tmp_path):
    gen = dataclasses.make_dataclass("G", ["stage", "identity", "step", "guide_min_t",
                                           "eta_min_t"])("ldm", "abc", 3, 200, 500)
    images = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    evaluate.save_samples(str(tmp_path), gen, images, 5, eta=1.0, autoguidance=1.5)
    np.testing.assert_array_equal(
        evaluate.cached_samples(str(tmp_path), gen, 4, 5, eta=1.0, autoguidance=1.5), images)
    assert evaluate.cached_samples(str(tmp_path), gen, 4, 5, eta=1.0) is None
    assert evaluate.cached_samples(str(tmp_path), gen, 4, 5, eta=1.0, autoguidance=1.0) is None
    everywhere = dataclasses.replace(gen, guide_min_t=0)  # the same weights, guided at every t
    assert evaluate.cached_samples(str(tmp_path), everywhere, 4, 5, eta=1.0, autoguidance=1.5) is None
    noised = dataclasses.replace(gen, eta_min_t=0)  # fresh noise at every step
    assert evaluate.cached_samples(str(tmp_path), noised, 4, 5, eta=1.0, autoguidance=1.5) is None


def test_pipeline_reads_a_grid_saved_before_autoguidance_as_unguided(tmp_path):
    """A grid whose provenance predates the setting was drawn without it: it matches a
    request with w = 0 and refuses to be replaced by one with w > 0."""
    from ldm_jax import cli, pipeline
    old = pipeline.samples_request(16, 5, "ddim", 1.0)
    del old["autoguidance"]
    np.savez(tmp_path / "ldm_samples.npz", images=np.zeros((1, 28, 28), np.uint8),
             provenance=np.array(json.dumps(old)))
    pipeline.check_saved_samples(str(tmp_path), "ldm", pipeline.samples_request(16, 5, "ddim", 1.0))
    with pytest.raises(cli.UsageError, match=r"other settings \(autoguidance=0.0\)"):
        pipeline.check_saved_samples(str(tmp_path), "ldm",
                                     pipeline.samples_request(16, 5, "ddim", 1.0, 1.5))
    pipeline.check_saved_samples(str(tmp_path), "ldm",
                                 pipeline.samples_request(16, 5, "ddim", 1.0, 0.0, 0))
    with pytest.raises(cli.UsageError, match=r"other settings \(guide_min_t=0\)"):
        pipeline.check_saved_samples(str(tmp_path), "ldm",
                                     pipeline.samples_request(16, 5, "ddim", 1.0, 0.0, 200))
    pipeline.check_saved_samples(str(tmp_path), "ldm",
                                 pipeline.samples_request(16, 5, "ddim", 1.0, 0.0, 0, 0))
    with pytest.raises(cli.UsageError, match=r"other settings \(eta_min_t=0\)"):
        pipeline.check_saved_samples(str(tmp_path), "ldm",
                                     pipeline.samples_request(16, 5, "ddim", 1.0, 0.0, 0, 500))


def test_a_guidance_interval_guides_only_from_min_t():
    """min_t: (1 + w) eps - w eps_guide at t >= min_t, eps alone below, against float64
    numpy; a guide that returns nan leaves a batch all below min_t untouched (never run)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    t = np.array([10, 399, 400, 900], np.int32)
    a, b = rng.standard_normal((2, 4)).astype(np.float32)
    eps = lambda x, t: x * a[:, None, None, None]
    guide = lambda x, t: x * b[:, None, None, None]
    got = diffusion.autoguided_eps_fn(eps, guide, 2.0, min_t=400)(x, t)
    x64, a64, b64 = x.astype(np.float64), a.astype(np.float64), b.astype(np.float64)
    on = (t >= 400)[:, None, None, None]
    want = np.where(on, 3.0 * x64 * a64[:, None, None, None] - 2.0 * x64 * b64[:, None, None, None],
                    x64 * a64[:, None, None, None])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    nan_guide = lambda x, t: jnp.full_like(x, jnp.nan)
    t_low = np.array([0, 10, 200, 399], np.int32)
    low = jax.jit(diffusion.autoguided_eps_fn(eps, nan_guide, 2.0, min_t=400))(x, t_low)
    assert np.isfinite(np.asarray(low)).all()
    np.testing.assert_array_equal(np.asarray(low), np.asarray(eps(x, t_low)))


def test_guide_min_t_is_checked_and_old_runs_guide_everywhere(guided_workdir, tmp_path):
    c = configs.get_config("ldm", "smoke")
    c.sample.guide_min_t = c.diffusion.timesteps
    with pytest.raises(configs.ConfigError, match="guide_min_t"):
        configs.validate(c)
    assert sample.load_generator(guided_workdir, "ldm").guide_min_t == 0
    for bad in ("-1", "50"):  # the smoke model has T = 50
        r = run_main("sample", f"--workdir={guided_workdir}", f"--out={tmp_path / 'g.png'}",
                     "--num=4", f"--guide_min_t={bad}")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--guide_min_t" in r.stderr and not (tmp_path / "g.png").exists()
