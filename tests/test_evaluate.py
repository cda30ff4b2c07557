"""Sampling CLI, the committed feature classifier, and the evaluation report (smoke preset)."""

import json
import re
import os
import types

import chex
import jax
import numpy as np
import pytest

from conftest import run_module
from ldm_jax import benchmark, data, evaluate, features, report, sample


@pytest.mark.parametrize("stage,sampler", [
    ("ldm", "ddim"), pytest.param("pixel", "ddpm", marks=pytest.mark.slow)])  # ddpm: all T steps
def test_sample_cli_writes_grid_and_uint8_npz(smoke_workdir, tmp_path, stage, sampler):
    out = tmp_path / f"{stage}.png"
    r = run_module("sample", f"--workdir={smoke_workdir}", f"--stage={stage}", "--num=12",
                   f"--out={out}", f"--sampler={sampler}", "--steps=3")
    assert r.returncode == 0, r.stderr[-1500:]
    with np.load(tmp_path / f"{stage}.npz", allow_pickle=False) as z:
        images = z["images"]
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert out.stat().st_size > 0 and images.std() > 0


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_sampling_is_seeded(smoke_workdir, tmp_path):
    """The seed alone fixes the samples: the CLI in a fresh process (its own trace, compile
    and host state) draws exactly this process's samples for --seed=3, and key 4 others.
    (Within one process any pure function would give equal outputs for equal keys.)"""
    gen = sample.load_generator(smoke_workdir, "ldm")
    a = sample.generate(gen, 4, jax.random.key(3), "ddim", 3, eta=0.0, progress=False)
    r = run_module("sample", f"--workdir={smoke_workdir}", "--stage=ldm", "--num=4", "--seed=3",
                   "--sampler=ddim", "--steps=3", "--eta=0", "--autoguidance=0",
                   f"--out={tmp_path / 'b.png'}")
    assert r.returncode == 0, r.stderr[-1500:]
    with np.load(tmp_path / "b.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["images"], a)
    c = sample.generate(gen, 4, jax.random.key(4), "ddim", 3, eta=0.0, progress=False)
    assert np.abs(a.astype(int) - c.astype(int)).sum() > 0


def test_committed_classifier_reaches_its_accuracy():
    _, _, meta = features.load_classifier()
    images, labels = data.load_mnist("test")
    acc = float(np.mean(features.predict_fn()(images) == labels))
    assert acc >= 0.993, acc
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-4)
    feats = features.feature_fn()(images[:10])
    assert feats.shape == (10, int(meta["feature_dim"])) and feats.dtype == np.float32


def test_classifier_npz_round_trip(tmp_path):
    model, params, meta = features.load_classifier()
    path = str(tmp_path / "c.npz")
    features.save_classifier(params, path, meta["feature_dim"], meta["test_accuracy"], meta["step"])
    _, params2, meta2 = features.load_classifier(path)
    chex.assert_trees_all_equal(params, params2)
    assert meta2 == meta


@pytest.mark.slow  # in `-m slow` to keep the default suite under 10 minutes on 2 cores
def test_benchmark_measures_training_and_generation(smoke_workdir):
    """The cost half of evaluate (which runs each of these in a subprocess of its own)."""
    tr = benchmark.bench_train(smoke_workdir, "ldm", steps=2)
    assert tr["train_s_per_iter"] > 0 and tr["batch_size"] == 16 and tr["params"] > 0
    assert tr["digest_s"] > 0 and tr["state_mb"] > 0
    assert tr["max_rss_mib"] > 0 and tr["train_compile_s"] > 0
    ge = benchmark.bench_generate(smoke_workdir, "ldm", batch=4, ddim_repeats=1, ddpm_repeats=1)
    assert ge["timesteps"] == 50 and ge["gen_batch"] == 4 and ge["params"] == tr["params"]
    assert all(ge[f"{n}_images_per_s"] > 0 for n in ("ddim10", "ddim50", "ddpm"))
    r = run_module("benchmark", f"--workdir={smoke_workdir}", "--stage=gan")
    assert r.returncode == 2 and "--stage must be ldm or pixel" in r.stderr
    # The pixel model with the LDM's U-Net: the same network but for the input and output
    # convolutions (1 channel instead of 4; the smoke U-Net has 16 base channels).
    tm = benchmark.bench_train(smoke_workdir, "pixel", steps=2, matched=True)
    assert tm["matched"] and tm["params"] == tr["params"] - 2 * 3 * 9 * 16 - 3
    gm = benchmark.bench_generate(smoke_workdir, "pixel", batch=4, ddim_repeats=1,
                                  ddpm_repeats=1, matched=True)
    assert gm["params"] == tm["params"] and gm["ddim10_images_per_s"] > 0
    r = run_module("benchmark", f"--workdir={smoke_workdir}", "--stage=ldm", "--matched")
    assert r.returncode == 2 and "--matched goes with --stage=pixel" in r.stderr


@pytest.mark.slow  # CI margin (35 s); evaluate still runs end to end in test_bad_input
def test_evaluate_smoke_writes_report_with_floor(smoke_workdir):
    r = run_module("evaluate", f"--workdir={smoke_workdir}", "--preset=smoke", "--num=64",
                   "--nocost")
    assert r.returncode == 0, r.stderr[-2000:]
    out = os.path.join(smoke_workdir, "eval")
    result = json.load(open(os.path.join(out, "metrics.json")))
    assert set(result["quality"]) == {"ldm", "pixel", "real (train vs test)"}
    floor = result["quality"]["real (train vs test)"]
    for name, q in result["quality"].items():
        assert all(np.isfinite(q[k]) for k in evaluate.QUALITY), (name, q)
        assert 0 <= q["precision"] <= 1 and 0 <= q["recall"] <= 1 and 0 <= q["coverage"] <= 1
        assert 0 <= q["recognisable"] <= 1 and q["class_kl"] >= 0 and len(q["class_hist"]) == 10
    # Real digits: recognisable, every class about as often as in the test set.
    assert floor["recognisable"] > 0.9 and floor["class_kl"] < 0.1
    # MNIST's pixel statistics: 80.8 % exactly 0, 1.1 % in 1-15, 7.3 % above 250.
    assert floor["zero"] > 0.75 and floor["haze"] < 0.02 and floor["saturated"] > 0.05
    # Six smoke steps make noise: far from MNIST, and much worse than real digits.
    assert result["quality"]["pixel"]["fid"] > 5 * floor["fid"]
    assert floor["precision"] > 0.5 and floor["recall"] > 0.5
    ae = result["autoencoder"]  # the smoke VAE's reconstructions of the test set
    assert ae["reg"] == "kl" and ae["latent_shape"] == [7, 7, 4] and ae["mse"] > 0
    # PSNR and rFID against hand values: test_autoencoder_quality_against_hand_values.
    assert np.isfinite(ae["psnr"]) and ae["psnr"] > 0 and ae["rfid"] > 0
    assert all(0 <= ae[k] <= 1 for k in ("zero", "haze", "saturated"))
    assert result["cost"] == {} and result["ddim_eta"] == 0.0
    for name in ("report.md", "samples.png", "reconstructions.png", "ldm_samples.npz"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    report = open(os.path.join(out, "report.md")).read()
    assert "| ldm |" in report and "| kl | 7×7×4 |" in report and "cost.png" not in report
    assert "| exact 0 | 1–15 | > 250 |" in report


class _ShiftingFirstStage:
    """A stand-in first stage whose reconstruction is the input plus 0.4 (51 of 255 levels)."""

    def apply(self, variables, x, method=None):
        return x + 0.4, {}


def test_autoencoder_quality_against_hand_values():
    """Reconstructions off by exactly 0.4 everywhere on the [-1, 1] scale: MSE = 0.16, PSNR =
    20 log10(peak-to-peak 2 / 0.4) = 20 log10 5 = 13.9794 dB; with the first 3 pixels as the
    features, the reconstructions' features are the test set's shifted by 51 levels, so
    rFID = 3 * 51^2 = 7803 (equal covariances)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 204, (50, 28, 28), dtype=np.uint8)  # + 51 levels stays <= 255
    feat_fn = lambda imgs: np.asarray(imgs).reshape(len(imgs), -1)[:, :3].astype(np.float32)
    first_stage = (_ShiftingFirstStage(), {}, {"autoencoder": {"reg": "kl"}, "loss": {}},
                   {"latent_shape": [7, 7, 4], "step": 3})
    out, recons = evaluate.autoencoder_quality(first_stage, images, feat_fn, feat_fn(images),
                                               batch=20)  # two full batches and a part one
    np.testing.assert_array_equal(recons, images.astype(np.int32) + 51)
    assert out["mse"] == pytest.approx(0.16, rel=1e-5)
    assert out["psnr"] == pytest.approx(13.979400086720377, abs=1e-4)
    assert out["rfid"] == pytest.approx(7803.0, rel=1e-6)
    assert out["reg"] == "kl" and out["latent_shape"] == [7, 7, 4] and out["steps"] == 3


def test_cached_samples_are_keyed_by_eta(tmp_path):
    """Samples drawn with one DDIM eta are never reused as those of another."""
    gen = types.SimpleNamespace(stage="ldm", identity="abc", step=3, eta_min_t=0)
    images = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    evaluate.save_samples(str(tmp_path), gen, images, 5, eta=1.0)
    np.testing.assert_array_equal(evaluate.cached_samples(str(tmp_path), gen, 4, 5, eta=1.0), images)
    assert evaluate.cached_samples(str(tmp_path), gen, 4, 5, eta=0.0) is None
    assert evaluate.cached_samples(str(tmp_path), gen, 4, 5) is None
    assert evaluate.cached_samples(str(tmp_path), gen, 4, 6, eta=1.0) is None


def test_evaluate_rejects_eta_outside_unit_interval(tmp_path):
    r = run_module("evaluate", f"--workdir={tmp_path}", "--preset=smoke", "--eta=1.5")
    assert r.returncode == 2 and "--eta must be in [0, 1]" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "eval").exists()


def test_evaluate_without_models_exits_2(tmp_path):
    r = run_module("evaluate", f"--workdir={tmp_path}", "--preset=smoke")
    assert r.returncode == 2 and "no trained vae, ldm or pixel model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "eval").exists()


def test_report_without_cost_links_only_what_exists(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {"ldm": rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)}
    q = {k: 1.0 for k in evaluate.QUALITY}
    result = dict(workdir="w", command="c", num=100, ddim_steps=5, device="cpu", date="d",
                  quality={"ldm": q}, inception=None, cost={},
                  guidance={"ldm": {"0.0": dict(q, accuracy=0.5), "2.0": dict(q, accuracy=0.9)}})
    cost = {"ldm": {"train_s_per_iter": 0.5, "ddim10_images_per_s": 70.0,
                    "ddim50_images_per_s": 15.0, "ddpm_images_per_s": 0.7}}
    report.save_cost_plot(cost, str(tmp_path))  # the plot evaluate makes when it has costs
    assert (tmp_path / "cost.png").stat().st_size > 0
    (tmp_path / "cost.png").unlink()
    report.save_figures(imgs, imgs["ldm"], {}, str(tmp_path))
    report.save_guidance_plot(result["guidance"], str(tmp_path))
    text = open(report.write_report(result, str(tmp_path))).read()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / link).is_file(), link
    assert "cost.png" not in text and "| 2.0 | 0.9000 |" in text


@pytest.mark.slow  # ~15 s quiet: 10,000 reconstructions and their classifier features; CI margin
def test_evaluate_inception_rfid_is_the_test_subset_against_its_reconstructions(
        smoke_workdir, tmp_path, monkeypatch):
    """evaluate --inception on a workdir with only a VAE: the Inception rFID is the FID of the
    N test images the floor uses against their own reconstructions (here with a cheap stand-in
    for the Inception features, so any other subset or order of images gives another value)."""
    import shutil
    from ldm_jax import checkpoints, inception, metrics
    shutil.copytree(os.path.join(smoke_workdir, "vae"), tmp_path / "vae")
    feats = lambda imgs: np.asarray(imgs, np.float32).reshape(len(imgs), -1)[:, 300:304]
    monkeypatch.setattr(inception, "load_params", lambda: {})
    monkeypatch.setattr(inception, "make_feature_fn", lambda params, batch_size: feats)
    num = 40
    result = evaluate.evaluate(str(tmp_path), "smoke", num=num, inception=True, cost=False)
    test_images, _ = data.load("package", "test")
    idx = np.random.default_rng(0).choice(len(test_images), num, replace=False)  # evaluate's subset
    _, recons = evaluate.autoencoder_quality(checkpoints.load_vae(str(tmp_path)), test_images[idx],
                                             feats, feats(test_images[idx]))
    ae = result["autoencoder"]
    assert ae["inception_n"] == num
    assert ae["inception_rfid"] == pytest.approx(
        metrics.fid_from_features(feats(test_images[idx]), feats(recons)), rel=1e-6)
    assert ae["inception_rfid"] > 0 and set(result["inception"]) == {"real (train vs test)"}
    report = open(tmp_path / "eval" / "report.md").read()
    assert "Inception rFID |" in report and f"{num} test images against their" in report
